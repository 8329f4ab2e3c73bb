# oneoff-audit: `make demo` and `make test` work on a fresh machine with only python3.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# The dashboard's terminal player, vendored from the npm registry (static/vendor/ is not committed).
PLAYER   := asciinema-player@3
STATIC   := layers/oneoff_audit/oneoff_audit/static
VENDOR   := $(STATIC)/vendor
PLAYER_STAMP := $(VENDOR)/.installed

.PHONY: setup player chromium test lint unit integration demo bench clean

$(STAMP): pyproject.toml layers/oneoff_audit/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) player

# asciinema-player's standalone bundle (IIFE + CSS) for the dashboard page.
$(PLAYER_STAMP):
	@command -v npm >/dev/null || (apt-get update -qq && apt-get install -y -qq npm)
	npm install --prefix build/npm --no-audit --no-fund --loglevel=error $(PLAYER)
	mkdir -p $(VENDOR)
	cp build/npm/node_modules/asciinema-player/dist/bundle/asciinema-player.min.js \
	   build/npm/node_modules/asciinema-player/dist/bundle/asciinema-player.css \
	   build/npm/node_modules/asciinema-player/LICENSE $(VENDOR)/
	touch $(PLAYER_STAMP)

player: $(PLAYER_STAMP)

# Debian's Chromium for the dashboard's browser tests (Playwright drives /usr/bin/chromium).
chromium:
	@test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/cfn-lint template.yaml

test: lint chromium
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: setup
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: setup chromium
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

demo: setup
	$(BIN)/python scripts/demo.py

bench: setup
	$(BIN)/python bench/capture.py
	$(BIN)/python bench/assemble.py
	$(BIN)/python bench/api.py

clean:
	rm -rf $(VENV) build .pytest_cache .hypothesis $(VENDOR)
