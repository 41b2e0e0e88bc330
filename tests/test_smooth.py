import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import actquant_jax as aq
from actquant_jax import smooth
from actquant_jax.transform import smooth_params
from tests import toy_models as tm
from tests.previous_alpha_search import previous_choose_alpha


def test_smoothing_factors_formula_and_guards():
  x = np.array([4.0, 100.0, 0.0, 1.0, 9.0], np.float32)
  w = np.array([1.0, 4.0, 2.0, 0.0, 1e-30], np.float32)
  s = smooth.smoothing_factors(x, w, 0.5)
  np.testing.assert_allclose(s[:2], [2.0, 5.0], rtol=1e-6)
  assert s[2] == 1.0 and s[3] == 1.0  # zero channel in X or W: nothing to migrate
  assert s[4] == smooth.S_MAX  # clipped
  np.testing.assert_allclose(smooth.smoothing_factors(x[:2], w[:2], 1.0), x[:2])
  np.testing.assert_allclose(smooth.smoothing_factors(x[:2], w[:2], 0.0), 1 / w[:2])
  with pytest.raises(aq.QuantizationError, match="alpha"):
    smooth.smoothing_factors(x, w, 1.5)
  with pytest.raises(aq.QuantizationError, match="equal"):
    smooth.smoothing_factors(x, w[:3], 0.5)


def test_smoothing_flattens_outliers():
  x = np.ones(64, np.float32)
  x[[3, 9]] = 100.0
  s = smooth.smoothing_factors(x, np.ones(64, np.float32), 0.5)
  assert smooth.outlier_ratio(x) == 100.0
  assert smooth.outlier_ratio(x, s) == pytest.approx(10.0)


def _apply_with_runtime_vectors(model, params, x, inv):
  """Float model where the listed Dense layers multiply their input by 1/s first."""
  def icpt(next_fun, args, kwargs, ctx):
    p = "/".join(ctx.module.path)
    if ctx.method_name == "__call__" and p in inv:
      return next_fun(args[0] * inv[p], *args[1:], **kwargs)
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(icpt):
    return model.apply(params, x)


@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_folding_is_exact_on_pre_ln_gpt(alpha):
  m = tm.TinyGPT()
  cal = tm.batches(2)
  params = tm.with_outlier_channels(m.init(jax.random.key(0), cal[0]), tm.GPT_READERS)
  stats = aq.calibrate(m, params, cal, progress=False)
  smoothed, plans = smooth_params(params, stats, aq.QuantConfig(alpha=alpha, rotate=False))
  folded = {p for p, pl in plans.items() if pl.folded}
  assert folded == {f"block_{i}/{d}" for i in range(2) for d in ("q", "k", "v", "fc1")} | {"head"}
  # The norms really changed (1/s went into them) ...
  assert not np.allclose(smoothed["params"]["ln_f"]["scale"], params["params"]["ln_f"]["scale"])
  # ... and the float model computes the same function.
  inv = {p: jnp.asarray(1 / pl.s) for p, pl in plans.items() if not pl.folded}
  assert set(inv) == {f"block_{i}/{d}" for i in range(2) for d in ("o", "fc2")}
  x = tm.batches(1, seed=5)[0]
  ref = m.apply(params, x)
  out = _apply_with_runtime_vectors(m, smoothed, x, inv)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5 * float(jnp.abs(ref).max()))


def test_post_ln_bert_uses_runtime_vector_and_is_exact():
  m = tm.TinyBERT()
  cal = tm.batches(2)
  params = tm.with_outlier_channels(m.init(jax.random.key(0), cal[0]), tm.BERT_READERS)
  stats = aq.calibrate(m, params, cal, progress=False)
  smoothed, plans = smooth_params(params, stats, aq.QuantConfig(alpha=0.5, rotate=False))
  assert not any(pl.folded for pl in plans.values())  # every LN output is also the residual
  for ln in ("ln_emb", "layer_0/ln_attn", "layer_0/ln_ffn"):
    path = ln.split("/")
    a, b = params["params"], smoothed["params"]
    for k in path:
      a, b = a[k], b[k]
    np.testing.assert_array_equal(np.asarray(a["scale"]), np.asarray(b["scale"]))  # untouched
  inv = {p: jnp.asarray(1 / pl.s) for p, pl in plans.items()}
  x = tm.batches(1, seed=5)[0]
  ref = m.apply(params, x)
  np.testing.assert_allclose(np.asarray(_apply_with_runtime_vectors(m, smoothed, x, inv)), np.asarray(ref),
                             rtol=2e-5, atol=2e-5)


def test_float_kept_reader_blocks_folding():
  m = tm.TinyGPT()
  cal = tm.batches(1)
  params = m.init(jax.random.key(0), cal[0])
  stats = aq.calibrate(m, params, cal, progress=False)
  cfg = aq.QuantConfig(alpha=0.5, rules=(aq.LayerRule(r"block_0/k$", skip=True),), rotate=False)
  _, plans = smooth_params(params, stats, cfg)
  assert "block_0/k" not in plans
  assert not plans["block_0/q"].folded and not plans["block_0/v"].folded  # k would see X/s
  assert plans["block_1/q"].folded


def test_choose_alpha_prefers_no_smoothing_without_outliers(rng):
  x = rng.standard_normal((256, 64)).astype(np.float32)
  w = rng.standard_normal((64, 32)).astype(np.float32)
  best, errs = smooth.choose_alpha(x, [w], np.abs(x).max(0), (None, 0.5, 0.9), "int8", "dynamic")
  assert set(errs) == {None, 0.5, 0.9}
  assert best is None and errs[None] <= min(errs[0.5], errs[0.9])
  x[:, [2, 7]] *= 100
  best, errs = smooth.choose_alpha(x, [w], np.abs(x).max(0), (None, 0.5, 0.9), "int8", "static")
  assert best is not None and errs[best] < errs[None] / 10


def test_fold_inverse_per_kind():
  s = np.array([2.0, 4.0], np.float32)
  ln = smooth.fold_inverse("layernorm", {"scale": jnp.ones(2), "bias": jnp.ones(2)}, s)
  np.testing.assert_allclose(ln["scale"], [0.5, 0.25])
  np.testing.assert_allclose(ln["bias"], [0.5, 0.25])
  d = smooth.fold_inverse("dense", {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}, s)
  np.testing.assert_allclose(d["kernel"], np.tile([0.5, 0.25], (3, 1)))
  assert smooth.can_fold("rmsnorm", {"scale": 1})
  assert not smooth.can_fold("layernorm", {"bias": 1})  # use_scale=False: nothing to absorb 1/s
  assert not smooth.can_fold("op", {})


def test_auto_alpha_with_too_few_rows_falls_back_and_says_so():
  # Before: one calibration token made the search pick 0.9 (10-40x worse than no smoothing
  # on new data). Now: no search below MIN_AUTO_ROWS, alpha 0.5, and the report says why.
  m = tm.TinyGPT()
  cal = tm.batches(2)
  params = tm.with_outlier_channels(m.init(jax.random.key(0), cal[0]), tm.GPT_READERS)
  stats = aq.calibrate(m, params, [cal[0][:1, :1]], progress=False)  # one token
  _, report = aq.quantize_params_with_report(params, stats, aq.QuantConfig(alpha="auto", rotate=False))
  for r in report.values():
    assert r.alpha == smooth.AUTO_FALLBACK_ALPHA and r.alpha_errors is None
    assert f">= {smooth.MIN_AUTO_ROWS} calibration rows, got 1" in r.note
  assert "note: alpha='auto' needs" in aq.format_report(report)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((smooth.MIN_AUTO_ROWS, 8)).astype(np.float32)
  alpha, errs, note = smooth.auto_alpha(x, [np.ones((8, 4), np.float32)], np.abs(x).max(0), (None, 0.5), "int8",
                                        "dynamic")
  assert errs is not None and note == ""  # enough rows: searched


@pytest.mark.parametrize("qtype,act_mode", [("int8", "static"), ("float8_e4m3fn", "dynamic")])
def test_jitted_search_chooses_as_before(rng, qtype, act_mode):
  grid = aq.QuantConfig().alpha_grid
  for trial, widths in enumerate([(40, 24)]):
    x = rng.standard_normal((128, 48)).astype(np.float32)
    x[:, rng.choice(48, 3, replace=False)] *= rng.uniform(5, 60)  # outlier channels
    kernels = [rng.standard_normal((48, n)).astype(np.float32) * rng.uniform(0.2, 2, (48, 1)).astype(np.float32)
               for n in widths]
    xa = np.abs(x).max(0)
    best, errs = smooth.choose_alpha(x, kernels, xa, grid, qtype, act_mode)
    want, want_errs = previous_choose_alpha(x, kernels, xa, grid, qtype, act_mode)
    assert best == want, (trial, errs, want_errs)
    np.testing.assert_allclose([errs[a] for a in grid], [want_errs[a] for a in grid], rtol=1e-4)
    # the same weights stored (N, K), contracted over axis 1 (a tied embedding's layout)
    refs = [smooth.WeightRef(k.T, contract=(1,), out=(0,)) for k in kernels]
    assert smooth.choose_alpha(x, refs, xa, grid, qtype, act_mode) == (best, errs)
