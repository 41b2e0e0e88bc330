"""W8A8 on the CPU against f32 and bf16 XLA dots, measured side by side.

  python benchmarks/bench_cpu.py            # matmul shapes + MiniLM end to end
  python benchmarks/bench_cpu.py --no-minilm

Each ratio is speed vs a jitted f32 `x @ w + b` of the same shape (higher is faster),
medians of --rounds rounds timed round-robin in one process (the shared machine's drift
hits every variant alike). Decode rows (M <= 32) evict the caches before every timed
call of every variant: a layer's weights are cold in a real decode step (a model does not
fit in L3), and a 16 MiB int8 weight would otherwise stay in this CPU's 32 MiB L3 between
calls while the 64 MiB f32 one cannot.

Columns: "w8a8 XLA" is w8a8_dot with backend="xla" (XLA's int8 dot); "native" columns use
backend="cpu" (cpu_kernels' AVX512-VNNI GEMM). In both, dynamic quantization is the native
cpu_kernels.quantize_rows; static's quantize pass and the epilogue are XLA fusions. "bare" = the int8 x int8 -> int32 GEMM alone on pre-quantized operands: the
ceiling the quantize pass and epilogue eat into (XLA's at M = 1 is its int8 matrix-vector
path, which w8a8_dot avoids by padding to two rows). GOP/s counts 2*M*K*N. Memory is
XLA's own accounting of the compiled program (arguments + outputs + temporaries), in MiB.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import actquant_jax as aq  # noqa: E402
import cpu_kernels  # noqa: E402
from benchmarks.results_md import cpu_model  # noqa: E402
from benchmarks.timing import interleaved_medians, print_table  # noqa: E402
from pallas_kernels import reference as ref  # noqa: E402

SHAPES = [(2048, 384, 1536), (2048, 1536, 384), (4096, 1024, 4096), (1, 4096, 4096), (16, 4096, 4096),
          (32, 4096, 4096)]
DECODE_ROWS = 32

_evict_buf = None


def evict_caches():
  """Read 96 MiB so no operand of the previous call is left in L2/L3 (reading, not
  writing: dirty lines would tax the next call with their write-back)."""
  global _evict_buf
  if _evict_buf is None:
    _evict_buf = np.ones(96 * 2**20 // 8)
  _evict_buf.sum()


def peak_mib(f, *args) -> float:
  m = jax.jit(f).lower(*args).compile().memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes) / 2**20


def matmul_rows(shapes, rounds, native: bool):
  rows = []
  for m, k, n in shapes:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.float32)
    b = jnp.asarray(rng.standard_normal(n), jnp.float32)
    inv = jnp.asarray(rng.uniform(0.5, 2, k), jnp.float32)
    kernels = {"dynamic": aq.quantize_kernel(w), "static": aq.quantize_kernel(w, act_scale=0.03),
               "dynamic+smooth": aq.quantize_kernel(w, inv_smooth=inv),
               "static+smooth": aq.quantize_kernel(w, act_scale=0.03, inv_smooth=inv)}
    xq, _ = ref.quantize_rows_ref(x)
    if m == 1:  # XLA's bare dot at the two rows w8a8_dot pads to
      xq_xla = jnp.pad(xq, ((0, 1), (0, 0)))
    else:
      xq_xla = xq
    dot = lambda be: jax.jit(lambda x, qk, b: aq.w8a8_dot(x, qk, b, backend=be))
    fns = {"f32": jax.jit(lambda x, w, b: x @ w + b),
           "bf16": jax.jit(lambda x, w, b: (x.astype(jnp.bfloat16) @ w).astype(jnp.float32) + b),
           "xla dynamic": dot("xla"), "bare xla": jax.jit(ref.accumulate_ref)}
    args = {"f32": (x, w, b), "bf16": (x, w.astype(jnp.bfloat16), b), "xla dynamic": (x, kernels["dynamic"], b),
            "bare xla": (xq_xla, kernels["dynamic"].values)}
    if native:
      for name, qk in kernels.items():
        fns[name], args[name] = dot("cpu"), (x, qk, b)
      fns["bare cpu"], args["bare cpu"] = jax.jit(cpu_kernels.s8_gemm), (xq, kernels["dynamic"].values)
    t = interleaved_medians(fns, args, rounds=rounds, before=evict_caches if m <= DECODE_ROWS else None)
    r = lambda name: f"{t['f32'] / t[name]:.2f}x" if name in t else "-"
    gops = lambda name: f"{2 * m * k * n / t[name] / 1e9:.0f}" if name in t else "-"
    best = "dynamic" if native else "xla dynamic"
    rows.append((f"{m}x{k}x{n}", "cold" if m <= DECODE_ROWS else "warm", f"{t['f32'] * 1e3:.2f}", r("bf16"),
                 r("xla dynamic"), r("dynamic"), r("static"), r("dynamic+smooth"), r("static+smooth"),
                 r("bare xla"), r("bare cpu"), f"{gops('f32')} / {gops('bare xla')} / {gops('bare cpu')}",
                 f"{peak_mib(fns['f32'], *args['f32']):.1f} / {peak_mib(fns[best], *args[best]):.1f}"))
  print_table(["M x K x N", "weights", "f32 ms", "bf16", "w8a8 XLA", "native dynamic", "native static",
               "native dyn + smooth vec", "native static + smooth vec", "bare int8 XLA", "bare int8 native",
               "GOP/s f32 / XLA int8 / native", "MiB f32 / w8a8"], rows)


def minilm_rows(rounds, native: bool):
  from actquant_jax.models.bert import load_minilm
  from examples.minilm.run import batched, read_sentences
  mm = load_minilm()
  stats = aq.calibrate(mm.model, mm.params, batched(mm, read_sentences("calibration.txt", 128)), progress=False)
  batch = mm.tokenize((read_sentences("evaluation.txt") * 2)[:64], max_len=128, pad_to=128)
  args = (batch["input_ids"], batch["attention_mask"])
  fns = {"fp32": jax.jit(lambda p, ids, mask: mm.model.apply(p, ids, mask))}
  fargs = {"fp32": (mm.params, *args)}
  cfgs = {"dynamic, auto alpha": aq.QuantConfig(alpha="auto", rotate=False),
          "static, auto alpha": aq.QuantConfig(act_mode="static", alpha="auto", rotate=False),
          "dynamic, no smoothing": aq.QuantConfig(alpha=None, rotate=False)}
  applies = {}
  for backend in (["cpu"] if native else []) + ["xla"]:
    q = aq.quantized_apply(mm.model, backend=backend)
    for name, cfg in cfgs.items():
      label = f"W8A8 {name} ({'native' if backend == 'cpu' else 'XLA'} int8 GEMM)"
      applies[label] = q
      fns[label] = jax.jit(q)
      fargs[label] = (aq.quantize_params(mm.params, stats, cfg), *args)
  t = interleaved_medians(fns, fargs, rounds=rounds)
  rows = [(name, f"{t[name] * 1e3:.0f}", f"{t['fp32'] / t[name]:.2f}x",
           f"{peak_mib(applies.get(name, mm.model.apply), *fargs[name]):.0f}") for name in fns]
  print("\nMiniLM (all-MiniLM-L6-v2) forward, 64 sentences x 128 tokens:")
  print_table(["mode", "ms", "speed vs fp32", "MiB (XLA accounting)"], rows)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--no-minilm", action="store_true")
  ap.add_argument("--rounds", type=int, default=9)
  args = ap.parse_args()
  native = cpu_kernels.available()
  print(f"jax {jax.__version__} on {cpu_model()}, {os.cpu_count()} cores; native int8 GEMM: "
        f"{'yes (AVX512-VNNI)' if native else 'no: ' + cpu_kernels.unavailable_reason()}")
  print("ratios vs jitted f32 x @ w + b\n")
  matmul_rows(SHAPES, args.rounds, native)
  if not args.no_minilm:
    minilm_rows(args.rounds, native)


if __name__ == "__main__":
  main()
