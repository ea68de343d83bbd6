# sipis — the two commands: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
APT_PACKAGES := kamailio kamailio-extra-modules kamailio-utils-modules sip-tester dnsmasq-base systemd

.PHONY: run test lint bench deps-apt clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# The bench extra too: tests/test_bench_smoke.py runs the aioapns reference at a tiny size.
$(TEST_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

run: $(STAMP)
	$(VENV)/bin/sipis run -c conf/dev.yaml

# Debian packages the real-peer tests need; apt-get only when one is missing.
deps-apt:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check sipis tests bench
	$(VENV)/bin/mypy

test: deps-apt $(TEST_STAMP) lint
	$(PY) -m pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc = 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

bench: deps-apt $(TEST_STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache
