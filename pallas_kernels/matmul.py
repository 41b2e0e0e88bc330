"""int8 and fp8 GEMM with outer-dimension scaling, Pallas Triton backend (Ampere+).

  y[m, n] = cast((acc[m, n] * sw[n]) * sx[m] + bias[n], out_dtype)   (reference.scale_acc)
  acc     = sum_k xq[m, k] * wq[n, k]        int8 -> int32 (exact), e4m3 -> f32

xq is (M, K), the weight wq is stored (N, K) (K-major, written once by quantize_params);
the kernel contracts both on K, which Triton lowers to `tt.dot` with a transposed B
operand (a free layout change on the shared-memory tile). Scales are applied once, after
the K loop, because a GEMM can only scale its outer dimensions.

Ragged M, N, K: the grid covers them with whole blocks and every load/store is masked
(Triton lowers partial BlockSpec blocks unmasked), with zeros filling the K tail so it
adds nothing to the accumulator.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels import reference as numerics
from pallas_kernels.errors import BackendError, KernelArgumentError, KernelTypeError
from pallas_kernels.reference import scaled_matmul_ref  # noqa: F401  (the reference, beside the kernel)

_MAX_K_INT8 = 2**31 // 127**2  # int32 accumulation of 127*127 products is exact up to this K


@dataclasses.dataclass(frozen=True)
class MatmulBlocks:
  """Tile sizes of the Triton GEMM (powers of two; Triton dots need every dim >= 16,
  and int8 wants block_k >= 32). group_m rows of tiles are walked together so
  neighbouring programs reuse the same weight tiles from L2."""

  block_m: int = 128
  block_n: int = 128
  block_k: int = 128
  group_m: int = 8
  num_warps: int = 8
  num_stages: int = 3

  def check(self):
    for name in ("block_m", "block_n", "block_k"):
      v = getattr(self, name)
      if v < 16 or v & (v - 1):
        raise KernelArgumentError(f"MatmulBlocks.{name} must be a power of two >= 16, got {v}; "
                                  "use 16, 32, 64, 128 or 256")
    if self.block_k < 32:
      raise KernelArgumentError(f"MatmulBlocks.block_k must be >= 32 for 8-bit dots, got {self.block_k}; "
                                "use block_k=32 or more")
    if self.group_m < 1:
      raise KernelArgumentError(f"MatmulBlocks.group_m must be >= 1, got {self.group_m}; use group_m=1 "
                                "for no grouping")


# Tuned defaults per shape class. Decode (few tokens): a thin M tile so no tensor-core
# work is wasted on padding rows, long K tiles so each program streams more weight per
# step -- decode is weight-bandwidth bound. Prefill: big square tiles for reuse.
DECODE_BLOCKS = MatmulBlocks(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=4)
MEDIUM_BLOCKS = MatmulBlocks(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=4)
PREFILL_BLOCKS = MatmulBlocks(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3)
# fp8 decode: 64 rows, the least Hopper's wgmma takes. With 16 rows Triton falls back to
# mma.sync, which for e4m3 on sm_90 converts to f16 and runs HMMA (seen by make gpu-check).
FP8_DECODE_BLOCKS = MatmulBlocks(block_m=64, block_n=64, block_k=256, num_warps=4, num_stages=4)


def default_blocks(m: int, n: int, k: int, dtype=jnp.int8) -> MatmulBlocks:
  if m <= 16:
    return DECODE_BLOCKS if jnp.dtype(dtype) == jnp.dtype(jnp.int8) else FP8_DECODE_BLOCKS
  if m <= 256:
    return MEDIUM_BLOCKS
  return PREFILL_BLOCKS


def _scaled_matmul_kernel(x_ref, w_ref, sx_ref, sw_ref, b_ref, o_ref, *, m, n, k,
                          block_m, block_n, block_k, group_m, acc_dtype):
  # Grouped program order: group_m tile-rows share each weight tile column in L2.
  pid = pl.program_id(0)
  grid_m, grid_n = pl.cdiv(m, block_m), pl.cdiv(n, block_n)
  group_size = group_m * grid_n
  first_m = (pid // group_size) * group_m
  rows_in_group = jnp.minimum(grid_m - first_m, group_m)
  pid_m = first_m + (pid % group_size) % rows_in_group
  pid_n = (pid % group_size) // rows_in_group

  rows = pid_m * block_m + jnp.arange(block_m)
  cols = pid_n * block_n + jnp.arange(block_n)
  row_ok = rows < m
  col_ok = cols < n
  m_slice = pl.ds(pid_m * block_m, block_m)
  n_slice = pl.ds(pid_n * block_n, block_n)
  zero = jnp.zeros((), x_ref.dtype)

  def k_step(i, acc):
    k_ok = (i * block_k + jnp.arange(block_k)) < k
    k_slice = pl.ds(i * block_k, block_k)
    x = _compat.triton_load(x_ref.at[m_slice, k_slice], mask=row_ok[:, None] & k_ok[None, :], other=zero)
    w = _compat.triton_load(w_ref.at[n_slice, k_slice], mask=col_ok[:, None] & k_ok[None, :], other=zero)
    return acc + lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=acc_dtype)

  acc = lax.fori_loop(0, pl.cdiv(k, block_k), k_step, jnp.zeros((block_m, block_n), acc_dtype))

  if sx_ref is None:  # raw accumulator out
    y = acc
  else:
    sx = _compat.triton_load(sx_ref.at[m_slice], mask=row_ok, other=0.0)
    sw = _compat.triton_load(sw_ref.at[n_slice], mask=col_ok, other=0.0)
    y = numerics.scale_acc(acc.astype(jnp.float32), sx[:, None], sw[None, :])
    if b_ref is not None:
      b = _compat.triton_load(b_ref.at[n_slice], mask=col_ok, other=0.0)
      y = y + b.astype(jnp.float32)[None, :]
  _compat.triton_store(o_ref.at[m_slice, n_slice], y.astype(o_ref.dtype),
                       mask=row_ok[:, None] & col_ok[None, :])


def _check(xq, wq, sx, sw, bias, dtype, name):
  if xq.ndim != 2 or wq.ndim != 2:
    raise KernelArgumentError(f"{name}: xq must be (M, K) and wq (N, K); got {xq.shape} and {wq.shape}: "
                              "reshape xq to 2-D (x.reshape(-1, K)) and pass the weight as (N, K)")
  if jnp.dtype(xq.dtype) != jnp.dtype(dtype) or jnp.dtype(wq.dtype) != jnp.dtype(dtype):
    raise KernelTypeError(f"{name}: both operands xq and wq must be {jnp.dtype(dtype)}, got {xq.dtype} and "
                          f"{wq.dtype}; quantize them first (quantize_rows, actquant_jax.quantize_kernel)")
  (m, k), (n, k2) = xq.shape, wq.shape
  if k != k2:
    raise KernelArgumentError(f"{name}: contraction mismatch: xq {xq.shape} is (M, K), wq {wq.shape} must be "
                              f"(N, K) with the same K={k} (a (K, N) weight needs wq.T)")
  if jnp.dtype(dtype) == jnp.dtype(jnp.int8) and k > _MAX_K_INT8:
    raise KernelArgumentError(f"{name}: K={k} can overflow int32 accumulation (max {_MAX_K_INT8}); split K, "
                              "or use actquant_jax.w8a8_dot (exact int32 chunks)")
  if (sx is None) != (sw is None):
    raise KernelArgumentError(f"{name}: sx and sw: pass both (scaled output) or neither (raw accumulator), "
                              f"got sx={'None' if sx is None else 'an array'} and "
                              f"sw={'None' if sw is None else 'an array'}")
  if sx is not None:
    if sx.shape != (m,) or sw.shape != (n,):
      raise KernelArgumentError(f"{name}: sx must be ({m},) and sw ({n},), got {sx.shape} and {sw.shape}: "
                                "one scale per row of xq and per row of wq")
    if sx.dtype != jnp.float32 or sw.dtype != jnp.float32:
      raise KernelTypeError(f"{name}: scales sx and sw must be float32, got {sx.dtype} and {sw.dtype}; "
                            "pass .astype(jnp.float32)")
  if bias is not None:
    if sx is None:
      raise KernelArgumentError(f"{name}: bias needs the scaled epilogue: pass sx and sw, or no bias")
    if bias.shape != (n,):
      raise KernelArgumentError(f"{name}: bias must be ({n},), one value per row of wq, got {bias.shape}")


@functools.partial(jax.jit, static_argnames=("out_dtype", "blocks", "interpret", "debug"))
def _triton_scaled_matmul(xq, wq, sx, sw, bias, *, out_dtype, blocks, interpret, debug=False):
  (m, k), n = xq.shape, wq.shape[0]
  acc_dtype = jnp.int32 if xq.dtype == jnp.int8 else jnp.float32
  kernel = functools.partial(
      _scaled_matmul_kernel, m=m, n=n, k=k, block_m=blocks.block_m, block_n=blocks.block_n,
      block_k=blocks.block_k, group_m=blocks.group_m, acc_dtype=acc_dtype)
  if sx is None:
    out_dtype = acc_dtype
    kernel = functools.partial(lambda kern, x, w, o: kern(x, w, None, None, None, o), kernel)
    args = (xq, wq)
  elif bias is None:
    kernel = functools.partial(lambda kern, x, w, a, b, o: kern(x, w, a, b, None, o), kernel)
    args = (xq, wq, sx, sw)
  else:
    args = (xq, wq, sx, sw, bias)
  grid = (pl.cdiv(m, blocks.block_m) * pl.cdiv(n, blocks.block_n),)
  return _compat.triton_call(
      kernel, out_shape=jax.ShapeDtypeStruct((m, n), out_dtype), grid=grid,
      num_warps=blocks.num_warps, num_stages=blocks.num_stages, interpret=interpret,
      name=f"{_compat.OWN_KERNEL_PREFIX}scaled_matmul_{jnp.dtype(xq.dtype).name}", debug=debug)(*args)


def _scaled_matmul(xq, wq, sx, sw, bias, *, dtype, out_dtype, backend, blocks, interpret, name,
                   debug=False):
  _check(xq, wq, sx, sw, bias, dtype, name)
  if backend == "triton":
    blocks = default_blocks(xq.shape[0], wq.shape[0], xq.shape[1], xq.dtype) if blocks is None else blocks
    blocks.check()
    return _triton_scaled_matmul(xq, wq, sx, sw, bias, out_dtype=jnp.dtype(out_dtype),
                                 blocks=blocks, interpret=interpret, debug=debug)
  if backend == "mosaic":
    from pallas_kernels import matmul_mosaic, matmul_mosaic_ws
    if sx is None:
      raise BackendError(f"{name}: backend='mosaic' always applies the epilogue; pass sx and sw, or use "
                         "backend='triton' for the raw accumulator")
    if isinstance(blocks, matmul_mosaic_ws.WsBlocks):  # the warp-specialized persistent kernel
      return matmul_mosaic_ws.ws_scaled_matmul(xq, wq, sx, sw, bias, out_dtype=jnp.dtype(out_dtype),
                                               blocks=blocks)
    return matmul_mosaic.mosaic_scaled_matmul(xq, wq, sx, sw, bias, out_dtype=jnp.dtype(out_dtype),
                                              blocks=blocks, interpret=interpret)
  raise BackendError(f"{name}: backend must be 'triton' or 'mosaic', got {backend!r}")


def int8_matmul(xq, wq, sx=None, sw=None, bias=None, *, out_dtype=jnp.bfloat16,
                backend="triton", blocks=None, interpret=False, debug=False):
  """int8 xq (M, K) x int8 wq (N, K) -> int32 accumulate -> (acc * sw) * sx + bias, cast.

  sx (M,) f32 per token (a static per-tensor scale is the same call with a broadcast
  sx), sw (N,) f32 per output channel, bias (N,) or None. With sx = sw = None the raw
  int32 accumulator is returned. blocks: MatmulBlocks (Triton) / MosaicBlocks, or None
  for the tuned default of the shape class. interpret=True runs on the CPU.
  """
  return _scaled_matmul(xq, wq, sx, sw, bias, dtype=jnp.int8, out_dtype=out_dtype, backend=backend,
                        blocks=blocks, interpret=interpret, name="int8_matmul", debug=debug)


def fp8_matmul(xq, wq, sx=None, sw=None, bias=None, *, out_dtype=jnp.bfloat16,
               backend="triton", blocks=None, interpret=False, debug=False):
  """float8_e4m3fn xq (M, K) x wq (N, K) -> f32 accumulate -> the same epilogue as int8_matmul."""
  return _scaled_matmul(xq, wq, sx, sw, bias, dtype=jnp.float8_e4m3fn, out_dtype=out_dtype,
                        backend=backend, blocks=blocks, interpret=interpret, name="fp8_matmul",
                        debug=debug)


def scaled_matmul(xq, wq, sx, sw, bias=None, *, out_dtype=jnp.bfloat16, backend="triton",
                  blocks=None, interpret=False):
  """int8_matmul or fp8_matmul by the operands' dtype."""
  f = int8_matmul if jnp.dtype(xq.dtype) == jnp.dtype(jnp.int8) else fp8_matmul
  return f(xq, wq, sx, sw, bias, out_dtype=out_dtype, backend=backend, blocks=blocks,
           interpret=interpret)
