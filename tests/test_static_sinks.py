"""Static scales on activations with sink tokens (massive rows, as real LLMs have at the
first position and at <|endoftext|>): the scale ignores them, they are scaled on their own
at run time, the report says so; static scales on rotated rows."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import actquant_jax as aq
from actquant_jax import smooth
from pallas_kernels import reference


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(48, use_bias=False, name="down")(x)


def _batch(rng, b=4, t=16, k=64, sink=3000.0):
  """Rows ~N(0, 1) with two outlier channels (x20); position 0 of every sequence a sink
  (massive values in three channels, as a real model's)."""
  x = rng.standard_normal((b, t, k)).astype(np.float32)
  x[..., [5, 40]] *= 20.0
  x[:, 0, [1, 2, 3]] = sink
  return x


def test_static_scale_ignores_sink_rows():
  rng = np.random.default_rng(0)
  rows = rng.standard_normal((200, 32)).astype(np.float32)
  rows[7, 3] = 5000.0  # a sink
  rows[:20] *= 6.0  # a few tokens with larger rows: their absmax is not everyone's range
  r = smooth.calibration_row_absmax(rows)
  assert smooth.sink_rows(r).tolist() == [i == 7 for i in range(200)]
  # numpy oracle: the grid fraction of the non-sink absmax whose clipped int8 rounding has
  # the least mean per-row relative error over the non-sink rows
  ordinary = np.delete(rows, 7, axis=0).astype(np.float64)
  amax = np.abs(ordinary).max()
  def rel_err(scale):
    q = np.clip(np.round(ordinary / scale), -127, 127) * scale
    return np.mean(np.sum((q - ordinary) ** 2, 1) / np.sum(ordinary ** 2, 1))
  errs = [rel_err(amax * f / 127) for f in smooth.CLIP_GRID]
  want = amax * smooth.CLIP_GRID[int(np.argmin(errs))] / 127
  assert want < 0.9 * amax / 127  # the absmax is not the best range here
  scale, beyond, sinks, n = smooth.static_scale_of_rows(rows, None, "int8")
  assert scale == pytest.approx(want, rel=1e-5)
  assert (sinks, n) == (1, 200) and beyond == int((r > scale * 127).sum()) and 1 <= beyond <= 21
  s = np.full(32, 2.0, np.float32)  # the scale of X / s
  assert smooth.static_act_scale(rows, s, "int8") == pytest.approx(want / 2, rel=1e-5)


def test_static_row_scale_is_the_calibrated_one_within_it_and_its_own_beyond():
  scale = np.float32(0.01)
  amax = jnp.asarray([0.0, 0.5, 1.27, 2.54, 1000.0, np.inf], jnp.float32) / 127
  got = np.asarray(reference.static_row_scale(scale, amax))
  np.testing.assert_allclose(got[:3], [0.01, 0.01, 0.01])
  np.testing.assert_allclose(got[3:5], [0.02, 1000.0 / 127], rtol=1e-6)
  assert np.isnan(got[5])
  x = jnp.asarray([[0.5, -1.0], [100.0, 3.0]], jnp.float32)
  xq, sx = reference.quantize_rows_ref(x, scale=scale)
  np.testing.assert_array_equal(np.asarray(xq), [[50, -100], [127, 4]])  # the sink row: not saturated
  np.testing.assert_allclose(np.asarray(sx), [0.01, 100.0 / 127], rtol=1e-6)


@pytest.mark.parametrize("rotate", [False, True])
def test_planted_sink_static_model(rotate):
  # Calibrated on text-like batches whose first position is a sink: the static scale is
  # set by the ordinary rows, the ordinary rows of new data come out close (a scale set by
  # the sink, 3000 / 127, would round them to zeros), the sink row too (on its own scale),
  # and the report names the sink rows.
  rng = np.random.default_rng(1)
  model = Mlp()
  params = model.init(jax.random.key(0), jnp.zeros((1, 1, 64)))
  stats = aq.calibrate(model, params, [jnp.asarray(_batch(rng)) for _ in range(4)], progress=False)
  qparams, report = aq.quantize_params_with_report(params, stats, aq.QuantConfig(act_mode="static", alpha=None,
                                                                                 rotate=rotate))
  qk = qparams["params"]["down"]["kernel"]
  ordinary = 20.0 * 4.5 / (np.sqrt(64) if rotate else 1.0)  # about the largest ordinary value (rotated: spread)
  assert float(qk.act_scale) < 2 * ordinary / 127, float(qk.act_scale)
  assert "1 of" not in report["down"].note and "sink tokens" in report["down"].note
  x = jnp.asarray(_batch(rng))
  want = np.asarray(model.apply(params, x))
  got = np.asarray(aq.quantized_apply(model)(qparams, x))
  err = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)
  # ordinary rows (measured 0.15 / 0.035: unrotated, the x20 channels take most of the
  # per-tensor range; a scale set by the sink gives 1.0, all zeros)
  assert err[:, 1:].max() < (0.06 if rotate else 0.25), err[:, 1:].max()
  assert err[:, 0].max() < 0.02, err[:, 0].max()  # the sinks, on their own scale (measured 0.007-0.009)
