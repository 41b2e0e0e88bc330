"""The numbers: every quantize / accumulate / epilogue formula of the library, defined once.

The XLA path of `actquant_jax.w8a8_dot`, `actquant_jax.quantize` (weights), the sharded
path and the Pallas kernels all call these scalar formulas (the kernels on their tiles),
and the tests compare every kernel against the functions here:

  quantize:  c   = |inv_smooth| * f32(1/qmax)   (or f32(1/qmax) alone)
             sx  = max_k |x[m, k]| * c[k] per row (dynamic), or the static scale;
                   1 for an all-zero row (or one whose scale would be subnormal);
                   NaN for sx > 2^126 (1/sx would be subnormal, flushed to 0)
                   + sum_k (x[m, k] - x[m, k]): NaN for a row holding NaN/Inf (its output row
                   is NaN, as in the float model), else exactly 0
             xq  = saturate(round_half_even(x * (inv_smooth * (1 / sx))))  (fp8: clip, RNE cast)
             Multiplying inv_smooth into the per-row reciprocal (not into x first) and
             1/qmax into c keeps every intermediate finite where x * inv / qmax is: x
             near the float max times an inv_smooth > 1 no longer overflows. Without
             inv_smooth this is max|x| * f32(1/qmax) and x * (1/sx), bit for bit.
  GEMM:      acc = xq @ wq^T   int8: the exact integer sum, rounded once to f32 (RNE);
             computed in int32 chunks of K_CHUNK columns (|chunk| <= 2^30, no overflow)
             combined exactly (accumulate_chunked). fp8: f32.
  epilogue:  y   = cast((acc * sw[n]) * sx[m] + bias[n], out_dtype)     all in f32
             sw first (vLLM's order): weight scales are bounded offline, so acc * sw
             stays near y * qmax / max|x| and y is finite wherever the float product is,
             even for activations near the float max (sx ~ 1e36).

The weight is stored (N, K): K-major, the layout 8-bit wgmma and the vLLM/CUTLASS
kernels want, paid once at quantize time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.errors import KernelArgumentError, KernelTypeError

_QMAX = {jnp.dtype(jnp.int8): 127.0, jnp.dtype(jnp.float8_e4m3fn): 448.0}
F32_MAX = float(jnp.finfo(jnp.float32).max)
F32_TINY = float(jnp.finfo(jnp.float32).tiny)
# int32 partial sums of K_CHUNK int8 products: |sum| <= 2^16 * 128^2 = 2^30, exact even
# for -128 operands; also the native CPU kernel's K limit.
K_CHUNK = 65536
# accumulate_chunked converts the high half (|acc| / 2^16 <= K / 4) to f32 exactly.
MAX_K = 2**26
# The largest scale whose reciprocal is a normal float (subnormals are flushed to 0).
MAX_SCALE = 2.0**126


def qmax_of(dtype) -> float:
  try:
    return _QMAX[jnp.dtype(dtype)]
  except KeyError:
    raise KernelTypeError(f"dtype: the 8-bit type must be int8 or float8_e4m3fn, got {jnp.dtype(dtype)}; "
                          "pass dtype=jnp.int8 or jnp.float8_e4m3fn") from None


def scale_factor(inv_smooth, dtype):
  """c of sx = max_k |x_k| * c_k: |inv_smooth| * f32(1/qmax), or the scalar f32(1/qmax)."""
  r = jnp.float32(1.0 / qmax_of(dtype))
  return r if inv_smooth is None else jnp.abs(inv_smooth.astype(jnp.float32)) * r


def nonfinite_probe(x32, axis=1, keepdims=False):
  """0 for a group of finite values, NaN if it holds a NaN or an Inf: sum(x - x). A sum,
  because the float max of XLA CPU's fused (YNNPACK) reductions and of Triton (maxnumf)
  drops NaN. Added to a scale it leaves it exactly as is, or makes it NaN. (x - x, not
  x * 0: XLA CPU materialized the broadcast zeros of the latter.)"""
  return jnp.sum(x32 - x32, axis=axis, keepdims=keepdims)


def dynamic_scale(amax):
  """The scale from amax = max |x| * c: 1 for an all-zero or subnormal-scale group (it
  quantizes to exact zeros, not 0/0), NaN where amax is Inf or above 2^126. (NaN inputs
  are caught by nonfinite_probe, not here: a max may have dropped them.)"""
  s = jnp.where(amax < F32_TINY, jnp.float32(1.0), amax)
  return jnp.where(amax <= MAX_SCALE, s, jnp.float32(jnp.nan))


def static_row_scale(scale, amax):
  """A static scale's row scale: the calibrated `scale` for a row within it, the row's own
  (dynamic_scale(amax)) beyond it -- a sink token's massive activations, or text unlike
  the calibration's) -- so nothing saturates. An all-zero row keeps `scale`; NaN where amax
  is Inf or NaN (maximum keeps NaN)."""
  own = jnp.where(amax < F32_TINY, jnp.float32(0.0), dynamic_scale(amax))
  return jnp.maximum(jnp.asarray(scale, jnp.float32), own)


def quantize_factor(inv_smooth, sx):
  """The multiplier of x: inv_smooth * (1 / sx), or 1 / sx. inv_smooth (K,) and sx (M,)
  give an (M, K) outer product; scalars and keepdims scales broadcast."""
  r = 1.0 / sx  # (sx is f32: a weak-typed 1.0, which the Triton lowering takes)
  if inv_smooth is None:
    return r
  return inv_smooth.astype(jnp.float32)[None, :] * r[:, None]


def saturate_cast(y: jax.Array, dtype, round_half_even=jnp.round) -> jax.Array:
  """Round (half to even) and saturate f32 values already divided by their scale.
  round_half_even: jnp.round, or a kernel's own (lax.round has no Triton lowering)."""
  qmax = qmax_of(dtype)  # (a Python float: a weak-typed constant, which the Triton lowering takes)
  y = jnp.minimum(jnp.maximum(y, -qmax), qmax)  # jnp.clip's ops, written out for the Triton lowering
  if jnp.dtype(dtype) == jnp.dtype(jnp.int8):
    y = round_half_even(y)
  return y.astype(dtype)


# int8 quantization never emits -128 (saturate_cast clips to +-127). With
# nonfinite="mark" a non-finite input element is quantized to it, and the consumer turns
# rows holding it into NaN rows (marked_rows_ref; the native CPU GEMM while it reads x).
NONFINITE_MARK = -128


def quantize_rows_ref(x: jax.Array, inv_smooth: jax.Array | None = None, *,
                      dtype=jnp.int8, scale: jax.Array | None = None, row_max=None, row_sum=None,
                      nonfinite: str = "scale"):
  """(M, K) float -> (xq (M, K) int8/fp8, sx (M,) f32).

  Dynamic per token (scale None): one scale per row from its absmax.
  Static (scale given, a scalar): that scale for every row within it; a row beyond it gets
  its own (static_row_scale), so nothing saturates.
  A row holding NaN or Inf is signalled by `nonfinite`: "scale" gives it sx = NaN;
  "mark" (int8) quantizes those elements to NONFINITE_MARK and needs no reduction for it
  (sx may stay finite: the consumer must apply marked_rows_ref).
  row_max / row_sum: applied to the per-row maxima / sums before they are used (the
  sharded path: pmax / psum over K shards).
  """
  row_max = row_max or (lambda v: v)
  row_sum = row_sum or (lambda v: v)
  mark = nonfinite == "mark"
  if nonfinite not in ("scale", "mark") or (mark and jnp.dtype(dtype) != jnp.dtype(jnp.int8)):
    raise KernelArgumentError(f"quantize_rows_ref: nonfinite must be 'scale' or (int8 only) 'mark', got "
                              f"{nonfinite!r} for {jnp.dtype(dtype)}; pass nonfinite='scale'")
  x32 = x.astype(jnp.float32)
  # |x| * c rather than |x * c|: XLA CPU then computes an expensive producer of x (erf
  # GELU) once instead of recomputing it in the absmax and the quantize fusions. NaN is
  # read as Inf inside the same max (fused maxima drop NaN), so a non-finite row gets
  # amax = Inf and its scale NaN: no second pass over x.
  ax = jnp.abs(x32) if mark else jnp.where(jnp.isnan(x32), jnp.float32(jnp.inf), jnp.abs(x32))
  amax = row_max(jnp.max(ax * scale_factor(inv_smooth, dtype), axis=1, initial=0.0))
  sx = dynamic_scale(amax) if scale is None else static_row_scale(scale, amax)
  f = quantize_factor(inv_smooth, sx)
  y = x32 * (f if inv_smooth is not None else f[:, None])
  xq = saturate_cast(y, dtype)
  if mark:
    # On y, not x: x is then read once in the fusion (a second read made XLA CPU split
    # off x's producer, +20% on MiniLM). A finite x whose y overflows is marked too: a
    # NaN row, as dynamic mode gives beyond its range.
    xq = jnp.where(jnp.abs(y) < jnp.inf, xq, jnp.int8(NONFINITE_MARK))
  return xq, sx


def marked_rows_ref(xq: jax.Array) -> jax.Array:
  """(M,) f32: NaN for rows of xq holding NONFINITE_MARK, else 0 (added to their scales)."""
  return jnp.where(jnp.any(xq == NONFINITE_MARK, axis=1), jnp.float32(jnp.nan), jnp.float32(0.0))


def split_acc(p):
  """An int32 partial sum as (p >> 16, p & 0xffff): halves that add without overflow."""
  return p >> 16, p & 0xFFFF


def combine_acc(hi, lo):
  """f32 of hi * 2^16 + lo, rounded once (RNE), from summed halves. Exact steps: lo's
  carry moves into hi, f32(hi) is exact for |hi| < 2^24 (K <= MAX_K), * 2^16 is exact,
  and the one addition rounds."""
  hi = hi + (lo >> 16)
  lo = lo & 0xFFFF
  return hi.astype(jnp.float32) * jnp.float32(65536.0) + lo.astype(jnp.float32)


def _k_slice(a, start: int, chunk: int, axis: int):
  return jax.lax.slice_in_dim(a, start, min(start + chunk, a.shape[axis]), axis=axis)


def accumulate_chunked(xq: jax.Array, wq: jax.Array, accumulate_fn, chunk: int = K_CHUNK, w_k_axis: int = 1):
  """xq (M, K) @ wq (N, K)^T (w_k_axis=0: wq (K, N)) for any K <= MAX_K with
  `accumulate_fn` (an exact int32 GEMM for K <= chunk): int32 for K <= chunk, else the
  exact sum rounded once to f32 -- the value `acc.astype(f32)` would have with an
  unbounded accumulator."""
  if xq.shape[1] <= chunk or jnp.dtype(xq.dtype) != jnp.dtype(jnp.int8):
    return accumulate_fn(xq, wq)
  return combine_acc(*accumulate_halves(xq, wq, accumulate_fn, chunk, w_k_axis))


def accumulate_halves(xq: jax.Array, wq: jax.Array, accumulate_fn, chunk: int = K_CHUNK, w_k_axis: int = 1):
  """int8 xq @ wq^T as int32 (hi, lo) sums of split_acc over K chunks (combine_acc
  turns them into f32; halves of K shards can be psum'd first)."""
  hi = lo = None
  for start in range(0, max(xq.shape[1], 1), chunk):
    h, l_ = split_acc(accumulate_fn(_k_slice(xq, start, chunk, 1), _k_slice(wq, start, chunk, w_k_axis)))
    hi, lo = (h, l_) if hi is None else (hi + h, lo + l_)
  return hi, lo


def accumulate_ref(xq: jax.Array, wq: jax.Array, w_k_axis: int = 1) -> jax.Array:
  """xq (M, K) @ wq (N, K)^T (w_k_axis=0: wq (K, N)): int8 -> int32 (exact), fp8 -> f32."""
  acc_dtype = jnp.int32 if jnp.dtype(xq.dtype) == jnp.dtype(jnp.int8) else jnp.float32
  return jax.lax.dot_general(xq, wq, (((1,), (w_k_axis,)), ((), ())), preferred_element_type=acc_dtype)


def accumulate_exact_ref(xq: jax.Array, wq: jax.Array) -> jax.Array:
  """accumulate_ref for any K: int32 up to K_CHUNK, beyond it the exact sum as f32."""
  return accumulate_chunked(xq, wq, accumulate_ref)


def scale_acc(acc32, sx, sw):
  """The epilogue's scaling of an f32 accumulator tile: (acc * sw) * sx (see the header)."""
  return (acc32 * sw) * sx


def epilogue_ref(acc: jax.Array, sx: jax.Array, sw: jax.Array, bias: jax.Array | None,
                 out_dtype) -> jax.Array:
  y = scale_acc(acc.astype(jnp.float32), sx[:, None], sw[None, :])
  if bias is not None:
    y = y + bias.astype(jnp.float32)[None, :]
  return y.astype(out_dtype)


def scaled_matmul_ref(xq: jax.Array, wq: jax.Array, sx: jax.Array, sw: jax.Array,
                      bias: jax.Array | None = None, out_dtype=jnp.bfloat16) -> jax.Array:
  """The reference of int8_matmul and fp8_matmul: xq (M, K), wq (N, K), sx (M,), sw (N,)."""
  return epilogue_ref(accumulate_exact_ref(xq, wq), sx, sw, bias, out_dtype)


int8_matmul_ref = scaled_matmul_ref
fp8_matmul_ref = scaled_matmul_ref
