"""GPTQ weight rounding: the blocked jitted version against a plain numpy GPTQ, what it buys
on held-out inputs, sink rows, and how quantize_params uses it."""

import jax.numpy as jnp
import numpy as np
import pytest

import actquant_jax as aq
from actquant_jax import gptq


def _gptq_numpy(w_kn, x, qtype):
  """GPTQ as the paper writes it, one input channel at a time, float64, (N, K) layout:
  q_i = round(w_i), e = (w_i - q_i) / U_ii, W[:, i+1:] -= e U[i, i+1:], with H from
  unit-norm rows (gptq.hessian) and the same damping."""
  w = np.asarray(w_kn, np.float64).T.copy()  # (N, K)
  xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)
  h = xn.T @ xn
  h += gptq.DAMP * np.mean(np.diag(h)) * np.eye(h.shape[0])
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  qmax = 127.0 if qtype == "int8" else 448.0
  scale = np.asarray(aq.compute_scale(jnp.asarray(w_kn, jnp.float32), qtype, granularity="channel", axis=1),
                     np.float64).reshape(-1)
  q = np.zeros_like(w)
  for i in range(w.shape[1]):
    y = np.clip(w[:, i] / scale, -qmax, qmax)
    qi = np.round(y) if qtype == "int8" else np.asarray(jnp.asarray(y, jnp.float32).astype(jnp.float8_e4m3fn),
                                                          np.float64)
    q[:, i] = qi
    e = (w[:, i] - qi * scale) / u[i, i]
    w[:, i + 1:] -= np.outer(e, u[i, i + 1:])
  return q, scale


def _deq(values, scale):
  return np.asarray(values.astype(jnp.float32), np.float64).T * np.asarray(scale, np.float64)[None, :]  # (K, N)


def _correlated(rng, rows, k):
  mix = np.eye(k) + 0.4 * rng.standard_normal((k, k))
  return (rng.standard_normal((rows, k)) @ mix).astype(np.float32)


@pytest.mark.parametrize("qtype", ["int8", "float8_e4m3fn"])
def test_blocked_gptq_is_the_plain_algorithm(qtype):
  # K = 40 with blocks of 16: three blocks, the last one padded.
  rng = np.random.default_rng(0)
  w = rng.standard_normal((40, 24)).astype(np.float32)
  x = _correlated(rng, 200, 40)
  values, scale = gptq.round_weight(jnp.asarray(w), gptq.hessian(jnp.asarray(x)), qtype=qtype, block=16)
  q_ref, scale_ref = _gptq_numpy(w, x.astype(np.float64), qtype)
  np.testing.assert_allclose(np.asarray(scale), scale_ref, rtol=1e-6)
  same = np.asarray(values.astype(jnp.float32)).T == q_ref.T  # f32 vs f64: a near-tie may round apart
  assert same.mean() > 0.99, same.mean()


@pytest.mark.parametrize("qtype", ["int8", "float8_e4m3fn"])
def test_identity_hessian_is_nearest_rounding(qtype):
  # Uncorrelated unit inputs: no error to move, GPTQ must be nearest rounding bit for bit.
  w = np.random.default_rng(1).standard_normal((96, 32)).astype(np.float32)
  values, scale = gptq.round_weight(jnp.asarray(w), jnp.eye(96), qtype=qtype)
  qk = aq.quantize_kernel(jnp.asarray(w), qtype)
  np.testing.assert_array_equal(np.asarray(values.astype(jnp.float32)), np.asarray(qk.values.astype(jnp.float32)))
  np.testing.assert_array_equal(np.asarray(scale), np.asarray(qk.scale))


@pytest.mark.parametrize("qtype", ["int8", "float8_e4m3fn"])
def test_gptq_beats_nearest_on_held_out_rows(qtype):
  rng = np.random.default_rng(2)
  k, n = 128, 48
  w = rng.standard_normal((k, n)).astype(np.float32)
  mix = np.eye(k) + 0.4 * rng.standard_normal((k, k))
  calib, held = [(rng.standard_normal((r, k)) @ mix).astype(np.float32) for r in (512, 512)]
  values, scale = gptq.round_weight(jnp.asarray(w), gptq.hessian(jnp.asarray(calib)), qtype=qtype)
  qk = aq.quantize_kernel(jnp.asarray(w), qtype)
  err = lambda wq: np.linalg.norm(held @ (w - wq))
  assert err(_deq(values, scale)) < 0.85 * err(_deq(qk.values, qk.scale))


def test_a_sink_row_does_not_set_the_hessian():
  # One row 1000x the others (an attention sink). With rows weighted by their norm, H would
  # be that row's outer product and GPTQ would fit it alone; at unit norm the ordinary
  # rows still get the compensation.
  rng = np.random.default_rng(3)
  k, n = 96, 32
  w = rng.standard_normal((k, n)).astype(np.float32)
  mix = np.eye(k) + 0.4 * rng.standard_normal((k, k))
  calib, held = [(rng.standard_normal((r, k)) @ mix).astype(np.float32) for r in (400, 400)]
  calib[0] = 1000.0 * rng.standard_normal(k)
  values, scale = gptq.round_weight(jnp.asarray(w), gptq.hessian(jnp.asarray(calib)), qtype="int8")
  qk = aq.quantize_kernel(jnp.asarray(w))
  err = lambda wq: np.linalg.norm(held @ (w - wq))
  assert err(_deq(values, scale)) < 0.85 * err(_deq(qk.values, qk.scale))


def test_quantize_params_rounds_by_gptq_and_reports_where_it_cannot():
  # weight_rounding="gptq" rounds by GPTQ wherever a layer has >= K calibration rows;
  # with too few rows the layer is rounded to nearest and the report says why.
  import jax
  import flax.linen as nn

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(16, name="fc2")(nn.gelu(nn.Dense(64, name="fc1")(x)))

  rng = np.random.default_rng(4)
  model = MLP()
  x = jnp.asarray(_correlated(rng, 256, 32))
  params = model.init(jax.random.key(0), x)
  cfg = dict(alpha=None, rotate=False)
  gptq_cfg = aq.QuantConfig(weight_rounding="gptq", **cfg)
  few = aq.calibrate(model, params, [x[:40]])  # 40 rows: >= K of fc1 (32), < K of fc2 (64)
  q, rep = aq.quantize_params_with_report(params, few, gptq_cfg)
  qn = aq.quantize_params(params, few, aq.QuantConfig(weight_rounding="nearest", **cfg))
  assert "GPTQ" not in rep["fc1"].note
  assert not np.array_equal(np.asarray(q["params"]["fc1"]["kernel"].values),
                            np.asarray(qn["params"]["fc1"]["kernel"].values))
  assert "not by GPTQ: 40 calibration rows for K = 64" in rep["fc2"].note
  np.testing.assert_array_equal(np.asarray(q["params"]["fc2"]["kernel"].values),
                                np.asarray(qn["params"]["fc2"]["kernel"].values))
  # held-out rows: the GPTQ-rounded fc1 is closer to float
  held = jnp.asarray(_correlated(np.random.default_rng(4), 256, 32))
  full = aq.calibrate(model, params, [x])
  qg = aq.quantize_params(params, full, gptq_cfg)
  qn = aq.quantize_params(params, full, aq.QuantConfig(weight_rounding="nearest", **cfg))
  y = model.apply(params, held)
  apply = aq.quantized_apply(model)
  e = lambda qp: float(jnp.linalg.norm(apply(qp, held) - y))
  assert e(qg) < e(qn)


def test_bad_weight_rounding_is_named():
  with pytest.raises(aq.QuantizationError, match="weight_rounding must be one of"):
    aq.QuantConfig(weight_rounding="round")


def test_mismatched_hessian_is_named():
  with pytest.raises(aq.QuantizationError, match=r"w_kn must be \(K, N\) and h \(K, K\)"):
    gptq.round_weight(jnp.ones((8, 4)), jnp.eye(6), qtype="int8")
