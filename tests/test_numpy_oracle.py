"""reference.py's formulas and the public quantize entry points against the independent
numpy oracle (tests/numpy_oracle.py): bit for bit wherever the spec fixes every rounding.
The kernel tests compare the kernels with reference.py; this file ties reference.py to
the spec."""

import functools
from fractions import Fraction

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import actquant_jax as aq
from pallas_kernels import reference as ref
from tests import numpy_oracle as oracle
from tests.kernel_utils import pairwise


def _bits(a):
  """f32 bit patterns (NaNs of any payload as one), for exact comparisons."""
  a = np.asarray(a, np.float32)
  return np.where(np.isnan(a), np.uint32(0x7FC00000), a.view(np.uint32))


def _assert_bits_equal(got, want, what):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  bad = _bits(got) != _bits(want)
  assert not bad.any(), f"{what}: {bad.sum()} of {bad.size} differ, e.g. got {got[bad][:4]} want {want[bad][:4]}"


def test_oracle_roundings_match_ml_dtypes():
  # The oracle's own e4m3 and bfloat16 roundings (written with frexp / bit arithmetic)
  # against ml_dtypes on every e4m3 value, every midpoint between neighbours and randoms.
  grid = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
  grid = np.unique(grid[np.isfinite(grid)])
  mids = (grid[:-1] + grid[1:]) / 2
  rng = np.random.default_rng(0)
  y = np.concatenate([grid, mids, rng.uniform(-448, 448, 4000), rng.standard_normal(4000) * 2.0**-7])
  y = np.clip(y.astype(np.float32), -448, 448)
  _assert_bits_equal(oracle.round_e4m3(y), y.astype(ml_dtypes.float8_e4m3fn).astype(np.float32), "e4m3")
  z = np.concatenate([rng.standard_normal(4000) * 1e3, [3.4e38, -3.39e38, 1e-40, np.inf, 0.0]]).astype(np.float32)
  z = np.concatenate([z, np.asarray([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8], np.float32)])  # ties
  _assert_bits_equal(oracle.cast(z, jnp.bfloat16), z.astype(ml_dtypes.bfloat16).astype(np.float32), "bf16")


def _f32_nearest(v):
  """The f32 nearest the Fraction v (ties to even), by exact comparison with neighbours."""
  c = np.float32(float(v))
  cands = [c, np.nextafter(c, np.float32(np.inf)), np.nextafter(c, np.float32(-np.inf))]
  key = lambda f: (abs(Fraction(float(f)) - v), int(np.float32(f).view(np.uint32)) & 1)
  return min(cands, key=key)


def test_oracle_fma_variant_is_one_rounding(rng):
  # fma=True: u * sx + b rounded once (u = f32(acc * sw)), against exact rationals;
  # b near -u * sx so the sum cancels and the rounding of the product matters.
  u = rng.uniform(0.5, 2, 400).astype(np.float32)
  sx = rng.uniform(0.5, 2, 400).astype(np.float32)
  b = -(u * sx) * np.float32(1 - 2.0**-12) * rng.choice(np.float32([1, 1 + 2.0**-20]), 400)
  b = b.astype(np.float32)
  got = np.diag(oracle.epilogue(np.ones((400, 400), np.int64), sx, u, b, fma=True))
  want = np.array([_f32_nearest(Fraction(float(a)) * Fraction(float(s)) + Fraction(float(c)))
                   for a, s, c in zip(u, sx, b)], np.float32)
  _assert_bits_equal(got, want, "fma")
  unfused = np.diag(oracle.epilogue(np.ones((400, 400), np.int64), sx, u, b))
  assert (unfused != got).mean() > 0.3  # the two variants really differ here


def _rows(rng, k, x_scale):
  """Rows at x_scale plus the rows the spec singles out: all zeros, subnormal values only,
  a NaN, an Inf, values near the float max (finite, and beyond it after smoothing)."""
  x = (rng.standard_normal((10, k)) * x_scale).astype(np.float32)
  x[0] = 0.0
  x[1] = rng.standard_normal(k) * 1e-39
  x[2, -1], x[3, 0], x[4, 0], x[5, -1] = np.nan, np.inf, -3.3e38, 3e38
  return x


@pytest.mark.parametrize("qtype", aq.quant.QTYPES)
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("smooth", [None, "pos", "signed"])
@pytest.mark.parametrize("in_dtype", ["float32", "bfloat16"])
def test_quantize_rows_ref_is_the_spec(qtype, static, smooth, in_dtype, rng):
  for k in (1, 64):
    for x_scale in (1e-35, 1e-3, 1.0, 1e30):
      x = jnp.asarray(_rows(rng, k, x_scale), in_dtype)
      inv = None if smooth is None else rng.uniform(0.05, 20, k).astype(np.float32)
      if smooth == "signed":
        inv *= rng.choice(np.float32([-1, 1]), k)
      scale = np.float32(rng.uniform(1e-3, 2)) if static else None
      xq, sx = ref.quantize_rows_ref(x, None if inv is None else jnp.asarray(inv), dtype=aq.qtype_dtype(qtype),
                                     scale=None if scale is None else jnp.float32(scale))
      want_q, want_s, _ = oracle.quantize_rows(np.asarray(x, np.float32), inv, qtype=qtype, scale=scale)
      _assert_bits_equal(sx, want_s, f"sx (k={k}, x_scale={x_scale})")
      ok = ~np.isnan(want_s)  # a NaN row's xq is unspecified (its output row is NaN)
      _assert_bits_equal(np.asarray(xq.astype(jnp.float32))[ok], np.asarray(want_q, np.float32)[ok],
                         f"xq (k={k}, x_scale={x_scale})")


@pytest.mark.parametrize("qtype,static,smooth,with_bias,in_dtype", pairwise(
    aq.quant.QTYPES, [False, True], [None, "pos", "signed"], [False, True], ["float32", "bfloat16", "float16"]))
def test_w8a8_dot_xla_is_the_spec(qtype, static, smooth, with_bias, in_dtype, rng):
  # The public XLA path end to end (jitted), on the spec's special rows, against the oracle
  # (tests/test_properties.py draws random cases; this sweep covers every pair of settings).
  k, n = 64, 24
  x = jnp.asarray(_rows(rng, k, 1.0), in_dtype)
  inv = None if smooth is None else rng.uniform(0.05, 20, k).astype(np.float32)
  if smooth == "signed":
    inv *= rng.choice(np.float32([-1, 1]), k)
  qk = aq.quantize_kernel(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), qtype,
                          act_scale=float(rng.uniform(0.01, 2)) if static else None,
                          inv_smooth=None if inv is None else jnp.asarray(inv))
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32) if with_bias else None
  y = jax.jit(functools.partial(aq.w8a8_dot, backend="xla"))(x, qk, bias)
  assert y.dtype == x.dtype
  oracle.assert_w8a8(np.asarray(y, np.float32), np.asarray(x, np.float32), qk, bias, in_dtype)


def _ties(rng, m, k):
  """x whose x * (1 / 0.125) are all k + 1/2: ties for int8 and, from 8 up, for e4m3."""
  return ((rng.integers(-140, 140, (m, k)) + 0.5) * 0.125).astype(np.float32)


@pytest.mark.parametrize("qtype", aq.quant.QTYPES)
@pytest.mark.parametrize("smooth", [False, True])
def test_ties_round_half_to_even(qtype, smooth, rng):
  # Static scale 0.125 and inv_smooth in {1, 2^-1}: x * (inv * (1/sx)) is exact, so every
  # value is a tie and the rounding mode decides the result.
  x = _ties(rng, 6, 40)
  inv = rng.choice(np.float32([1, 0.5]), 40) if smooth else None
  xq, sx = ref.quantize_rows_ref(jnp.asarray(x), None if inv is None else jnp.asarray(inv),
                                 dtype=aq.qtype_dtype(qtype), scale=jnp.float32(0.125))
  want_q, want_s, _ = oracle.quantize_rows(x, inv, qtype=qtype, scale=np.float32(0.125))
  _assert_bits_equal(sx, want_s, "sx")
  _assert_bits_equal(xq.astype(jnp.float32), np.asarray(want_q, np.float32), "xq")
  # The public path end to end, on the same ties: w8a8_dot (XLA) is the spec's product.
  w = rng.standard_normal((40, 12)).astype(np.float32)
  b = rng.standard_normal(12).astype(np.float32)
  qk = aq.quantize_kernel(jnp.asarray(w), qtype, act_scale=0.125, inv_smooth=None if inv is None else jnp.asarray(inv))
  y = np.asarray(jax.jit(functools.partial(aq.w8a8_dot, backend="xla"))(jnp.asarray(x), qk, jnp.asarray(b)))
  o = oracle.w8a8(x, qk.values if qtype == "int8" else qk.values.astype(jnp.float32), qk.scale, qtype=qtype,
                  act_scale=np.float32(0.125), inv_smooth=inv, bias=b)
  if qtype == "int8":
    # Bit for bit, up to XLA's FMA contraction of the epilogue's u * sx + bias.
    assert ((y == o["y"]) | (y == o["y_fma"])).all()
  else:
    # f32 accumulation of exact e4m3 products in an unspecified order: K * 2^-24 relative
    # to sum |products| (scaled), plus the epilogue's roundings.
    xq, wq = np.abs(o["xq"]).astype(np.float64), np.abs(np.asarray(qk.values.astype(jnp.float32), np.float64))
    mag = (xq @ wq.T) * np.asarray(qk.scale)[None] * o["sx"][:, None] + np.abs(b)[None]
    assert (np.abs(y - o["y"]) <= (40 + 4) * 2.0**-24 * mag).all()


def _near_ties(rng, qtype, inv, static_scale, m):
  """x (m, K) whose x * (inv * (1/sx)) all land within an ulp of a rounding midpoint
  (k + 1/2 for int8, halfway between e4m3 neighbours for fp8): any other order of the
  multiplications ((x * inv) / sx, x * (inv / sx)) rounds a good share of them the other
  way. Dynamic: column 0 holds each row's max, so sx is known before the others are set."""
  k = len(inv)
  x = np.zeros((m, k), np.float32)
  x[:, 0] = (rng.uniform(1, 5, m) / np.abs(inv[0]) * 50).astype(np.float32)
  sx = oracle.row_scales(x, inv, qtype=qtype, scale=static_scale)
  f = inv[None, :] * (np.float32(1) / sx)[:, None]
  if qtype == "int8":
    t = rng.integers(-120, 121, (m, k)) + 0.5
  else:
    grid = np.unique(np.abs(np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)))
    grid = grid[np.isfinite(grid) & (grid <= 400)]
    t = rng.choice((grid[:-1] + grid[1:]) / 2, (m, k)) * rng.choice([-1, 1], (m, k))
  x[:, 1:] = (t.astype(np.float32) / f)[:, 1:]
  assert (oracle.row_scales(x, inv, qtype=qtype, scale=static_scale) == sx).all()
  return x


@pytest.mark.parametrize("qtype", aq.quant.QTYPES)
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_smoothing_multiplies_into_the_reciprocal(qtype, static, rng):
  # The spec's xq = x * (inv_smooth * (1/sx)), on near-midpoint values where the order of
  # the roundings decides: reference.py and w8a8_dot (XLA) bit for bit.
  inv = (rng.uniform(0.05, 20, 64) * rng.choice([-1, 1], 64)).astype(np.float32)
  scale = np.float32(0.0731) if static else None
  x = _near_ties(rng, qtype, inv, scale, 8)
  xq, sx = ref.quantize_rows_ref(jnp.asarray(x), jnp.asarray(inv), dtype=aq.qtype_dtype(qtype),
                                 scale=None if scale is None else jnp.float32(scale))
  want_q, want_s, _ = oracle.quantize_rows(x, inv, qtype=qtype, scale=scale)
  _assert_bits_equal(sx, want_s, "sx")
  _assert_bits_equal(xq.astype(jnp.float32), np.asarray(want_q, np.float32), "xq")
  if qtype == "int8":
    qk = aq.quantize_kernel(jnp.asarray(rng.standard_normal((64, 16)), jnp.float32), act_scale=scale,
                            inv_smooth=jnp.asarray(inv))
    y = np.asarray(jax.jit(functools.partial(aq.w8a8_dot, backend="xla"))(jnp.asarray(x), qk))
    np.testing.assert_array_equal(y, oracle.w8a8(x, qk.values, qk.scale, act_scale=scale, inv_smooth=inv)["y"])


@pytest.mark.parametrize("smooth", [False, True])
def test_static_mark_mode_marks_the_spec_rows(smooth, rng):
  # nonfinite="mark" (the XLA path on a native-kernel CPU, static int8): exactly the rows
  # holding NaN/Inf are marked; the others are the spec's xq (a row beyond the static
  # scale is on its own scale: nothing overflows).
  for k in (1, 16):
    x = _rows(rng, k, 1.0)
    inv = rng.uniform(0.5, 2, k).astype(np.float32) if smooth else None
    xq, _ = ref.quantize_rows_ref(jnp.asarray(x), None if inv is None else jnp.asarray(inv), scale=jnp.float32(0.01),
                                  nonfinite="mark")
    want_q, _, overflow = oracle.quantize_rows(x, inv, scale=np.float32(0.01))
    marked = ~np.isfinite(x).all(axis=1) | overflow
    assert not marked[5] and not overflow.any()  # 3e38 is beyond 0.01 * 127: its own scale
    np.testing.assert_array_equal(np.isnan(np.asarray(ref.marked_rows_ref(xq))), marked)
    np.testing.assert_array_equal(np.asarray(xq)[~marked], want_q[~marked])


@pytest.mark.parametrize("qtype", aq.quant.QTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16", "float16"])
def test_scaled_matmul_ref_is_the_spec(qtype, with_bias, out_dtype, rng):
  for (m, n, k), scale_exp in zip([(1, 1, 1), (3, 5, 33), (8, 16, 128), (0, 3, 4), (9, 7, 300)], [0, -30, 3, 1, 30]):
    qmax = aq.qtype_max(qtype)
    if qtype == "int8":
      xq, wq = (rng.integers(-127, 128, s).astype(np.int8) for s in ((m, k), (n, k)))
    else:  # e4m3 values over the whole range, subnormals included
      xq, wq = (oracle.round_e4m3(rng.uniform(-qmax, qmax, s) * rng.choice([1, 2.0**-8], s)) for s in ((m, k), (n, k)))
    sx = (rng.uniform(0.5, 2, m) * 2.0**scale_exp).astype(np.float32)
    sw = rng.uniform(1e-3, 1e-1, n).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    dt = aq.qtype_dtype(qtype)
    y = ref.scaled_matmul_ref(jnp.asarray(xq, dt), jnp.asarray(wq, dt), jnp.asarray(sx), jnp.asarray(sw),
                              None if bias is None else jnp.asarray(bias), out_dtype)  # eager: no FMA
    assert y.dtype == jnp.dtype(out_dtype) and y.shape == (m, n)
    want = oracle.cast(oracle.epilogue(oracle.accumulate(xq, wq), sx, sw, bias), out_dtype)
    if qtype == "int8":
      # The exact integer sum rounded once, then two (with bias three) f32 roundings.
      _assert_bits_equal(y, want, f"y {m, n, k}")
      continue
    # f32 accumulation of exact e4m3 products, order unspecified: |error| <= K * 2^-24 *
    # sum |products| (scaled), plus the output cast's half ulp and the epilogue's 3 ulps.
    mag = (np.abs(xq).astype(np.float64) @ np.abs(wq).astype(np.float64).T) * sw[None] * sx[:, None]
    out_eps = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}[out_dtype]
    tol = (k + 3) * 2.0**-24 * mag + out_eps * np.abs(want) + (6e-8 if out_dtype == "float16" else 0)
    got = np.asarray(y, np.float64)
    np.testing.assert_array_equal(got[~np.isfinite(want)], want[~np.isfinite(want)])  # float16 overflows
    fin = np.isfinite(want)
    assert (np.abs(got[fin] - want[fin]) <= tol[fin]).all()


@pytest.mark.parametrize("k", [ref.K_CHUNK + 5])
def test_chunked_accumulation_is_the_spec(k, rng):
  # K beyond one int32 chunk: the exact sum, rounded once to f32, then the epilogue.
  xq = rng.choice(np.array([127, -127, 126, 3], np.int8), size=(2, k))
  wq = rng.choice(np.array([127, -127, 1], np.int8), size=(3, k))
  xq[0], wq[0] = 127, 127
  sx, sw = np.float32([0.5, 3.0]), np.float32([1e-3, 2.0, 0.25])
  y = ref.scaled_matmul_ref(jnp.asarray(xq), jnp.asarray(wq), jnp.asarray(sx), jnp.asarray(sw), out_dtype=jnp.float32)
  _assert_bits_equal(y, oracle.epilogue(oracle.accumulate(xq, wq), sx, sw), "y")


@pytest.mark.parametrize("qtype", aq.quant.QTYPES)
@pytest.mark.parametrize("granularity", ["tensor", "channel", "token"])
def test_quantize_is_the_spec(qtype, granularity, rng):
  for shape, axis in [((5,), 0), ((6, 40), 0), ((6, 40), -1), ((2, 3, 50), 1), ((4, 0), 0)]:
    for x_scale in (1e-39, 1e-3, 1.0, 1e36):
      x = (rng.standard_normal(shape) * x_scale).astype(np.float32)
      if x.ndim == 2 and x.size:
        x[1], x[2, 3], x[3, 0] = 0.0, np.nan, -3.3e38  # a zero group, a NaN group, near the float max
      axes = {"tensor": tuple(range(x.ndim)), "token": (x.ndim - 1,),
              "channel": tuple(i for i in range(x.ndim) if i != axis % x.ndim)}[granularity]
      q = aq.quantize(jnp.asarray(x), qtype, granularity=granularity, axis=axis)
      want_v, want_s = oracle.quantize_groups(x, qtype, axes)
      _assert_bits_equal(q.scale, want_s, f"scale {shape} {x_scale}")
      ok = np.broadcast_to(np.isfinite(want_s), x.shape)  # a NaN group's values are unspecified
      _assert_bits_equal(np.asarray(q.values.astype(jnp.float32))[ok], np.asarray(want_v, np.float32)[ok],
                         f"values {shape} {x_scale}")


@pytest.mark.parametrize("qtype", aq.quant.QTYPES)
def test_quantize_kernel_is_the_spec(qtype, rng):
  # Per output channel: scale = absmax over K * f32(1/qmax); a zero column and one whose
  # scale would be subnormal get scale 1 (and zeros), an outlier column its own scale.
  w = rng.standard_normal((48, 64)).astype(np.float32)
  w[:, 1] = 0.0
  w[:, 2] *= 1e-37
  w[5, 3] = -3e38
  inv = rng.uniform(0.5, 2, 48).astype(np.float32)
  qk = aq.quantize_kernel(jnp.asarray(w), qtype, inv_smooth=jnp.asarray(inv))
  want_v, want_s = oracle.quantize_weight(w, qtype)
  _assert_bits_equal(qk.scale, want_s, "scale")
  _assert_bits_equal(qk.values.astype(jnp.float32), np.asarray(want_v, np.float32), "values")
  assert want_s[1] == want_s[2] == 1.0
