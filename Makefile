# masq: `make run` starts the queue runner on a folder under ./var;
# `make test` installs what the tests need and runs them (with ruff and mandoc).
# Debian's python3 (built with PGO and LTO) runs masq about a fifth faster than a
# python built by hand (bench/README.md): used when it is 3.11 or newer and can make a
# venv (python3-venv), else the first python3 on PATH.  Evaluated when .venv is made.
PYTHON ?= $(shell /usr/bin/python3 -c 'import sys, ensurepip; sys.exit(sys.version_info < (3, 11))' \
  2>/dev/null && echo /usr/bin/python3 || echo python3)
VENV := .venv
PY := $(VENV)/bin/python
VAR := $(CURDIR)/var
DEBS := python3-venv mandoc procmail ucspi-tcp swaks socat dnsmasq-base systemd openssl libbsd0 liblockfile1 spamd spamassassin spamc dovecot-lmtpd opendkim-tools iproute2 dovecot-pop3d

.PHONY: run test lint deps install install-system compile clean bench

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "masq needs Python 3.11 or newer as $(PYTHON)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# An editable install: lib/ is a src layout, so setuptools adds a plain path
# (.pth), not an import hook that every program would pay for at start.
# The bytecode is compiled here so that no program compiles it on its first run.
$(VENV)/.installed: $(PY) setup.cfg pyproject.toml $(wildcard bin/*)
	$(PY) -m pip install -q -e .
	$(PY) -m masq.launchers
	@touch $@

compile: $(VENV)/.installed
	@$(PY) -m compileall -q lib

install: $(VENV)/.installed

# masq for the whole machine (masq-setup(8), `system`): a venv of the system's
# python3, outside any home folder, readable by every user; then, as root,
# $(PREFIX)/bin/masq-setup system PROFILE ...
PREFIX ?= /opt/masq
SYSTEM_PYTHON ?= /usr/bin/python3
install-system:
	@$(SYSTEM_PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "masq needs Python 3.11 or newer as $(SYSTEM_PYTHON)"; exit 1; }
	umask 022 && $(SYSTEM_PYTHON) -m venv $(PREFIX)
	umask 022 && $(PREFIX)/bin/python -m pip install -q .
	umask 022 && $(PREFIX)/bin/python -m masq.launchers
	$(PREFIX)/bin/python -m compileall -q $$($(PREFIX)/bin/python -c 'import masq, os; print(os.path.dirname(masq.__file__))')
	@echo "masq is in $(PREFIX)/bin; as root: $(PREFIX)/bin/masq-setup system local-only"

# pip rewrites the launchers: give them their -IS line again (masq.launchers)
$(VENV)/.test-deps: $(PY) setup.cfg
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m masq.launchers
	@touch $@

$(VAR)/masq.toml: | $(VENV)/.installed
	$(VENV)/bin/masq-setup local-only $(VAR)

run: compile $(VAR)/masq.toml
	@printf '%s\n' "" \
	  "masq runs on $(VAR): the queue runner, and SMTP on 127.0.0.1:2525 (Ctrl-C stops both)." \
	  "In another terminal:" \
	  "  printf 'Subject: hello\\n\\nIt works.\\n' | $(VAR)/bin/sendmail $$(id -un)" \
	  "  swaks --server 127.0.0.1:2525 --to $$(id -un)@localhost" \
	  "and the messages land in $(VAR)/mail/$$(id -un)/new/ (the queue: $(VAR)/bin/mailq)." ""
	@MASQ_CONF=$(VAR)/masq.toml $(VENV)/bin/masq-tcpserver 127.0.0.1 2525 $(VENV)/bin/masq-smtpd & \
	  trap 'kill $$! 2>/dev/null' EXIT INT TERM; \
	  $(VENV)/bin/masq-send -C $(VAR)/masq.toml

# Debian packages the tests use; installed when missing and we are root (CI).
deps:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "make test: please install:$$missing"; exit 1; fi; \
	fi

lint: $(VENV)/.test-deps
	$(VENV)/bin/ruff check bin lib tests bench
	mandoc -Tlint -W warning man/*.[1-8]

# bsd-mailx for the system-mode tests, unpacked beside the tree: its package
# Depends on an MTA, which would take /usr/sbin/sendmail over (its libraries
# are in DEBS).  Without the registry its test is skipped, and says why.
MAILX := .deps/bsd-mailx/usr/bin/bsd-mailx
$(MAILX):
	@rm -rf .deps/bsd-mailx && mkdir -p .deps/bsd-mailx && cd .deps && \
	  { apt-get download -q bsd-mailx >/dev/null 2>&1 && \
	    dpkg-deb -x bsd-mailx_*.deb bsd-mailx && rm -f bsd-mailx_*.deb; } || \
	  echo "make test: bsd-mailx could not be fetched; its test will be skipped"

test: deps compile $(VENV)/.test-deps lint $(MAILX)
	$(VENV)/bin/python -m pytest tests

# Every benchmark, with the sizes bench/README.md quotes (smtpd_load.py uses
# Postfix's smtp-source when ../shared/tools/get-postfix-tools.sh has fetched it).
SMTP_SOURCE := $(wildcard $(HOME)/.cache/masq-bench-tools/bin/smtp-source)
bench: compile
	$(PY) bench/local_path.py
	$(PY) bench/idle.py
	$(PY) bench/auth_refused.py
	$(PY) bench/sendmail_start.py
	$(PY) bench/relay.py
	$(PY) bench/smtp_relay.py
	$(PY) bench/greylist.py
	$(PY) bench/dkim_sign.py
	$(PY) bench/pipe_lmtp.py
	$(PY) bench/qmtp_large.py
	$(PY) bench/daemon_drain.py --rounds 3 --count 600
	$(PY) bench/smtpd_load.py --messages 10000 --pipelined 2000 --size 4096 \
	  $(if $(SMTP_SOURCE),--smtp-source $(SMTP_SOURCE))
	$(PY) bench/smtpd_load.py --maxuse 100 --messages 10000 --pipelined 2000 --size 4096 \
	  $(if $(SMTP_SOURCE),--smtp-source $(SMTP_SOURCE))
	$(if $(SMTP_SOURCE),$(PY) bench/side_by_side.py --rounds 3 .)
	$(if $(SMTP_SOURCE),$(PY) bench/fsync_count.py)

clean:
	rm -rf $(VENV) build lib/*.egg-info
