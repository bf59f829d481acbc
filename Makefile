# Two commands a newcomer needs: `make demo` and `make test`. Both set up what they need, and are idempotent.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test lint mosquitto bench bench-smoke clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[all,dev,bench]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/fedge simulate --out fedge-run

# The MQTT tests need the real broker; install it when missing and we may (root), else say how.
mosquitto:
	@if ! command -v mosquitto >/dev/null && ! test -x /usr/sbin/mosquitto; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; \
		else \
			echo "mosquitto is missing: sudo apt-get install mosquitto"; exit 1; \
		fi; \
	fi

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup mosquitto lint
	$(BIN)/pytest

# Every benchmark at its smallest size: proves they still run (CI); `python -m bench NAME` for real numbers.
bench-smoke: setup
	$(BIN)/python -m bench all --quick >/dev/null

clean:
	rm -rf $(VENV) fedge-run .pytest_cache .ruff_cache
