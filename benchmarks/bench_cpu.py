"""W8A8 on the CPU (XLA path) against f32 and bf16 XLA dots, measured side by side.

  python benchmarks/bench_cpu.py            # matmul shapes + MiniLM end to end
  python benchmarks/bench_cpu.py --no-minilm

Each number is a speed ratio vs a jitted f32 `x @ w + b` of the same shape (higher is
faster), medians of 9 rounds timed round-robin in one process (so the shared machine's
drift hits every variant alike). Memory is XLA's own accounting of the compiled program
(arguments + outputs + temporaries), in MiB. "bare int8 dot" is XLA's int8 x int8 -> int32
dot alone on pre-quantized operands: the ceiling the quantize pass and epilogue eat into
(at M = 1 it is XLA's slow int8 matrix-vector path, which w8a8_dot avoids by padding to
two rows).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import actquant_jax as aq  # noqa: E402
from benchmarks.timing import interleaved_medians, print_table  # noqa: E402
from pallas_kernels import reference as ref  # noqa: E402

SHAPES = [(2048, 384, 1536), (2048, 1536, 384), (4096, 1024, 4096), (1, 4096, 4096), (16, 4096, 4096),
          (32, 4096, 4096)]


def peak_mib(f, *args) -> float:
  m = jax.jit(f).lower(*args).compile().memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes) / 2**20


def matmul_rows(shapes, rounds):
  rows = []
  for m, k, n in shapes:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.float32)
    b = jnp.asarray(rng.standard_normal(n), jnp.float32)
    inv = jnp.asarray(rng.uniform(0.5, 2, k), jnp.float32)
    f32 = lambda x, w, b: x @ w + b
    bf16 = lambda x, w, b: (x.astype(jnp.bfloat16) @ w).astype(jnp.float32) + b
    w8 = lambda x, qk, b: aq.w8a8_dot(x, qk, b)
    kernels = {"dynamic": aq.quantize_kernel(w), "static": aq.quantize_kernel(w, act_scale=0.03),
               "dynamic+smooth": aq.quantize_kernel(w, inv_smooth=inv),
               "static+smooth": aq.quantize_kernel(w, act_scale=0.03, inv_smooth=inv)}
    xq, _ = ref.quantize_rows_ref(x)
    bare = lambda a, b: ref.accumulate_ref(a, b)
    fns = {"f32": jax.jit(f32), "bf16": jax.jit(bf16), "bare": jax.jit(bare),
           **{name: jax.jit(w8) for name in kernels}}
    args = {"f32": (x, w, b), "bf16": (x, w.astype(jnp.bfloat16), b), "bare": (xq, kernels["dynamic"].values),
            **{name: (x, qk, b) for name, qk in kernels.items()}}
    t = interleaved_medians(fns, args, rounds=rounds)
    r = lambda name: f"{t['f32'] / t[name]:.2f}x"
    rows.append((f"{m}x{k}x{n}", f"{t['f32'] * 1e3:.2f}", r("bf16"), r("dynamic"), r("static"), r("dynamic+smooth"),
                 r("static+smooth"), r("bare"),
                 f"{peak_mib(f32, x, w, b):.1f} / {peak_mib(w8, x, kernels['dynamic'], b):.1f}"))
  print_table(["M x K x N", "f32 ms", "bf16", "w8a8 dynamic", "w8a8 static", "dynamic + smooth vec",
               "static + smooth vec", "bare int8 dot", "MiB f32 / w8a8"], rows)


def minilm_rows(rounds):
  from actquant_jax.models.bert import load_minilm
  from examples.minilm.run import batched, read_sentences
  mm = load_minilm()
  stats = aq.calibrate(mm.model, mm.params, batched(mm, read_sentences("calibration.txt", 128)), progress=False)
  batch = mm.tokenize((read_sentences("evaluation.txt") * 2)[:64], max_len=128, pad_to=128)
  args = (batch["input_ids"], batch["attention_mask"])
  fp32 = jax.jit(lambda p, ids, mask: mm.model.apply(p, ids, mask))
  q = aq.quantized_apply(mm.model)
  qf = jax.jit(lambda p, ids, mask: q(p, ids, mask))
  cfgs = {"W8A8 dynamic, auto alpha": aq.QuantConfig(alpha="auto"),
          "W8A8 static, auto alpha": aq.QuantConfig(act_mode="static", alpha="auto"),
          "W8A8 dynamic, no smoothing": aq.QuantConfig(alpha=None)}
  qparams = {name: aq.quantize_params(mm.params, stats, cfg) for name, cfg in cfgs.items()}
  fns = {"fp32": fp32, **{name: qf for name in cfgs}}
  fargs = {"fp32": (mm.params, *args), **{name: (qp, *args) for name, qp in qparams.items()}}
  t = interleaved_medians(fns, fargs, rounds=rounds)
  rows = [(name, f"{t[name] * 1e3:.0f}", f"{t['fp32'] / t[name]:.2f}x",
           f"{peak_mib(lambda p, i, m_: (q if name != 'fp32' else mm.model.apply)(p, i, m_), *fargs[name]):.0f}")
          for name in fns]
  print("\nMiniLM (all-MiniLM-L6-v2) forward, 64 sentences x 128 tokens:")
  print_table(["mode", "ms", "speed vs fp32", "MiB (XLA accounting)"], rows)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--no-minilm", action="store_true")
  ap.add_argument("--rounds", type=int, default=9)
  args = ap.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; ratios vs jitted f32 x @ w + b")
  matmul_rows(SHAPES, args.rounds)
  if not args.no_minilm:
    minilm_rows(args.rounds)


if __name__ == "__main__":
  main()
