# Two commands do all set-up on a fresh Debian machine with Python 3.11:
#   make serve   install into .venv if needed, serve the demo on http://localhost:8000
#   make test    install dev dependencies and Chromium if needed, run the whole suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
CONSTRAINTS := -c constraints/cpu.txt
HOST ?= 127.0.0.1
PORT ?= 8000
ENGINE ?= model
APT_GET := $(if $(shell [ "$$(id -u)" = 0 ] && echo root),apt-get,sudo apt-get)

.PHONY: serve test install install-dev browser whip-client clean

# Debian's Python needs python3-venv for `-m venv`; install it if that is missing.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV) && $(APT_GET) update -q && \
		DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -q python3-venv && $(PYTHON) -m venv $(VENV); }
	$(PIP) install -q --upgrade pip

# Stamps: reinstall only when the project's dependencies change.
$(VENV)/.installed: pyproject.toml constraints/cpu.txt | $(BIN)/python
	$(PIP) install -q $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints/cpu.txt | $(BIN)/python
	$(PIP) install -q $(CONSTRAINTS) -e '.[dev]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The browser test drives Debian's Chromium (Playwright's own browser download
# cannot be used here); espeak-ng and sox make test speech.
browser:
	@if [ ! -x /usr/lib/chromium/chromium ]; then \
		$(APT_GET) update -q && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -q chromium; \
	fi

# A third-party WHIP client for the interop test (Debian's simple-whip-client), and a
# C compiler for the small shim that test preloads into it (tests/test_whip_client.py).
whip-client:
	@if ! command -v whip-client >/dev/null || ! command -v cc >/dev/null; then \
		$(APT_GET) update -q && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -q simple-whip-client gcc libc6-dev; \
	fi

serve: install
	$(BIN)/microturn serve --host $(HOST) --port $(PORT) --engine $(ENGINE)

test: install-dev browser whip-client
	tests/run $(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
