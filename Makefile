# vlmq — the two set-up commands are `make demo` and `make test`.
# The one Python version pyproject.toml's requires-python allows and CI tests.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch where the machine has it; a GPU host may set TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= worker,monitor,dev

.PHONY: install demo test lint format redis clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: install
	$(BIN)/vlmq demo

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Start a local Redis on 127.0.0.1:6379 unless one answers there.
redis:
	@redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 || \
	  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
