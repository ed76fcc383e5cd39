# Every target installs what it needs first: on a fresh machine `make test`
# and `make quickstart` are the whole set-up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint quickstart bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check cljax tests configs benchmarks
	$(BIN)/ruff format --check cljax tests configs benchmarks

quickstart: install
	$(BIN)/python -m cljax.main --config=configs/quickstart.py --workdir=runs/quickstart

# Throughput of the CIFAR recipe at a CPU-sized batch on the embedded data; on an
# accelerator pass BENCH_ARGS (e.g. the recipe's own batch and data).
BENCH_ARGS ?= --config.data.global_batch_size=64 --config.model.dtype=float32 \
	--config.data.source=embedded --config.data.image_size=32 --config.train.log_every_steps=5
bench: install
	$(BIN)/python -m cljax.bench --config=configs/simclr_cifar10.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs
