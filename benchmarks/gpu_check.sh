#!/usr/bin/env bash
# The GPU check in one command, for a GPU machine whose image has PyTorch and transformers but
# no diffusers, pydantic or ray, and no package registry: installs the wheels of .whl/ (built
# here by `make device-kit`, carried along) into a folder of its own, puts it and this checkout
# first on PYTHONPATH, and runs benchmarks/gpu_full_random.py, by default
# `--device cuda --profile full-random`; arguments are passed on after those, so later ones win:
#
#     benchmarks/gpu_check.sh                              # on the GPU machine, under 8 minutes
#     benchmarks/gpu_check.sh --device cpu --profile tiny  # the plumbing, on a CPU
#
# Writes gpu_check.json, gpu_check.md (the table) and gpu_check.log to $OUT (./gpu_check_out
# when unset). PYTHON (python3), KIT_DIR (.whl) and KIT_SITE (/tmp/site) change where the
# interpreter, the wheels and the installed kit are.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
KIT_DIR="${KIT_DIR:-$ROOT/.whl}"
KIT_SITE="${KIT_SITE:-/tmp/site}"
OUT_DIR="${OUT:-./gpu_check_out}"
started=$SECONDS

main() {
    echo "== machine"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    else
        echo "nvidia-smi: not found"
    fi
    "$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])'

    shopt -s nullglob
    wheels=("$KIT_DIR"/*.whl)
    if ((${#wheels[@]} == 0)); then
        echo "no wheels in $KIT_DIR: run \`make device-kit\` where pip works, and carry .whl" >&2
        exit 1
    fi
    echo "== kit: ${#wheels[@]} wheels from $KIT_DIR into $KIT_SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$KIT_SITE" "${wheels[@]}"
    export PYTHONPATH="$KIT_SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1
    echo "kit installed in $((SECONDS - started)) s"

    echo "== versions"
    "$PYTHON" - <<'EOF'
import importlib.metadata

import torch

for name in ("torch", "transformers", "diffusers", "peft", "pydantic", "imageio-ffmpeg"):
    print(f"{name} {importlib.metadata.version(name)}")
print(f"CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}", end="")
print(f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
EOF

    echo "== benchmark"
    "$PYTHON" "$ROOT/benchmarks/gpu_full_random.py" --device cuda --profile full-random "$@" \
        --json "$OUT_DIR/gpu_check.json" --table "$OUT_DIR/gpu_check.md"
    echo "== done in $((SECONDS - started)) s: $OUT_DIR/gpu_check.json, $OUT_DIR/gpu_check.md"
}

mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
# The log comes back with the other files; pipefail keeps main's exit status.
main "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
