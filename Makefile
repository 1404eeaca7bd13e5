# make run: all five experiments on the default corpus, results in outcome/
# make test: the whole test suite (on the CPU, whatever JAX finds); make test-fast: all but the
# tests marked slow (subprocesses, multi-second runs); make lint: ruff over the tree
# make test-gpu: the tests marked gpu, on the GPU (a machine with an NVIDIA GPU)
# On a machine where `nvidia-smi -L` lists a GPU, the set-up installs jax[cuda12];
# JAX_EXTRA=cuda13 (or cuda12) chooses the build, JAX_EXTRA=cpu forces the CPU-only one.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
JAX_EXTRA ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda12 || echo cpu)
ifeq ($(filter $(JAX_EXTRA),cpu cuda12 cuda13),)
$(error JAX_EXTRA=$(JAX_EXTRA): expected cpu, cuda12 or cuda13)
endif
comma := ,
EXTRAS := test$(if $(filter-out cpu,$(JAX_EXTRA)),$(comma)$(JAX_EXTRA))
# one stamp per build, so switching JAX_EXTRA reinstalls
STAMP := $(VENV)/.installed-$(JAX_EXTRA)

.PHONY: run test test-fast lint test-gpu clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
ifeq ($(JAX_EXTRA),cpu)
	@# a venv that had a CUDA build keeps its plugin unless removed, and JAX would still pick the GPU
	$(PY) -m pip uninstall --quiet -y jax-cuda12-plugin jax-cuda12-pjrt jax-cuda13-plugin jax-cuda13-pjrt
endif
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

run: $(STAMP)
	$(PY) scripts/run.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

test-gpu: $(STAMP)
	MINIGPT_TEST_GPU=1 $(PY) -m pytest -m gpu $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outcome/*.png outcome/*.csv outcome/*.jsonl outcome/*.txt outcome/*.pt outcome/report.* \
		outcome/checkpoints outcome/tensorboard
