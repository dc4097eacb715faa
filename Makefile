# One-command workflows. `make test` on a fresh clone installs everything it needs.
VENV   ?= .venv
PY     := $(VENV)/bin/python

# A CUDA machine (nvidia-smi lists a GPU, or the active python already imports a CUDA torch) keeps the
# torch its environment brings (NGC container, conda, cu12x wheel): the venv is made from that python
# with --system-site-packages and pip adds only what is missing; no CPU pin. CUDA_MACHINE=1 or 0 on
# the command line overrides the detection.
ifndef CUDA_MACHINE
CUDA_MACHINE := $(shell { nvidia-smi -L 2>/dev/null | grep -q '^GPU'; } \
	|| $(or $(PYTHON),python3) -c 'import sys, torch; sys.exit(torch.version.cuda is None)' >/dev/null 2>&1 \
	&& echo 1 || echo 0)
endif
ifeq ($(CUDA_MACHINE),1)
PYTHON     ?= python3
VENV_FLAGS := --system-site-packages
# Only what training, conversion, evaluation and inference need; the tests also need the dev extras.
EXTRAS     ?= $(if $(filter test test-fast lint,$(MAKECMDGOALS)),dev)
# A venv made earlier with the CPU pin would shadow the CUDA torch, and training would run on CPU.
CHECK_VENV := @$(PY) -c 'import importlib.util as u, sys; \
	sys.exit(u.find_spec("torch") is not None and __import__("torch").version.cuda is None)' \
	|| { echo "$(VENV) holds a CPU build of torch on a CUDA machine: 'make clean install' rebuilds it" \
	"around the environment's CUDA torch (CUDA_MACHINE=0 keeps it)" >&2; exit 1; }
else
# CPU machines (laptops, CI) get the pinned CPU torch wheel and the extras the tests exercise.
PYTHON     ?= python3.11
VENV_FLAGS :=
EXTRAS     ?= cpu,dev
CHECK_VENV :=
endif
# One stamp per set of extras: `make install EXTRAS=gpu` after an earlier install does install them.
STAMP  := $(VENV)/.installed-extras-$(EXTRAS)

.PHONY: install test test-fast lint demo scaling-demo convert clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(CHECK_VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e "$(if $(EXTRAS),.[$(EXTRAS)],.)"
	@touch $@

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# HF <-> Megatron-Core weights (tools/convert). DIRECTION defaults to hf2mcore:
#   make convert HF=/models/Llama-2-7b-hf OUT=ckpt TP=4 PP=2
#   make convert DIRECTION=mcore2hf MCORE=ckpt OUT=hf-out
#   make convert DIRECTION=mcore2mcore MCORE=ckpt OUT=ckpt-tp2pp4 TP=2 PP=4
#   make convert DIRECTION=hf2hf HF=/models/Qwen2.5-7B OUT=qwen-as-llama TO=llama
# ARGS passes further flags, e.g. ARGS="--format torch_dist --dtype bf16 --force".
DIRECTION ?= hf2mcore
TP ?= 1
PP ?= 1
CONVERT_hf2mcore    = --hf $(HF) --out $(OUT) --tp $(TP) --pp $(PP)
CONVERT_mcore2hf    = --mcore $(MCORE) --out $(OUT)
CONVERT_mcore2mcore = --mcore $(MCORE) --out $(OUT) --tp $(TP) --pp $(PP)
CONVERT_hf2hf       = --hf $(HF) --out $(OUT) --to $(TO)

convert: install
	$(PY) -m tools.convert $(DIRECTION) $(CONVERT_$(DIRECTION)) $(ARGS)

# The whole pipeline on CPU: preprocess the shipped corpus, train on 2 gloo ranks, export to HF,
# generate, plot per-channel loss. ARGS passes trainer overrides, e.g. ARGS="train.train_iters=100".
demo: install
	$(PY) launch/demo.py --out runs/demo $(ARGS)

# Scaling laws on CPU (tools/scaling): 3 sizes x 3 token budgets of tiny models on the demo corpus (built
# if missing), fitted and extrapolated; plots in runs/scaling-demo. Run again after a kill: it resumes.
scaling-demo: install
	$(PY) launch/scaling_demo.py --out runs/scaling-demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
