"""An independent numpy oracle of the library's numbers (issue 21).

Written from the spec at the top of pallas_kernels/reference.py, in float32 numpy, without
calling JAX, XLA or reference.py (so a test against it does not compare the code with
itself):

  c    = |inv_smooth| * f32(1/qmax)  (or f32(1/qmax))
  sx   = max_k |x[m, k]| * c[k] per row (dynamic) or the static scale; 1 where the max is
         below the smallest normal f32; NaN above 2^126 and for a row holding NaN/Inf
  xq   = saturate(rint(x * (inv_smooth * (1/sx))))  int8: [-127, 127]; fp8 e4m3: clip to
         +-448, round to nearest even on the e4m3 grid
  acc  = xq @ wq^T  exact (int64 / float64), rounded once to f32
  y    = cast(f32(f32(acc * sw[n]) * sx[m]) + bias[n], out_dtype)

An XLA-compiled epilogue may contract `u * sx + bias` into one FMA (one rounding instead
of two): `epilogue(..., fma=True)` gives that variant, correctly rounded.
"""

import numpy as np

QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0}
F32_TINY = np.float32(2.0**-126)  # the smallest normal f32
MAX_SCALE = np.float32(2.0**126)  # the largest scale whose reciprocal is normal


def _f32(a):
  return np.asarray(a, np.float32)


def round_e4m3(y):
  """f32 values already clipped to [-448, 448] -> the nearest float8_e4m3fn value (ties
  to even), as f32. e4m3: 3 mantissa bits, normals from 2^-6, subnormal step 2^-9."""
  y = _f32(y)
  _, e = np.frexp(np.where(y == 0, np.float32(1), y))  # |y| = f * 2^e, f in [0.5, 1)
  step = np.ldexp(np.float32(1), np.maximum(e - 1, -6) - 3).astype(np.float32)
  with np.errstate(invalid="ignore"):
    return (np.rint(y / step) * step).astype(np.float32)  # y / step, * step: exact (powers of 2)


def saturate(y, qtype):
  """Round and saturate f32 values already multiplied by 1/scale (NaN stays NaN for fp8;
  int8 callers zero NaN rows first)."""
  qmax = np.float32(QMAX[qtype])
  y = np.clip(_f32(y), -qmax, qmax)
  if qtype == "int8":
    return np.rint(y).astype(np.int8)  # np.rint: half to even
  return round_e4m3(y)


def scale_from_amax(amax):
  """1 below the smallest normal (an all-zero or subnormal-scale group), NaN above 2^126."""
  amax = _f32(amax)
  s = np.where(amax < F32_TINY, np.float32(1), amax)
  with np.errstate(invalid="ignore"):
    return np.where(amax <= MAX_SCALE, s, np.float32(np.nan)).astype(np.float32)


def row_scales(x, inv_smooth=None, *, qtype="int8", scale=None):
  """(M,) f32 per-token scales of x (M, K): dynamic, or the static `scale` (a row
  beyond it: its own dynamic scale)."""
  x = _f32(x)
  bad = ~np.isfinite(x).all(axis=1)
  r = np.float32(1 / QMAX[qtype])
  c = r if inv_smooth is None else np.abs(_f32(inv_smooth)) * r
  with np.errstate(over="ignore", invalid="ignore"):
    amax = np.max(np.abs(x) * c, axis=1, initial=0.0).astype(np.float32)
  sx = scale_from_amax(amax)
  if scale is not None:  # the static scale, or a row's own where it is beyond it
    sx = np.where(np.isnan(sx), sx, np.maximum(np.float32(scale), np.where(amax < F32_TINY, np.float32(0), sx)))
  return np.where(bad, np.float32(np.nan), sx).astype(np.float32)


def quantize_rows(x, inv_smooth=None, *, qtype="int8", scale=None):
  """(xq, sx): xq int8, or the e4m3 values as f32 for fp8; rows whose scale is NaN
  (their output is NaN whatever xq holds) are zeros. Also returns `overflow`: rows of a
  static scale where a finite x * (1/sx) overflows to Inf (saturated here; the library
  may instead mark such a row NaN, see actquant_jax/ops.py _marks_nonfinite)."""
  x = _f32(x)
  sx = row_scales(x, inv_smooth, qtype=qtype, scale=scale)
  with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
    r = np.float32(1) / sx
    f = r[:, None] if inv_smooth is None else _f32(inv_smooth)[None, :] * r[:, None]
    y = x * f
  nan_row = np.isnan(sx)
  y = np.where(nan_row[:, None], np.float32(0), y)
  overflow = ~nan_row & np.isinf(y).any(axis=1)
  return saturate(y, qtype), sx, overflow


def accumulate(xq, wq):
  """xq (M, K) @ wq (N, K)^T, exactly: int64 for int8; float64 for e4m3 values (products
  of 4-bit significands within 2^-18..2^18: the sum is exact in float64 for these K)."""
  if np.asarray(xq).dtype == np.int8:
    return np.asarray(xq, np.int64) @ np.asarray(wq, np.int64).T
  return np.asarray(xq, np.float64) @ np.asarray(wq, np.float64).T


def _round_f64_to_f32(hi, lo):
  """f32 of the exact hi + lo (hi = fl64(hi + lo)): round to odd in float64 first, then
  to f32 -- one correct rounding, no double-rounding error."""
  odd = np.frexp(hi)[0] * 2.0**53 % 2 == 1
  nudge = (lo != 0) & ~odd & np.isfinite(hi)
  hi = np.where(nudge, np.nextafter(hi, np.where(lo > 0, np.inf, -np.inf)), hi)
  return hi.astype(np.float32)


def epilogue(acc, sx, sw, bias=None, *, fma=False):
  """y = f32(f32(f32(acc) * sw) * sx) + bias, all in f32 (fma=True: the last multiply-add
  rounded once)."""
  with np.errstate(over="ignore", invalid="ignore"):
    acc32 = np.asarray(acc).astype(np.float32)  # the exact sum rounded once (RNE)
    u = acc32 * _f32(sw)[None, :]
    if bias is None:
      return u * _f32(sx)[:, None]
    b = _f32(bias)[None, :]
    if not fma:
      return (u * _f32(sx)[:, None]) + b
    p = u.astype(np.float64) * _f32(sx).astype(np.float64)[:, None]  # exact: 24 + 24 bits
    s = p + b
    lo = (p - (s - (s - p))) + (b - (s - p))  # TwoSum: s + lo == p + b exactly
    return np.where(np.isfinite(s), _round_f64_to_f32(s, np.nan_to_num(lo)), s.astype(np.float32))


def cast(y, dtype):
  """f32 -> out dtype (round to nearest even), returned as f32 values. bfloat16 by its
  bits (numpy has no bfloat16)."""
  y = _f32(y)
  name = np.dtype(dtype).name
  if name == "float32":
    return y
  if name == "float16":
    with np.errstate(over="ignore"):
      return y.astype(np.float16).astype(np.float32)
  assert name == "bfloat16", name
  bits = y.view(np.uint32).astype(np.uint64)
  bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
  return np.where(np.isnan(y), y, bits.astype(np.uint32).view(np.float32))


def w8a8(x2d, values, scale, *, qtype="int8", act_scale=None, inv_smooth=None, bias=None):
  """The whole w8a8_dot of x2d (M, K) with a QuantizedKernel's arrays, before the output
  cast: dict of xq, sx, overflow, acc (exact), y and y_fma (f32)."""
  xq, sx, overflow = quantize_rows(x2d, inv_smooth, qtype=qtype, scale=act_scale)
  wq = np.asarray(values, np.int8) if qtype == "int8" else _f32(values)
  acc = accumulate(xq, wq)
  return dict(xq=xq, sx=sx, overflow=overflow, acc=acc, y=epilogue(acc, sx, scale, bias),
              y_fma=epilogue(acc, sx, scale, bias, fma=True))


def quantize_groups(x, qtype="int8", axes=None):
  """aq.quantize's dynamic scale over `axes` (keepdims) and its values: the group's
  absmax * f32(1/qmax) (1 for zero / subnormal-scale groups, NaN for a group holding
  NaN/Inf), then saturate(x * (1/scale))."""
  x = _f32(x)
  axes = tuple(range(x.ndim)) if axes is None else tuple(axes)
  with np.errstate(invalid="ignore"):
    amax = np.max(np.abs(x), axis=axes, keepdims=True, initial=0.0)
  s = scale_from_amax(amax * np.float32(1 / QMAX[qtype]))
  s = np.where(np.isfinite(x).all(axis=axes, keepdims=True), s, np.float32(np.nan)).astype(np.float32)
  with np.errstate(invalid="ignore", over="ignore"):
    y = x * (np.float32(1) / s)
  if qtype == "int8":
    y = np.where(np.isnan(y), np.float32(0), y)  # NaN groups: values unspecified
  return saturate(y, qtype), s


def quantize_weight(w, qtype="int8"):
  """aq.quantize_kernel of a (K, N) float weight: (values (N, K), scale (N,)), one scale
  per output channel from the absmax over K."""
  values, s = quantize_groups(_f32(w).T, qtype, axes=(1,))
  return values, s[:, 0]


OUT_EPS = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}  # half an ulp, relative


def assert_w8a8(got2d, x2d, qk, bias, out_dtype):
  """got2d (M, N), a w8a8_dot of x2d (M, K) with the QuantizedKernel qk, against the spec.
  int8: bit for bit, each element the two-rounding epilogue or its FMA contraction (XLA
  may contract u * sx + bias). fp8: the f32 accumulation order is unspecified, so within
  (K + 4) * 2^-24 of the scaled sum |products| (+ |bias|), plus half an ulp of the output
  dtype. Static rows whose x * (1/sx) overflows: saturated (the spec) or all non-finite
  (a marked row, see quantize_rows)."""
  got = _f32(got2d)
  values = np.asarray(qk.values)
  values = values if qk.qtype == "int8" else values.astype(np.float32)
  o = w8a8(_f32(x2d), values, qk.scale, qtype=qk.qtype,
           act_scale=None if qk.act_scale is None else np.float32(qk.act_scale),
           inv_smooth=None if qk.inv_smooth is None else _f32(qk.inv_smooth), bias=bias)
  name = np.dtype(out_dtype).name
  want, want_fma = cast(o["y"], name), cast(o["y_fma"], name)
  assert got.shape == want.shape, (got.shape, want.shape)
  flagged = o["overflow"] & ~np.isfinite(got).all(axis=1)
  assert (~np.isfinite(got[flagged])).all()
  got, want, want_fma = got[~flagged], want[~flagged], want_fma[~flagged]
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  if qk.qtype == "int8":
    same = (got == want) | (got == want_fma) | (np.isnan(got) & np.isnan(want))
    assert same.all(), (got[~same][:4], want[~same][:4], want_fma[~same][:4])
    return
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  xq, sx = o["xq"][~flagged], o["sx"][~flagged]
  mag = (np.abs(xq).astype(np.float64) @ np.abs(values).astype(np.float64).T) * _f32(qk.scale)[None] * sx[:, None]
  if bias is not None:
    mag = mag + np.abs(_f32(bias))[None]
  tol = (xq.shape[1] + 4) * 2.0**-24 * mag + OUT_EPS[name] * np.abs(want) + (6e-8 if name == "float16" else 0)
  fin = np.isfinite(want)
  got, want, tol = got[fin], want[fin], tol[fin]
  bad = np.abs(got.astype(np.float64) - want) > tol
  assert not bad.any(), (got[bad][:4], want[bad][:4], tol[bad][:4])
