"""Pure-jnp references for the kernels; the tests compare every kernel against these.

They are also the XLA path of `actquant_jax.w8a8_dot` (CPU/TPU), so kernel and XLA path
are one definition of the numbers:

  quantize:  x32 = x * inv_smooth;  sx = absmax(x32 row) * f32(1/qmax) (1 where the row is 0)
             xq  = saturate(round_half_even(x32 * (1 / sx)))   (fp8: clip, then RNE cast)
             (a reciprocal per row, then multiplies: what XLA rewrites x / sx into anyway,
             and one division per row instead of per element on the GPU)
  GEMM:      acc = xq @ wq^T   (int8 -> int32 exact; fp8 -> f32)
  epilogue:  y   = cast((acc * sx[m]) * sw[n] + bias[n], out_dtype)     all in f32

The weight is stored (N, K): K-major, the layout 8-bit wgmma and the vLLM/CUTLASS
kernels want, paid once at quantize time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_QMAX = {jnp.dtype(jnp.int8): 127.0, jnp.dtype(jnp.float8_e4m3fn): 448.0}


def qmax_of(dtype) -> float:
  try:
    return _QMAX[jnp.dtype(dtype)]
  except KeyError:
    raise TypeError(f"expected int8 or float8_e4m3fn, got {jnp.dtype(dtype)}") from None


def saturate_cast(y: jax.Array, dtype) -> jax.Array:
  """Round (half to even) and saturate f32 values already divided by their scale."""
  qmax = jnp.float32(qmax_of(dtype))
  y = jnp.clip(y, -qmax, qmax)
  if jnp.dtype(dtype) == jnp.dtype(jnp.int8):
    y = jnp.round(y)
  return y.astype(dtype)


def row_scale(absmax: jax.Array, dtype) -> jax.Array:
  """absmax * f32(1/qmax), with 1 for all-zero (or subnormal-scale) rows (so they quantize to exact zeros, not NaN).

  A multiply by the rounded reciprocal, not a division: compilers rewrite division by a
  constant into exactly this, so defining it this way keeps every backend bit-identical.
  """
  s = absmax * jnp.float32(1.0 / qmax_of(dtype))
  # Rows so small that the scale would be subnormal (flushed to zero on CPU and GPU) are
  # treated as zero rows: their values (< 448 * 2^-126) quantize to 0.
  return jnp.where(s >= jnp.finfo(jnp.float32).tiny, s, jnp.float32(1.0))


def quantize_rows_ref(x: jax.Array, inv_smooth: jax.Array | None = None, *,
                      dtype=jnp.int8, scale: jax.Array | None = None):
  """(M, K) float -> (xq (M, K) int8/fp8, sx (M,) f32).

  Dynamic per token (scale None): one scale per row from its absmax.
  Static (scale given, a scalar): that scale for every row; values beyond it saturate.
  """
  x32 = x.astype(jnp.float32)
  inv = None if inv_smooth is None else inv_smooth.astype(jnp.float32)[None, :]
  if scale is None:
    # max |x * inv| taken as max(|x| * |inv|) (equal: rounding is sign-symmetric). Written
    # this way XLA CPU computes an expensive producer (erf GELU) once instead of splitting
    # it and recomputing it in both the absmax and the quantize pass: 4x faster there.
    absx = jnp.abs(x32) if inv is None else jnp.abs(x32) * jnp.abs(inv)
    sx = row_scale(jnp.max(absx, axis=1), dtype)
  else:
    sx = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (x.shape[0],))
  if inv is not None:
    x32 = x32 * inv
  return saturate_cast(x32 * (1.0 / sx)[:, None], dtype), sx


def accumulate_ref(xq: jax.Array, wq: jax.Array) -> jax.Array:
  """xq (M, K) @ wq (N, K)^T: int8 -> int32 (exact), fp8 -> f32."""
  acc_dtype = jnp.int32 if jnp.dtype(xq.dtype) == jnp.dtype(jnp.int8) else jnp.float32
  return jax.lax.dot_general(xq, wq, (((1,), (1,)), ((), ())), preferred_element_type=acc_dtype)


def epilogue_ref(acc: jax.Array, sx: jax.Array, sw: jax.Array, bias: jax.Array | None,
                 out_dtype) -> jax.Array:
  y = acc.astype(jnp.float32) * sx[:, None] * sw[None, :]
  if bias is not None:
    y = y + bias.astype(jnp.float32)[None, :]
  return y.astype(out_dtype)


def scaled_matmul_ref(xq: jax.Array, wq: jax.Array, sx: jax.Array, sw: jax.Array,
                      bias: jax.Array | None = None, out_dtype=jnp.bfloat16) -> jax.Array:
  """The reference of int8_matmul and fp8_matmul: xq (M, K), wq (N, K), sx (M,), sw (N,)."""
  return epilogue_ref(accumulate_ref(xq, wq), sx, sw, bias, out_dtype)


int8_matmul_ref = scaled_matmul_ref
fp8_matmul_ref = scaled_matmul_ref
