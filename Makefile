# `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all lint bench clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (divekit needs Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/divekit train resnet18 --data digits --epochs 5 --batch-size 64 --lr 0.05 \
		--optimizer sgd --scheduler cosine    # writes runs/resnet18-digits[-N]/, numbered if taken

test: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider

test-all: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider -m ''

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs
