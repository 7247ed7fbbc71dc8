#!/usr/bin/env bash
# A CPU stand-in of the GPU machine's image, to prove benchmarks/gpu_check.sh here: a fresh
# virtual environment holding only packages of benchmarks/device-image.txt (at the versions
# seen there where the registry has them for this interpreter), never diffusers, pydantic or
# ray, and the kit of benchmarks/device-kit.txt built for the same interpreter. Then:
#
#     benchmarks/device_image_env.sh            # builds /tmp/devimg and /tmp/devimg/kit
#     PATH=/tmp/devimg/bin:$PATH KIT_DIR=/tmp/devimg/kit OUT=/tmp/gpu_check_cpu \
#         benchmarks/gpu_check.sh --device cpu --profile tiny
#
# CPython 3.11, not the machine's 3.12: the only CPU build of torch that pip can reach here is
# /opt/wheels' cp311 one (PyPI's Linux wheels are CUDA builds), so torch is 2.13.0+cpu, not the
# image's 2.11.0, and numpy is the newest for 3.11 rather than 2.5.2. Every other pinned version
# is the image's. The environment is checked afterwards: a package that pip pulled in and the
# image lacks fails the script, since the stand-in would then hide a missing kit wheel.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_DIR="${1:-/tmp/devimg}"
BASE_PYTHON="${BASE_PYTHON:-python3.11}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0+cpu}"
IMAGE="$ROOT/benchmarks/device-image.txt"

# What the pipelines and the benchmark use from the image, directly or through the kit.
NEEDED=(
    transformers tokenizers safetensors huggingface-hub accelerate peft numpy pillow imageio
    pyyaml regex requests filelock fsspec tqdm packaging psutil jinja2 httpx typing-extensions
    typer rich prometheus-client
)
# Versions the registry has no build of for this interpreter (see above).
UNPINNED=(numpy torch)
# Where the image's version was not seen but is bounded: typer 0.29 needs pydantic, which the
# image lacks, so the image's typer is older.
declare -A BOUNDED=([typer]="typer<0.29")

# "name==version" where device-image.txt gives a version (and UNPINNED does not name it).
spec_of() {
    local name="$1" line
    line="$(grep -E "^${name}(==|$)" "$IMAGE")" || { echo "$name is not in $IMAGE" >&2; return 1; }
    if [[ -n "${BOUNDED[$name]:-}" ]]; then
        echo "${BOUNDED[$name]}"
    elif [[ " ${UNPINNED[*]} " == *" $name "* ]]; then
        echo "$name"
    else
        echo "$line"
    fi
}

rm -rf "$ENV_DIR"
"$BASE_PYTHON" -m venv "$ENV_DIR"
PY="$ENV_DIR/bin/python"
"$PY" -m pip install --quiet "$TORCH_SPEC"
specs=()
for name in "${NEEDED[@]}"; do
    specs+=("$(spec_of "$name")")
done
echo "installing: ${specs[*]}"
"$PY" -m pip install --quiet "$TORCH_SPEC" "${specs[@]}"

# Every installed distribution must be one the image has (-I: not the checkout's egg-info).
"$PY" -I - "$IMAGE" <<'EOF'
import fnmatch
import importlib.metadata
import re
import sys

def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()

image = set()
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if line:
        image.add(normal(line.split("==")[0]))
installed = {normal(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
foreign = sorted(
    f"{name}=={version}"
    for name, version in installed.items()
    if not any(fnmatch.fnmatch(name, pattern) for pattern in image)
)
if foreign:
    sys.exit(f"the stand-in holds packages the image lacks: {', '.join(foreign)}")
print(f"{len(installed)} distributions, all in the image's list:")
print(" ".join(f"{name}=={installed[name]}" for name in sorted(installed)))
EOF

# The kit for this interpreter: the same list, built as `make device-kit` builds .whl/.
version="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
make -C "$ROOT" --no-print-directory device-kit KIT_PYTHON_VERSION="$version" KIT_DIR="$ENV_DIR/kit"
echo "stand-in: $ENV_DIR (python $version), kit: $ENV_DIR/kit"
