# `make demo` and `make test` do all set-up on a fresh machine.
# Python: the first of python3.13, python3.12, python3.11, python3 that is 3.11 or newer
# (override with `make PYTHON=/path/to/python ...`).
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& { echo $$p; break; }; done)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all test-gpu test-book test-browser lint bench clean

$(PY):
	@test -n "$(PYTHON)" || { echo "error: no Python 3.11 or newer found (tried python3.13, python3.12, python3.11, python3)"; exit 1; }
	@echo "using $(PYTHON) ($$($(PYTHON) -c 'import sys; print(sys.version.split()[0])'))"
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps d2l==1.0.3    # the benchmarks' peer (its pins clash with ours)
	$(PIP) install requests ipython matplotlib-inline pandas    # what d2l.torch imports
	$(PIP) install -q --no-deps --target $(VENV)/peers/d2l-0.17.6 d2l==0.17.6    # the compat layer's peer (benchmarks/book.py), outside site-packages
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/divekit train resnet18 --data digits --epochs 5    # the model's recipe; writes runs/resnet18-digits[-N]/

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -p no:cacheprovider --durations=15    # the slowest, for the 10-minute budget

test-all: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider -m 'not book'    # the slow ones too; the book's 45 sections: make test-book

# the GPU checks: one short run per task on CUDA with AMP and channels_last, evaluate/predict on
# each, and the data-parallel strategies on CUDA tensors (each skips cleanly without a GPU)
test-gpu: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider -m cuda -v tests/test_gpu.py

# the book's sections (../shared/book/chapters) with `divekit book run --quick` on the compat
# layer, one after the other: a pass/fail table with times at the end (also in
# runs/book-sections/SUMMARY.md, beside each section's report)
test-book: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider -m book tests/test_book_sections.py

# divekit serve's page in headless Chromium (playwright and its browser are fetched once)
# the served page in a real headless Chromium: Debian's (apt-get install chromium), driven by
# playwright's client (nothing downloaded from playwright's servers)
test-browser: $(STAMP)
	@command -v chromium >/dev/null || { echo "error: no chromium: apt-get install chromium"; exit 1; }
	$(PIP) install -q playwright
	$(PY) -m pytest -p no:cacheprovider -m browser -v tests/test_serve.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

# every benchmark at its standard settings against its peer (d2l 1.0.3 and 0.17.6, transformers,
# peft, sacrebleu, scalesim: all installed by $(STAMP)), then BENCHMARKS.md's generated sections
# rewritten (benchmarks/run_all.py; `make bench BENCH="--only NAME,..."` for some, `--skip`,
# `--smoke -o FILE` to test it)
BENCH ?=
bench: $(STAMP)
	$(PY) benchmarks/run_all.py $(BENCH)

clean:
	rm -rf $(VENV) runs
