# One-command workflows. `make test` on a fresh clone installs everything it needs.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# CPU machines get the pinned CPU torch wheel; on a GPU cluster use `make install EXTRAS=gpu,dev`
# inside an environment that already has CUDA torch (see README).
EXTRAS ?= cpu,dev

.PHONY: install test test-fast lint demo convert clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
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

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
