import jax
import jax.numpy as jnp
import numpy as np
import pytest

import actquant_jax as aq
from actquant_jax import smooth
from tests import toy_models as tm
from tests.previous_alpha_search import previous_choose_alpha


@pytest.fixture(scope="module")
def gpt():
  m = tm.TinyGPT()
  cal = tm.batches(4)
  params = tm.with_outlier_channels(m.init(jax.random.key(0), cal[0]), tm.GPT_READERS)
  stats = aq.calibrate(m, params, cal, progress=False)
  ev = tm.batches(2, seed=1)
  return m, params, stats, ev, [m.apply(params, x) for x in ev]


def _err(m, qparams, ev, refs):
  f = jax.jit(aq.quantized_apply(m))
  return float(np.mean([jnp.linalg.norm(f(qparams, x) - y) / jnp.linalg.norm(y) for x, y in zip(ev, refs)]))


def test_smoothing_beats_naive_static_by_10x(gpt):
  m, params, stats, ev, refs = gpt
  errs = {(mode, a): _err(m, aq.quantize_params(params, stats, aq.QuantConfig(act_mode=mode, alpha=a, rotate=False)), ev, refs)
          for mode in ("static", "dynamic") for a in (None, 0.5, "auto")}
  # The LayerNorm outputs carry 100x channels. One static per-tensor scale set by them
  # rounds every normal channel (|x| ~ 1 against a step of ~100/127) to 0 or +-1, so the
  # unsmoothed model is ruined (~100% error). s = sqrt(max|X| / max|W|) pulls those
  # channels down ~10x into the weights, which per-output-channel scales absorb.
  assert errs[("static", None)] > 0.5
  assert errs[("static", None)] >= 10 * errs[("static", 0.5)]
  assert errs[("static", None)] >= 10 * errs[("static", "auto")]
  # Per-token scales adapt to each row; with smoothing they are closer still.
  assert errs[("dynamic", 0.5)] < errs[("static", 0.5)]
  assert errs[("dynamic", "auto")] < errs[("static", "auto")]
  assert errs[("dynamic", 0.5)] < 0.03


def test_structure_and_paths_preserved(gpt):
  m, params, stats, _, _ = gpt
  qparams = aq.quantize_params(params, stats, aq.QuantConfig(act_mode="static", alpha=0.5, rotate=False))
  is_qk = lambda x: isinstance(x, aq.QuantizedKernel)
  qpaths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(qparams, is_leaf=is_qk)[0]}
  fpaths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert qpaths == fpaths
  qk = qparams["params"]["block_0"]["fc1"]["kernel"]
  assert is_qk(qk) and qk.values.dtype == jnp.int8 and qk.values.shape == (4 * tm.D, tm.D)  # (N, K)
  assert qk.scale.shape == (4 * tm.D,) and qk.act_scale.shape == () and qk.inv_smooth is None  # folded
  assert qparams["params"]["block_0"]["fc2"]["kernel"].inv_smooth.shape == (4 * tm.D,)  # after gelu: runtime
  # the input tree is untouched (pure)
  assert not is_qk(params["params"]["block_0"]["fc1"]["kernel"])
  # bare param dicts work too
  q2 = aq.quantize_params(params["params"], stats, aq.QuantConfig(act_mode="static", alpha=0.5, rotate=False))
  np.testing.assert_array_equal(np.asarray(q2["block_0"]["fc1"]["kernel"].values), np.asarray(qk.values))


def test_weight_bytes(gpt):
  m, params, stats, _, _ = gpt
  qparams = aq.quantize_params(params, stats, aq.QuantConfig(alpha=0.5, rotate=False))
  is_qk = lambda x: isinstance(x, aq.QuantizedKernel)
  # Every array the quantized tree holds, against the float tree's: the kernels must
  # really be stored in 8 bits (values, scales, act_scale, inv_smooth all counted).
  nbytes = lambda tree: sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree))
  qks = [x for x in jax.tree_util.tree_leaves(qparams, is_leaf=is_qk) if is_qk(x)]
  assert len(qks) == 13
  kernel_bytes = sum(x.in_features * x.out_features * 4 for x in qks)
  other_bytes = nbytes(params) - kernel_bytes  # biases, norms, embeddings: unchanged
  assert nbytes(qparams) - other_bytes <= 0.27 * kernel_bytes


def test_fp8(gpt):
  m, params, stats, ev, refs = gpt
  qparams = aq.quantize_params(params, stats, aq.QuantConfig(qtype="float8_e4m3fn", alpha=0.5, rotate=False))
  assert qparams["params"]["head"]["kernel"].values.dtype == jnp.float8_e4m3fn
  # e4m3 keeps 3 mantissa bits (up to 6% per element) but its exponent shrugs off the
  # outlier channels: no smoothing needed for a usable model.
  assert _err(m, qparams, ev, refs) < 0.1
  q_plain = aq.quantize_params(params, stats, aq.QuantConfig(qtype="float8_e4m3fn", alpha=None, rotate=False))
  assert _err(m, q_plain, ev, refs) < 0.1


def test_rules_keep_layers_in_float(gpt):
  m, params, stats, ev, refs = gpt
  cfg = aq.QuantConfig(rules=(aq.LayerRule(r"^head$", skip=True), aq.LayerRule(r"fc2", act_mode="static")), alpha=0.5, rotate=False)
  qparams, report = aq.quantize_params_with_report(params, stats, cfg)
  head = qparams["params"]["head"]["kernel"]
  assert not isinstance(head, aq.QuantizedKernel)
  np.testing.assert_array_equal(np.asarray(head), np.asarray(params["params"]["head"]["kernel"]))
  # head was ln_f's only reader; kept in float, so ln_f must not be folded
  np.testing.assert_array_equal(np.asarray(qparams["params"]["ln_f"]["scale"]), np.asarray(params["params"]["ln_f"]["scale"]))
  assert not report["head"].quantized
  assert report["block_0/fc2"].act_mode == "static" and qparams["params"]["block_0"]["fc2"]["kernel"].act_mode == "static"
  assert report["block_0/fc1"].act_mode == "dynamic"


def test_report(gpt):
  m, params, stats, _, _ = gpt
  _, report = aq.quantize_params_with_report(params, stats, aq.QuantConfig(act_mode="static", alpha="auto", rotate=False))
  r = report["block_1/fc1"]
  assert r.quantized and r.smoothing in ("folded", "none") and r.producer == "block_1/ln_2"
  assert r.alpha_errors is not None and set(r.alpha_errors) == set(aq.QuantConfig().alpha_grid)
  assert r.alpha == min(r.alpha_errors, key=r.alpha_errors.get)
  assert r.outlier_ratio_before > 30 and (r.alpha is None or r.outlier_ratio_after < r.outlier_ratio_before / 3)
  assert 0 < r.weight_error < 0.05 and 0 < r.output_error < 0.1 and r.act_scale > 0
  text = aq.format_report(report)
  assert "block_1/fc1" in text and "int8 static" in text


def test_errors(gpt):
  m, params, stats, _, _ = gpt
  with pytest.raises(ValueError, match="stats is empty"):
    aq.quantize_params(params, {}, aq.QuantConfig(alpha=0.5, rotate=False))
  missing = {k: v for k, v in stats.items() if k != "block_1/fc2"}
  with pytest.raises(ValueError, match=r"layer block_1/fc2: no calibration stats"):
    aq.quantize_params(params, missing, aq.QuantConfig(alpha=0.5, rotate=False))
  # ... unless a rule keeps it in float
  aq.quantize_params(params, missing, aq.QuantConfig(rules=(aq.LayerRule("block_1/fc2", skip=True),), alpha=0.5, rotate=False))
  other = tm.TinyGPT(d=32)
  x = tm.batches(1, d=32)[0]
  other_stats = aq.calibrate(other, other.init(jax.random.key(1), x), [x], progress=False)
  with pytest.raises(ValueError, match=r"layer block_0/fc1: kernel \(64, 256\) has 64 inputs but stats have 32 channels"):
    aq.quantize_params(params, other_stats, aq.QuantConfig(alpha=0.5, rotate=False))
  with pytest.raises(ValueError, match="in stats but has no kernel"):
    aq.quantize_params(params, {"nope/fc": stats["head"], **stats}, aq.QuantConfig(alpha=0.5, rotate=False))
  qparams = aq.quantize_params(params, stats, aq.QuantConfig(alpha=0.5, rotate=False))
  with pytest.raises(ValueError, match="already quantized"):
    aq.quantize_params(qparams, stats, aq.QuantConfig(alpha=0.5, rotate=False))
  bad = jax.tree_util.tree_map(lambda v: v, params)
  bad["params"]["block_0"]["o"]["kernel"] = bad["params"]["block_0"]["o"]["kernel"].at[0, 0].set(jnp.inf)
  with pytest.raises(ValueError, match="layer block_0/o: kernel: contains 0 NaN and 1 Inf"):
    aq.quantize_params(bad, stats, aq.QuantConfig(alpha=0.5, rotate=False))
  with pytest.raises(TypeError, match="QuantConfig"):
    aq.quantize_params(params, stats, {"alpha": 0.5})
  cfg = aq.QuantConfig(rules=(aq.LayerRule(r"block_0/k$", alpha=0.9),), alpha=0.5, rotate=False)
  with pytest.raises(ValueError, match="read the same input"):
    aq.quantize_params(params, stats, cfg)


def _leaf(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def test_auto_alpha_per_layer_as_before(gpt):
  # alpha="auto" on the outlier GPT (the planning quantize_params runs): each group's alpha
  # is the one the previous implementation picks from the same stats and weights.
  m, params, stats, _, _ = gpt
  smooth._grid_errors.clear_cache()
  act_mode = "dynamic"
  _, plans = aq.smooth_params(params, stats, aq.QuantConfig(alpha="auto", act_mode=act_mode, rotate=False))
  # jitted once per group shape: q/k/v, o, fc1, fc2, head -- the second block reuses the first's
  assert smooth._grid_errors._cache_size() == 5
  groups = {}
  for p, st in stats.items():
    groups.setdefault(st.group, []).append(p)
  chosen = set()
  for members in groups.values():
    kernels = [_leaf(params["params"], f"{p}/kernel") for p in members]
    st = stats[members[0]]
    xa = np.max(np.stack([np.asarray(stats[p].absmax) for p in members]), 0)
    want, want_errs = previous_choose_alpha(st.samples, kernels, xa, aq.QuantConfig().alpha_grid, "int8", act_mode)
    for p in members:
      assert plans[p].alpha == want, (p, plans[p].alpha_errors, want_errs)
      np.testing.assert_allclose(list(plans[p].alpha_errors.values()), list(want_errs.values()), rtol=1e-4)
    chosen.add(want)
  assert len(chosen) > 1  # not one value everywhere: the choice itself is tested


def test_quantize_params_holds_no_float_copy(gpt, monkeypatch):
  # While each weight is quantized, the jax arrays alive beyond the float params are the
  # int8 copy built so far and (K,) / (N,) vectors: no smoothed float copy of the kernels.
  m, params, stats, _, _ = gpt
  kernel_bytes = sum(_leaf(params["params"], f"{p}/kernel").nbytes for p in stats)
  live = lambda: sum(a.nbytes for a in jax.live_arrays())
  before, extra = live(), []
  quantize_weight = smooth.quantize_weight

  def spy(ref, qtype, rotate=False, rows=None, s=None):
    extra.append(live() - before)
    return quantize_weight(ref, qtype, rotate, rows, s)
  monkeypatch.setattr(smooth, "quantize_weight", spy)
  qparams = aq.quantize_params(params, stats, aq.QuantConfig(alpha=0.5, rotate=False))
  assert len(extra) == 13
  assert max(extra) < 0.3 * kernel_bytes, (max(extra), kernel_bytes)  # int8: 0.25x
  del qparams
