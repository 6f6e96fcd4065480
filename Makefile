# Quick start: `make demo` and `make test` both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The pinned torch is installed first: on the development machines it is an on-disk CPU build;
# an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
# mkdocs-material prints a banner about MkDocs 2.0 on every build
export NO_MKDOCS_2_WARNING ?= 1

.PHONY: test lint format docs demo venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev]"
	touch $@

# lint first: a style failure shows in seconds, before the suite's minutes
test: lint
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# what `lint` checks, applied (review the diff before committing)
format: $(VENV)/.installed
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# the documentation site into site/; --strict turns a broken link or API reference into an error
docs: $(VENV)/.installed
	$(PY) -m mkdocs build --strict --site-dir site

demo: $(VENV)/.installed
	$(PY) -m bio demo

clean:
	rm -rf $(VENV) lightning_logs demo_runs .pytest_cache site
