# The two commands a newcomer needs: `make run` and `make test`.
# Both build (or refresh) .venv from the committed lock first; nothing else is required.
# The TypeScript client (clients/typescript, Node 20+): `make client` regenerates it from the
# app's OpenAPI, `make test-client` tests it against a served hub, in Node and in Chromium.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
export HOST PORT

CLIENT := clients/typescript
NODE_STAMP := $(CLIENT)/node_modules/.installed

.PHONY: run test lint fmt venv clean bench-gateway client client-check test-client

venv: $(STAMP)

$(STAMP): requirements/dev.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements/dev.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/joyhub serve --host $(HOST) --port $(PORT) --demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup --cov --cov-report=term --cov-fail-under=80 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests migrations bench
	$(BIN)/ruff format --check src tests migrations bench
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff check --fix src tests migrations bench
	$(BIN)/ruff format src tests migrations bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
	rm -rf $(CLIENT)/node_modules $(CLIENT)/dist $(CLIENT)/artifacts

# the client's tools, exactly as pinned in its package-lock.json (nothing installed globally)
$(NODE_STAMP): $(CLIENT)/package-lock.json $(CLIENT)/package.json
	cd $(CLIENT) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# the app's OpenAPI (exported without serving), then the client generated from it
client: $(STAMP) $(NODE_STAMP)
	$(BIN)/joyhub openapi --out $(CLIENT)/openapi.json
	cd $(CLIENT) && npm run --silent generate

# fails when the committed document or client is not what `make client` would make now
client-check: $(STAMP) $(NODE_STAMP)
	@fresh=$$(mktemp) && $(BIN)/joyhub openapi --out $$fresh && \
	  if cmp -s $$fresh $(CLIENT)/openapi.json; then rm -f $$fresh; \
	  else rm -f $$fresh; echo "$(CLIENT)/openapi.json differs from the app's OpenAPI: run make client"; exit 1; fi
	cd $(CLIENT) && npm run --silent check-generated

# the Node test and the real-browser test (Debian's Chromium, installed when missing: needs root)
test-client: client-check
	bash .ci/install-chromium
	cd $(CLIENT) && npm test
