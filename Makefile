# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell uname -s)

.PHONY: demo test docs lint format bench clean mutate

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[mlx,test,bench,docs]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pagedkv demo

test: $(STAMP)
	$(PY) -m ruff check pagedkv tests bench conftest.py
	$(PY) -m ruff format --check pagedkv tests bench conftest.py
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci} $(PY) -m pytest --benchmark-disable

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(PY) -m ruff check pagedkv tests bench conftest.py

format: $(STAMP)
	$(PY) -m ruff format pagedkv tests bench conftest.py
	$(PY) -m ruff check --fix pagedkv tests bench conftest.py

bench: $(STAMP)
	$(PY) -m pytest bench --benchmark-only --benchmark-group-by=group

clean:
	rm -rf $(VENV) site .pytest_cache .hypothesis .benchmarks

# Hand-written mutants (tools/mutate.py): each must make its tests fail. Minutes; not run by CI.
mutate: $(STAMP)
	PYTHONPATH=. $(PY) tools/mutate.py
