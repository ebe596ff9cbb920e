# konbini: `make run` sets everything up and runs the main job; `make test` sets up and runs all tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
APT_PACKAGES := nftables iproute2 iptables haproxy nghttp2-client nghttp2-server curl openssl golang-go testssl.sh nmap fonts-ipaexfont-mincho poppler-utils

.PHONY: run test lint docs setup system clean

run: setup
	$(BIN)/konbini demo

test: setup lint docs
	$(BIN)/pytest -q

# The rules made mechanical: lint and format (ruff), types (mypy, strict on pyproject's [tool.mypy] files).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The docs site (docs/, mkdocs.yml) built strictly: a broken link or anchor fails, as a test would
# (not --quiet: it hides the warnings from the strict count too).
docs: setup
	$(BIN)/mkdocs build --strict

setup: system $(VENV)/.installed

# Debian packages the project uses: nft and ip/tc (netns mode), iptables (iptables-nft: NFQUEUE for line delay), haproxy (benchmark baseline, and an EC router in the interop tests), h2load (cross-check),
# curl, openssl, go and nghttpd (the interop tests: curl, s_client, ../shared/tools/h2mtls_load, nghttpd as an origin);
# IPAex Mincho (the font the printed certificates embed) and poppler-utils (pdftoppm: a certificate rendered to look at).
system:
	@missing=""; for c in nft ip tc iptables haproxy h2load nghttpd curl openssl go testssl nmap pdftoppm; do command -v $$c >/dev/null 2>&1 || missing=1; done; \
	[ -e /usr/share/fonts/opentype/ipaexfont-mincho/ipaexm.ttf ] || missing=1; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	  else \
	    echo "konbini: not root: skipping apt-get install $(APT_PACKAGES) (netns mode and the HAProxy baseline need them)"; \
	  fi; \
	fi

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

clean:
	rm -rf $(VENV) .konbini *.egg-info site
