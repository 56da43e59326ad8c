# Two entry points do all set-up on a fresh machine (Python >= 3.11 with venv):
#   make demo   - a local network of 3 nodes trading, books compared side by side
#   make test   - lint, types and the whole test suite
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test bench node clean browser

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/crdtbook demo --nodes 3

node: $(BIN)/.installed
	$(BIN)/crdtbook node --listen /ip4/0.0.0.0/tcp/4001

test: $(BIN)/.installed browser
	$(BIN)/ruff check .
	@# Types: node/ and cli/ are checked as crdtbook.node and crdtbook.cli, as they are
	@# installed, through a tree of links the checker can follow (it cannot follow setuptools'
	@# editable-install finder).
	@rm -rf build/typecheck && mkdir -p build/typecheck/crdtbook
	@ln -s $(CURDIR)/crdtbook/*.py $(CURDIR)/crdtbook/py.typed build/typecheck/crdtbook/
	@ln -s $(CURDIR)/node $(CURDIR)/cli build/typecheck/crdtbook/
	@ln -s $(CURDIR)/pyproject.toml build/typecheck/
	cd build/typecheck && $(CURDIR)/$(BIN)/mypy --strict -p crdtbook
	$(BIN)/pytest -q

bench: $(BIN)/.installed
	$(BIN)/python bench/bench_core.py
	$(BIN)/python bench/bench_network.py

# The browser tests (tests/browser/) drive Debian's chromium; as root, install it when missing.
# Best effort and quiet: without it (no root, no apt, no network) those tests skip, saying why.
CHROMIUM := /usr/bin/chromium
browser:
	@if [ ! -x $(CHROMIUM) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium for the browser tests (apt-get)"; \
		( timeout 900 apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			timeout 900 apt-get install -y -qq chromium ) >/dev/null 2>&1 \
			|| echo "could not install chromium: the browser tests will skip"; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info .hypothesis
