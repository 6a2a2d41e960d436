# The two commands a newcomer types: `make run` and `make test`. Each does its own set-up.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
# flanker does not run on Python 3.13 (it imports imghdr): take 3.12 or 3.11.
PYTHON ?= $(shell for p in python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 13))' 2>/dev/null \
	&& { echo $$p; break; }; done)

.PHONY: install run test bench clean test-deps

# System packages the tests use: a real Dovecot for IMAP, swaks as a real SMTP client, and Chromium to look
# at the one-click page.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
TEST_PACKAGES := dovecot-imapd swaks chromium
test-deps:
	@command -v dovecot >/dev/null && command -v swaks >/dev/null && command -v chromium >/dev/null || { \
		echo "installing $(TEST_PACKAGES)"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(TEST_PACKAGES) >/dev/null 2>&1 || { \
		$(SUDO) apt-get update -q >/dev/null && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(TEST_PACKAGES) >/dev/null; }; }

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "optout needs Python 3.11 or 3.12 (python3.12 or python3.11 on PATH)"; exit 1; }
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { \
		echo "installing python3-venv"; apt-get install -y -q python3-venv >/dev/null || sudo apt-get install -y -q python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	PYTHONWARNINGS=ignore $(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

run: install
	$(BIN)/optout process --mbox fixtures/sample.mbox
	@echo
	$(BIN)/optout suppression list
	@echo
	$(BIN)/optout daemon

test: install test-deps
	$(BIN)/pytest -q

# Every benchmark, then one table of figures beside their ceilings (`bench/run.py --quick` for small sizes).
bench: install test-deps
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) var build *.egg-info .pytest_cache
