# masq: `make run` starts the queue runner on a folder under ./var;
# `make test` installs what the tests need and runs them (with ruff and mandoc).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VAR := $(CURDIR)/var
DEBS := mandoc procmail ucspi-tcp swaks socat
SOURCES := setup.cfg pyproject.toml $(wildcard bin/* lib/masq/*.py lib/masq/*/*.py)

.PHONY: run test lint deps install clean bench

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "masq needs Python 3.11 or newer as $(PYTHON)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# A regular (not editable) install: an editable one adds an import hook that
# every program would pay for at start.  Bytecode is compiled by pip.
$(VENV)/.installed: $(PY) $(SOURCES)
	$(PY) -m pip install -q --no-deps --force-reinstall .
	$(PY) -m pip install -q 'docopt-ng>=0.9' 'setproctitle>=1.3'
	@touch $@

install: $(VENV)/.installed

$(VENV)/.test-deps: $(PY) setup.cfg
	$(PY) -m pip install -q 'pytest>=7' 'hypothesis>=6' 'ruff>=0.4'
	@touch $@

$(VAR)/masq.toml: | $(VENV)/.installed
	$(VENV)/bin/masq-setup local-only $(VAR)

run: $(VENV)/.installed $(VAR)/masq.toml
	@echo
	@echo "masq runs on $(VAR) (stop it with Ctrl-C). In another terminal:"
	@echo "  printf 'Subject: hello\n\nIt works.\n' | $(VAR)/bin/sendmail $$USER"
	@echo "and the message lands in $(VAR)/mail/$$USER/new/ (mailq: $(VAR)/bin/mailq)."
	@echo
	$(VENV)/bin/masq-send -C $(VAR)/masq.toml

# Debian packages the tests use; installed when missing and we are root (CI).
deps:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "make test: please install:$$missing"; exit 1; fi; \
	fi

lint: $(VENV)/.test-deps
	$(VENV)/bin/ruff check bin lib tests bench
	mandoc -Tlint -W warning man/*.[1-8]

test: deps $(VENV)/.installed $(VENV)/.test-deps lint
	$(VENV)/bin/python -m pytest tests

bench: $(VENV)/.installed
	$(VENV)/bin/python bench/run.py

clean:
	rm -rf $(VENV) build lib/*.egg-info
