# Two commands: `make serve` and `make test`. Both set everything up on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch; installed first so that no dependency range can pull a CUDA build.
TORCH_SPEC := torch==2.13.0
# The platform's TypeScript types (generated from schemas/) and the pinned tools that the
# tests generate and compile them with; `npm ci` reruns when the lock file changes.
CLIENT := clients/typescript
NPM_STAMP := $(CLIENT)/node_modules/.installed

.PHONY: serve test lint typecheck schemas clean pgbouncer chromium device-kit

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC) -e '.[dev]'
	touch $(STAMP)

$(NPM_STAMP): $(CLIENT)/package.json $(CLIENT)/package-lock.json
	cd $(CLIENT) && npm ci --no-audit --no-fund
	touch $(NPM_STAMP)

serve: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/serve run serve_config.yaml

lint: $(STAMP)
	$(BIN)/ruff check ourvidz_serve tests benchmarks
	$(BIN)/ruff format --check ourvidz_serve tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck $(NPM_STAMP) pgbouncer chromium
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -ra

# The tests run the service behind PgBouncer in transaction mode (as on Supabase): Debian's
# package, installed when missing (as root, or through sudo); no test is ever skipped for it.
pgbouncer:
	@command -v pgbouncer >/dev/null || test -x /usr/sbin/pgbouncer || { \
		SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get install -y pgbouncer || { $$SUDO apt-get update && $$SUDO apt-get install -y pgbouncer; }; \
	}
	@command -v pgbouncer >/dev/null || test -x /usr/sbin/pgbouncer || { \
		echo "pgbouncer is required by the tests and could not be installed" >&2; exit 1; }

# The console's browser tests drive Debian's chromium with Playwright (tests/e2e/test_console.py):
# installed when missing, as pgbouncer is; the tests fail, never skip, without it.
chromium:
	@command -v chromium >/dev/null || { \
		SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get install -y chromium || { $$SUDO apt-get update && $$SUDO apt-get install -y chromium; }; \
	}
	@command -v chromium >/dev/null || { \
		echo "chromium is required by the console tests and could not be installed" >&2; exit 1; }

schemas: $(STAMP) $(NPM_STAMP)
	$(BIN)/python -m ourvidz_serve.schemas
	cd $(CLIENT) && npm run --silent generate

# The wheels benchmarks/gpu_check.sh installs on the GPU machine (CPython 3.12, manylinux
# x86-64), whose image lacks them: the list, and why each is there, is benchmarks/device-kit.txt.
# Emptied first: two versions of one package would stop the install there. A device call
# carries at most 64 MiB, the working tree included, so the recipe fails above that.
# (KIT_PYTHON_VERSION=3.11 KIT_DIR=... builds the same list for benchmarks/device_image_env.sh.)
KIT_DIR ?= .whl
KIT_PYTHON_VERSION ?= 3.12
KIT_LIMIT_BYTES := 67108864

device-kit:
	rm -rf $(KIT_DIR)
	python3 -m pip download --quiet --no-deps --only-binary=:all: \
		--python-version $(KIT_PYTHON_VERSION) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d $(KIT_DIR) -r benchmarks/device-kit.txt
	@ls -l $(KIT_DIR)
	@kit=$$(cat $(KIT_DIR)/*.whl | wc -c); \
	tree=$$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1); \
	echo "kit: $$kit bytes ($$((kit / 1048576)) MiB) in $$(ls $(KIT_DIR)/*.whl | wc -l) wheels;" \
		"with the working tree ($$((tree / 1048576)) MiB): $$(((kit + tree) / 1048576)) MiB of 64"; \
	test $$((kit + tree)) -le $(KIT_LIMIT_BYTES) || { echo "over the 64 MiB a device call carries" >&2; exit 1; }

clean:
	rm -rf $(VENV) .ourvidz .pytest_cache .mypy_cache .ruff_cache $(CLIENT)/node_modules
