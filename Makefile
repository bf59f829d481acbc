# Two commands a newcomer needs: `make demo` and `make test`. Both set up what they need, and are idempotent.
# `make test` runs the suite against the wheel users install (built from an sdist, installed non-editable into
# .venv); `make dev` puts the editable install of the tree back, for working on it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup dev wheel images demo test lint system bench bench-smoke clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[all,dev,bench]'
	touch $(STAMP)

setup: $(STAMP)

dev: setup
	$(BIN)/pip install --quiet --no-deps -e .

# From an sdist, as pip builds it: a stale build/ in the tree cannot slip a removed module into the wheel.
wheel: setup
	rm -rf dist
	$(BIN)/python -m build --outdir dist . >/dev/null

# The container images (fedge/server, agent, executor, broker) from that wheel, with a Docker daemon and a base
# image made here when there are none (deploy/images.sh; deploy/README.md).
images: wheel system
	deploy/images.sh

demo: setup
	$(BIN)/fedge simulate --out fedge-run

# The real parts the tests run (the broker, a Docker daemon and what makes its base image, a browser, a load
# balancer, promtool): Debian packages, installed when missing and we may (root), else say how.
SYSTEM_PACKAGES := mosquitto docker.io debootstrap chromium haproxy prometheus
system:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
		else \
			echo "missing system packages: sudo apt-get install $$missing"; exit 1; \
		fi; \
	fi

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The suite imports the installed copy: PYTHONSAFEPATH keeps `python -m` in the tree from shadowing it, and
# FEDGE_TEST_INSTALLED makes tests/test_packaging.py check that it did.
test: setup system lint wheel
	$(BIN)/pip install --quiet --force-reinstall --no-deps dist/fedge-*.whl
	FEDGE_TEST_INSTALLED=1 PYTHONSAFEPATH=1 $(BIN)/pytest

# Every benchmark at its smallest size: proves they still run (CI); `python -m bench NAME` for real numbers.
bench-smoke: dev  # `python -m bench` runs in the tree, where only the editable install resolves fedge.server
	$(BIN)/python -m bench all --quick >/dev/null

clean:
	rm -rf $(VENV) fedge-run .pytest_cache .ruff_cache build dist *.egg-info
