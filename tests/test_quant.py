import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import actquant_jax as aq
from actquant_jax import quant


def test_int8_rounds_half_to_even():
  x = jnp.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 3.49999], jnp.float32)
  q = quant.quantize_with_scale(x, jnp.float32(1.0), "int8")
  np.testing.assert_array_equal(np.asarray(q), [0, 2, 2, 0, -2, -2, 126, 3])
  assert q.dtype == jnp.int8


def test_int8_saturates_symmetric():
  x = jnp.array([1e9, -1e9, 127.6, -128.0, jnp.float32(np.finfo(np.float32).max)], jnp.float32)
  q = quant.quantize_with_scale(x, jnp.float32(1.0), "int8")
  np.testing.assert_array_equal(np.asarray(q), [127, -127, 127, -127, 127])  # never -128


def test_fp8_saturates_instead_of_nan():
  x = jnp.array([448.0, 449.0, 500.0, -1e6, 0.3], jnp.float32)
  q = quant.quantize_with_scale(x, jnp.float32(1.0), "float8_e4m3fn")
  assert q.dtype == jnp.float8_e4m3fn
  np.testing.assert_array_equal(np.asarray(q.astype(jnp.float32)), [448, 448, 448, -448, 0.3125])


@pytest.mark.parametrize("qtype", aq.quant.QTYPES)
@pytest.mark.parametrize("granularity,axis,scale_shape", [
    ("tensor", -1, (1, 1, 1)), ("channel", 0, (4, 1, 1)), ("channel", 1, (1, 5, 1)),
    ("channel", -1, (1, 1, 6)), ("token", -1, (4, 5, 1))])
def test_granularity_scale_shapes(qtype, granularity, axis, scale_shape, rng):
  x = jnp.asarray(rng.standard_normal((4, 5, 6)), jnp.float32)
  q = aq.quantize(x, qtype, granularity=granularity, axis=axis)
  assert q.scale.shape == scale_shape and q.scale.dtype == jnp.float32
  assert q.values.dtype == aq.qtype_dtype(qtype)
  # The absmax of each group maps exactly onto qmax.
  reduce = tuple(i for i, s in enumerate(scale_shape) if s == 1)
  amax = np.max(np.abs(np.asarray(q.values.astype(jnp.float32))), axis=reduce)
  np.testing.assert_array_equal(amax, aq.qtype_max(qtype))


def test_per_channel_isolates_outlier_channel(rng):
  # One outlier column: per-tensor scale zeroes the small columns, per-channel does not.
  x = rng.standard_normal((64, 8)).astype(np.float32) * 0.01
  x[:, 3] *= 10000
  xt = aq.quantize(jnp.asarray(x), granularity="tensor")
  xc = aq.quantize(jnp.asarray(x), granularity="channel", axis=1)
  small = np.delete(np.arange(8), 3)
  assert np.all(np.asarray(xt.values)[:, small] == 0)
  err_c = np.abs(np.asarray(xc.dequantize()) - x)[:, small].max()
  assert err_c < 0.01 * np.abs(x[:, small]).max()


@pytest.mark.parametrize("qtype", aq.quant.QTYPES)
@pytest.mark.parametrize("granularity", ["tensor", "channel", "token"])
def test_zero_groups_round_trip_to_exact_zero(qtype, granularity):
  x = jnp.zeros((3, 4), jnp.float32).at[1].set(jnp.array([1.0, -2.0, 3.0, 0.5]))
  q = aq.quantize(x, qtype, granularity=granularity, axis=0)
  assert np.all(np.isfinite(np.asarray(q.scale)))
  dq = np.asarray(q.dequantize())
  assert np.all(np.isfinite(dq))
  np.testing.assert_array_equal(dq[0], 0.0)
  np.testing.assert_array_equal(dq[2], 0.0)
  z = aq.quantize(jnp.zeros((2, 2)), qtype, granularity=granularity)
  np.testing.assert_array_equal(np.asarray(z.dequantize()), 0.0)


finite_f32 = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)

# Each new (shape, granularity) costs a fresh XLA compile of the eager ops (~0.5 s), the
# values nothing: the properties below draw their values freely but their shapes from a
# fixed set that puts a length-1 axis in every position (a group of one element, a
# reduction over one element) next to longer ones, in every rank the property covers.
SHAPES_2D_3D = [(1, 1), (1, 9), (9, 1), (5, 7), (3, 1, 6), (2, 9, 9)]
SHAPES_1D_2D = [(1,), (9,), (1, 9), (9, 1), (5, 7)]


def arrays_of(shapes):
  return st.sampled_from(shapes).flatmap(lambda s: hnp.arrays(np.float32, s, elements=finite_f32))


@settings(max_examples=60, deadline=None)
@given(arrays_of(SHAPES_2D_3D), st.sampled_from(["tensor", "channel", "token"]))
def test_int8_error_bound(x, granularity):
  q = aq.quantize(jnp.asarray(x), "int8", granularity=granularity, axis=0)
  err = np.abs(np.asarray(q.dequantize()) - x)
  scale = np.broadcast_to(np.asarray(q.scale), x.shape)
  # Half a step, plus f32 rounding of x / scale and of the product (a few ulps of |x|).
  assert np.all(err <= scale / 2 * (1 + 1e-5) + 4 * np.spacing(np.abs(x)) + 127 * 2.0**-126), err.max()


@settings(max_examples=60, deadline=None)
@given(arrays_of(SHAPES_1D_2D))
def test_fp8_relative_error_bound(x):
  # e4m3 has 3 mantissa bits: relative error <= 2^-4 for normals; subnormal step is
  # 2^-9 * scale, so the absolute error is at most half of that near zero.
  q = aq.quantize(jnp.asarray(x), "float8_e4m3fn", granularity="token")
  err = np.abs(np.asarray(q.dequantize()) - x)
  scale = np.broadcast_to(np.asarray(q.scale), x.shape)
  # Groups with absmax < 448 * 2^-126 are zero groups (their scale would be subnormal).
  assert np.all(err <= np.abs(x) * 2.0**-4 * (1 + 1e-5) + scale * 2.0**-10 + 448 * 2.0**-126)


def test_static_scale_saturates_and_checks_shape():
  x = jnp.array([[0.5, 10.0], [-20.0, 1.0]])
  q = aq.quantize(x, scale=jnp.float32(0.05))
  np.testing.assert_array_equal(np.asarray(q.values), [[10, 127], [-127, 20]])
  with pytest.raises(ValueError, match="does not broadcast"):
    aq.quantize(x, scale=jnp.ones((3,)))


def test_bad_inputs():
  with pytest.raises(ValueError, match="qtype"):
    aq.quantize(jnp.ones(3), "int4")
  with pytest.raises(TypeError, match="floating-point"):
    aq.quantize(jnp.ones(3, jnp.int32))
  with pytest.raises(ValueError, match="granularity"):
    aq.quantize(jnp.ones(3), granularity="row")
  with pytest.raises(ValueError, match="out of range"):
    aq.quantize(jnp.ones((2, 3)), granularity="channel", axis=2)


def test_qarray_is_a_pytree_under_jit(rng):
  x = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)
  q = jax.jit(lambda x: aq.quantize(x, granularity="token"))(x)
  leaves, tree = jax.tree_util.tree_flatten(q)
  assert len(leaves) == 2
  q2 = jax.tree_util.tree_unflatten(tree, leaves)
  assert q2.qtype == "int8"
  np.testing.assert_array_equal(np.asarray(jax.jit(aq.dequantize)(q)), np.asarray(q.dequantize()))


def test_quantize_kernel_layout_and_errors(rng):
  w = rng.standard_normal((32, 12)).astype(np.float32)
  qk = aq.quantize_kernel(jnp.asarray(w))
  assert qk.values.shape == (12, 32) and qk.scale.shape == (12,) and qk.shape == (32, 12)
  np.testing.assert_allclose(np.asarray(qk.dequantize()), w, atol=np.abs(w).max() / 127)
  w_bad = w.copy()
  w_bad[3, 4] = np.nan
  with pytest.raises(ValueError, match="blocks.0.fc1: kernel: contains 1 NaN"):
    aq.quantize_kernel(jnp.asarray(w_bad), name="blocks.0.fc1")
  with pytest.raises(ValueError, match="fc: expected a 2-D"):
    aq.quantize_kernel(jnp.ones((2, 3, 4)), name="fc")
  with pytest.raises(ValueError, match=r"inv_smooth must have shape \(32,\)"):
    aq.quantize_kernel(jnp.asarray(w), inv_smooth=jnp.ones(12))
  with pytest.raises(aq.QuantizationError, match=r"act_scale must be in \(0, 2\^126\]"):
    aq.quantize_kernel(jnp.asarray(w), act_scale=0.0)
  with pytest.raises(ValueError, match="act_scale: contains"):
    aq.quantize_kernel(jnp.asarray(w), act_scale=np.inf)
