# Two commands matter: `make demo` and `make test`. Both build the virtual environment first.
# `make lint` (ruff + mypy) and `make test-slow` complete what CI runs (.ci/run).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS := requirements/constraints.txt
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false
export NO_ALBUMENTATIONS_UPDATE := 1
# Side environments (the real clip-retrieval server of the slow tests, img2dataset for `make bench`)
# live outside the clone, so a fresh clone or CI run reuses them (tools/side_env.py).
export RAUGMENT_SIDE_ENVS ?= $(HOME)/.cache/raugment

.PHONY: venv test test-slow demo bench clean lint

venv: $(STAMP)

# Re-installs only when pyproject.toml or the constraints change; a no-op otherwise.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e '.[all]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m slow

lint: $(STAMP)
	$(BIN)/ruff check raugment tests benchmarks jobs tools
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/raugment demo

# img2dataset (the download benchmark's peer) lives in a side environment under $(RAUGMENT_SIDE_ENVS):
# it installs only with --no-deps beside the project's pins (tools/img2dataset_env; built once, reused).
bench: $(STAMP)
	$(BIN)/python tools/img2dataset_env/setup_env.py
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .venv-clip-retrieval runs .pytest_cache .mypy_cache .ruff_cache
