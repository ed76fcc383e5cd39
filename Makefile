# Every target installs what it needs first: on a fresh machine `make test`
# and `make quickstart` are the whole set-up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint quickstart bench tensorboard clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# One pytest-xdist worker per core (the suite is mostly XLA compiling, one thread at a
# time), each module on one worker (its fixtures set up once), the modules handed out in
# the order tests/conftest.py gives them: the longest first.
test: install
	$(BIN)/python -m pytest tests -n auto --dist loadfile --no-loadscope-reorder

lint: install
	$(BIN)/ruff check cljax tests configs benchmarks
	$(BIN)/ruff format --check cljax tests configs benchmarks

quickstart: install
	$(BIN)/python -m cljax.main --config=configs/quickstart.py --workdir=runs/quickstart

# Throughput of the CIFAR recipe at a CPU-sized batch on the embedded data, with windows
# sized for a CPU step of seconds (3 windows of 2 steps, one warm-up step): 16 steps
# of about 6 s on 2 cores, about 4 min in all with compiling, input and JPEG timing.
# On an accelerator pass BENCH_ARGS (e.g. the recipe's own batch and data, and --windows=5
# --config.train.log_every_steps=100 as docs/benchmarks.md does).
BENCH_ARGS ?= --config.data.global_batch_size=64 --config.model.dtype=float32 \
	--config.data.source=embedded --config.data.image_size=32 --config.train.log_every_steps=2 \
	--windows=3 --warmup_steps=1
bench: install
	$(BIN)/python -m cljax.bench --config=configs/simclr_cifar10.py $(BENCH_ARGS)

# TensorBoard on every run under runs/ (installs the tensorboard extra the first time).
tensorboard: install
	$(BIN)/python -m pip install -q -e '.[tensorboard]'
	$(BIN)/tensorboard --logdir runs

clean:
	rm -rf $(VENV) runs
