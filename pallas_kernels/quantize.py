"""Fused activation quantize: x (M, K) float -> xq (M, K) int8/fp8 and sx (M,) f32.

Per program, a block of rows: x * inv_smooth (the runtime SmoothQuant vector), the row
absmax, the scale absmax * f32(1/qmax), then round half to even and saturate -- one kernel
instead of XLA's reduce + elementwise passes. Static scales take the absmax pass too: a row
beyond the calibrated scale (a sink token) is scaled on its own (reference.static_row_scale).

The row's absmax is needed before any element can be quantized, so a row longer than one
K block is read twice (absmax pass, quantize pass); rows that fit one block are read once.
Numbers are those of reference.quantize_rows_ref, bit for bit.
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
from pallas_kernels.reference import qmax_of, quantize_rows_ref  # noqa: F401 (the reference, beside the kernel)


@dataclasses.dataclass(frozen=True)
class QuantizeBlocks:
  block_m: int = 16
  block_k: int = 1024
  num_warps: int = 4
  num_stages: int = 2

  def check(self):
    for name in ("block_m", "block_k"):
      v = getattr(self, name)
      if v < 1 or v & (v - 1):
        raise KernelArgumentError(f"QuantizeBlocks.{name} must be a power of two, got {v}; "
                                  "use 1, 2, 4, ..., 1024, ...")


def default_quantize_blocks(m: int, k: int) -> QuantizeBlocks:
  # Whole row in one block up to 4096 columns (read once); 16 rows x 4096 f32 = 256 KiB
  # of registers across 8 warps is the ceiling, so fewer rows as K grows.
  block_k = min(pl.next_power_of_2(k), 4096)
  block_m = max(1, min(16, 16384 // block_k))
  return QuantizeBlocks(block_m=block_m, block_k=block_k, num_warps=4 if block_k <= 1024 else 8)


def round_half_even(y):
  """Round half to even from floor and a tie test (`lax.round` has no Triton lowering)."""
  f = jnp.floor(y)
  d = y - f  # exact for |y| < 2^23
  up = (d > 0.5) | ((d == 0.5) & (f - 2.0 * jnp.floor(f * 0.5) != 0.0))
  return jnp.where(up, f + 1.0, f)


def _quantize_rows_kernel(x_ref, s_ref, scale_ref, xq_ref, sx_ref, *, m, k, block_m, block_k):
  pid = pl.program_id(0)
  rows = pid * block_m + jnp.arange(block_m)
  row_ok = rows < m
  m_slice = pl.ds(pid * block_m, block_m)
  n_k = pl.cdiv(k, block_k)

  def load_block(i):
    cols = i * block_k + jnp.arange(block_k)
    col_ok = cols < k
    k_slice = pl.ds(i * block_k, block_k)
    x = _compat.triton_load(x_ref.at[m_slice, k_slice], mask=row_ok[:, None] & col_ok[None, :],
                            other=0.0).astype(jnp.float32)
    inv = None if s_ref is None else _compat.triton_load(s_ref.at[k_slice], mask=col_ok, other=0.0)
    return x, inv, k_slice, col_ok

  # The scalar formulas are reference.py's (the one definition); only the loops are here.
  zeros = jnp.zeros((block_m,), jnp.float32)

  def absmax_step(i, carry):
    amax, probe = carry
    x, inv, _, _ = load_block(i)
    c = numerics.scale_factor(inv, xq_ref.dtype)
    return (jnp.maximum(amax, jnp.max(jnp.abs(x) * c, axis=1)), probe + numerics.nonfinite_probe(x))
  amax, probe = lax.fori_loop(0, n_k, absmax_step, (zeros, zeros))
  if scale_ref is None:  # dynamic, per row
    sx = numerics.dynamic_scale(amax) + probe
  else:  # static per tensor, a row beyond it on its own
    sx = numerics.static_row_scale(_compat.triton_load(scale_ref.at[pl.ds(0, 1)])[0], amax) + probe

  def quantize_step(i, carry):
    x, inv, k_slice, col_ok = load_block(i)
    f = numerics.quantize_factor(inv, sx)
    xq = numerics.saturate_cast(x * (f if inv is not None else f[:, None]), xq_ref.dtype, round_half_even)
    _compat.triton_store(xq_ref.at[m_slice, k_slice], xq, mask=row_ok[:, None] & col_ok[None, :])
    return carry
  lax.fori_loop(0, n_k, quantize_step, 0)
  _compat.triton_store(sx_ref.at[m_slice], sx, mask=row_ok)


@functools.partial(jax.jit, static_argnames=("dtype", "blocks", "interpret", "debug"))
def _triton_quantize_rows(x, inv_smooth, scale, *, dtype, blocks, interpret, debug=False):
  m, k = x.shape
  kernel = functools.partial(_quantize_rows_kernel, m=m, k=k, block_m=blocks.block_m,
                             block_k=blocks.block_k)
  args = [x]
  if inv_smooth is not None:
    args.append(inv_smooth.astype(jnp.float32))
  if scale is not None:
    args.append(jnp.reshape(scale, (1,)).astype(jnp.float32))
  has_s, has_scale = inv_smooth is not None, scale is not None

  def body(*refs):
    refs = list(refs)
    x_ref = refs.pop(0)
    s_ref = refs.pop(0) if has_s else None
    scale_ref = refs.pop(0) if has_scale else None
    kernel(x_ref, s_ref, scale_ref, *refs)

  return _compat.triton_call(
      body, out_shape=(jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((m,), jnp.float32)),
      grid=(pl.cdiv(m, blocks.block_m),), num_warps=blocks.num_warps, num_stages=blocks.num_stages,
      interpret=interpret, name=f"{_compat.OWN_KERNEL_PREFIX}quantize_rows_{jnp.dtype(dtype).name}",
      debug=debug)(*args)


def quantize_rows(x, inv_smooth=None, *, scale=None, dtype=jnp.int8, backend="triton",
                  blocks: QuantizeBlocks | None = None, interpret=False, debug=False):
  """x (M, K) float -> (xq (M, K) int8/float8_e4m3fn, sx (M,) f32).

  inv_smooth: optional (K,) vector multiplied in before quantizing. scale: None for
  dynamic per-token scales (row absmax / qmax; an all-zero row gets 1), or a scalar
  static per-tensor scale (a row beyond it gets its own: reference.static_row_scale).
  Round half to even for int8.
  backend: "triton" (also what the Mosaic GPU path uses: it is a memory-bound row pass)
  """
  if backend not in ("triton", "mosaic"):
    raise BackendError(f"quantize_rows: backend must be 'triton' or 'mosaic', got {backend!r}")
  if x.ndim != 2:
    raise KernelArgumentError(f"quantize_rows: x must be (M, K), got shape {x.shape}; "
                              "reshape it to 2-D (x.reshape(-1, K))")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise KernelTypeError(f"quantize_rows: x must be floating point, got {x.dtype}; "
                          "pass x.astype(jnp.float32)")
  qmax_of(dtype)  # raises KernelTypeError on a non-8-bit dtype
  if inv_smooth is not None and inv_smooth.shape != (x.shape[1],):
    raise KernelArgumentError(f"quantize_rows: inv_smooth must be ({x.shape[1]},), one value per column of "
                              f"x, got {inv_smooth.shape}")
  if scale is not None and jnp.shape(scale) not in ((), (1,)):
    raise KernelArgumentError(f"quantize_rows: a static scale must be a scalar, got shape {jnp.shape(scale)}; "
                              "pass one per-tensor scale, or scale=None for per-row scales")
  blocks = default_quantize_blocks(*x.shape) if blocks is None else blocks
  blocks.check()
  return _triton_quantize_rows(x, inv_smooth, scale, dtype=jnp.dtype(dtype), blocks=blocks,
                               interpret=interpret, debug=debug)
