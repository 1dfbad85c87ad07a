# dcbench: two entry points for a fresh machine, `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,seg]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dcbench demo

# Two pytest workers (the suite's tests are single-threaded: conftest sets one torch thread);
# --dist loadscope keeps each module's fixtures in one worker; --no-loadscope-reorder keeps
# conftest's order (its slow modules first), which balances the two workers.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder

bench: $(STAMP)
	$(PY) benchmarks/clustering.py

clean:
	rm -rf $(VENV) build *.egg-info
