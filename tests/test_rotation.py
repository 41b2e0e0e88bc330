"""Hadamard rotation of the contraction (actquant_jax/rotation.py, QuantConfig.rotate)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import actquant_jax as aq
from actquant_jax import rotation
from tests.toy_models import GPT_READERS, TinyGPT, batches, with_outlier_channels


@pytest.mark.parametrize("k,parts", [(64, (8, 8)), (96, (12, 8)), (576, (72, 8)), (640, (20, 32)),
                                     (1536, (48, 32)), (2048, (32, 64))])
def test_rotation_is_orthogonal_and_applied_in_factors(k, parts, rng):
  assert rotation.factors(k) == parts
  r = rotation.matrix(k)
  np.testing.assert_allclose(r @ r.T, np.eye(k), atol=1e-6)
  x = rng.standard_normal((3, k)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(rotation.rotate_rows(jnp.asarray(x))), x @ r, atol=2e-5)
  w = rng.standard_normal((k, 5)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(rotation.rotate_weight(jnp.asarray(w))), r.T @ w, atol=2e-5)
  np.testing.assert_allclose(np.asarray(rotation.unrotate_weight(rotation.rotate_weight(jnp.asarray(w)))), w,
                             atol=2e-5)


def test_sizes_without_a_hadamard_matrix_are_named():
  assert rotation.factors(11008) is None and "11008" in rotation.why_not(11008)
  with pytest.raises(aq.QuantizationError, match="11008"):
    rotation.rotate_rows(jnp.ones((1, 11008)))


def test_rotated_kernel_rounds_outlier_tokens_better(rng):
  # A token with 3 channels at 100x: per-token rounding of x zeroes the ordinary channels;
  # of x R (outliers spread over all K) it keeps them.
  k, n = 256, 64
  x = rng.standard_normal((32, k)).astype(np.float32)
  x[:, [3, 17, 40]] *= 100
  w = rng.standard_normal((k, n)).astype(np.float32) / np.sqrt(k)
  y = x @ w
  err = lambda qk: float(np.linalg.norm(np.asarray(aq.w8a8_dot(jnp.asarray(x), qk, backend="xla")) - y)
                         / np.linalg.norm(y))
  plain = aq.quantize_kernel(jnp.asarray(w))
  rotated = aq.QuantizedKernel(**{**vars(aq.quantize_kernel(rotation.rotate_weight(jnp.asarray(w)))), "rotated": True})
  assert err(rotated) < err(plain) / 4, (err(rotated), err(plain))
  np.testing.assert_allclose(np.asarray(rotated.dequantize()), w, atol=0.02)


def test_quantize_params_rotate(rng):
  model = TinyGPT()
  x = batches(1)[0]
  params = with_outlier_channels(model.init(jax.random.key(0), x), GPT_READERS)
  stats = aq.calibrate(model, params, batches(4, seed=1), progress=False)
  y = model.apply(params, x)
  err = lambda qp: float(jnp.linalg.norm(aq.quantized_apply(model)(qp, x) - y) / jnp.linalg.norm(y))
  qp_plain = aq.quantize_params(params, stats, aq.QuantConfig(alpha=None, rotate=False))
  qp_rot = aq.quantize_params(params, stats, aq.QuantConfig(alpha=None, rotate=True))
  kernels = [l for l in jax.tree.leaves(qp_rot, is_leaf=lambda v: isinstance(v, aq.QuantizedKernel))
             if isinstance(l, aq.QuantizedKernel)]
  assert kernels and all(qk.rotated for qk in kernels)
  assert err(qp_rot) < err(qp_plain) / 2, (err(qp_rot), err(qp_plain))
  # static scales are taken on the rotated rows: rotation helps them as much
  static = lambda rotate: aq.quantize_params(params, stats, aq.QuantConfig(alpha=None, act_mode="static",
                                                                           rotate=rotate))
  assert err(static(True)) < err(static(False)) / 2, (err(static(True)), err(static(False)))
  with pytest.raises(aq.QuantizationTypeError, match="rotate must be True or False, got 'yes'"):
    aq.QuantConfig(rotate="yes")
  # The default, QuantConfig() (what quantize_params(params, stats) uses), rotates every
  # layer it can and searches alpha per group on the rotated rows: the most accurate mode
  # measured on the real LLMs. On this toy's planted channels it is no worse than
  # SmoothQuant 0.5 (the old default, made for such channels).
  qp, report = aq.quantize_params_with_report(params, stats)
  kernels = [l for l in jax.tree.leaves(qp, is_leaf=lambda v: isinstance(v, aq.QuantizedKernel))
             if isinstance(l, aq.QuantizedKernel)]
  assert kernels and all(qk.rotated for qk in kernels)
  assert all(r.alpha_errors is not None for r in report.values() if r.quantized)
  old = aq.quantize_params(params, stats, aq.QuantConfig(alpha=0.5, rotate=False))
  assert err(qp) < err(qp_plain) / 2 and err(qp) <= err(old), (err(qp), err(qp_plain), err(old))


def test_rotated_qparams_round_trip_a_checkpoint(tmp_path, rng):
  # `rotated` is static: lost, the restored model would run R^T W on unrotated x.
  w = jnp.asarray(rng.standard_normal((64, 16)), jnp.float32)
  qk = aq.QuantizedKernel(**{**vars(aq.quantize_kernel(rotation.rotate_weight(w))), "rotated": True})
  cfg = aq.QuantConfig(alpha=None, rotate=True)
  aq.save_checkpoint(tmp_path / "ckpt", {"dense": {"kernel": qk}}, config=cfg)
  restored, _ = aq.restore_checkpoint(tmp_path / "ckpt", config=cfg)
  back = restored["dense"]["kernel"]
  assert back.rotated
  x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(aq.w8a8_dot(x, back, backend="xla")),
                                np.asarray(aq.w8a8_dot(x, qk, backend="xla")))
