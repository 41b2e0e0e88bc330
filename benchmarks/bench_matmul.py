"""8-bit GEMM throughput on a GPU: the Pallas int8/fp8 kernels vs XLA's bf16 dot. Prints a
markdown table of achieved TOPS and ratios.

  python benchmarks/bench_matmul.py            # shapes M in 1,16,128,2048,8192 x (K,N) in
                                               # (4096,4096), (4096,11008)
  python benchmarks/bench_matmul.py --quick    # a subset

On a GPU: "int8 kernel" = pallas_kernels.int8_matmul on pre-quantized operands (the GEMM
alone, epilogue included, bf16 out), likewise fp8; "bf16 XLA" = jnp.dot of bf16 operands.
Without a GPU it says so; the CPU path is benchmarks/bench_cpu.py.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pallas_kernels as pk  # noqa: E402
from benchmarks.timing import median_seconds, print_table  # noqa: E402

H100_INT8_PEAK_TOPS = 1979.0


def gpu_rows(shapes, backend):
  rows = []
  blocks = None
  if backend == "mosaic_ws":  # the warp-specialized persistent Hopper kernel (opt-in)
    backend, blocks = "mosaic", pk.WS_BLOCKS
  for m, k, n in shapes:
    if blocks is not None and blocks.shape_error(m, n, k):
      continue
    rng = np.random.default_rng(0)
    xb = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    wb = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
    flops = 2.0 * m * n * k
    t_bf16 = median_seconds(jax.jit(jnp.dot), xb, wb)
    res = {}
    for dtype in (jnp.int8, jnp.float8_e4m3fn):
      xq, sx = pk.quantize_rows_ref(xb.astype(jnp.float32), dtype=dtype)
      wq, sw = pk.quantize_rows_ref(wb.T.astype(jnp.float32), dtype=dtype)
      f = jax.jit(functools.partial(pk.scaled_matmul, out_dtype=jnp.bfloat16, backend=backend, blocks=blocks))
      res[dtype] = median_seconds(f, xq, wq, sx, sw)
    t8, tf8 = res[jnp.int8], res[jnp.float8_e4m3fn]
    rows.append((f"{m}x{k}x{n}", f"{flops / t8 / 1e12:.0f}", f"{flops / tf8 / 1e12:.0f}",
                 f"{flops / t_bf16 / 1e12:.0f}", f"{t_bf16 / t8:.2f}x", f"{t_bf16 / tf8:.2f}x",
                 f"{flops / t8 / 1e12 / H100_INT8_PEAK_TOPS:.0%}"))
  print_table(["M x K x N", "int8 TOPS", "fp8 TFLOPS", "bf16 XLA TFLOPS", "int8/bf16", "fp8/bf16",
               "int8 % of H100 peak"], rows)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="fewer shapes")
  ap.add_argument("--backend", default="triton", choices=["triton", "mosaic", "mosaic_ws"],
                  help="GPU kernel backend (mosaic_ws: warp-specialized persistent Hopper GEMM)")
  args = ap.parse_args()
  on_gpu = jax.default_backend() == "gpu"
  ms = [1, 16, 128, 2048, 8192]
  kns = [(4096, 4096), (4096, 11008)]
  if args.quick:
    ms, kns = [1, 16, 128, 2048], [(4096, 4096)]
  shapes = [(m, k, n) for k, n in kns for m in ms]
  print(f"jax {jax.__version__}, device: {jax.devices()[0].device_kind}")
  if on_gpu:
    print(f"Pallas {args.backend} kernels vs XLA bf16 (median of 15 runs each, same process)")
    gpu_rows(shapes, args.backend)
  else:
    print("No GPU: the int8/fp8 Pallas kernel rows were not measured. CPU numbers: "
          "python benchmarks/bench_cpu.py")


if __name__ == "__main__":
  main()
