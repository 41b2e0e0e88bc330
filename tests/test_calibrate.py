import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

import actquant_jax as aq
from actquant_jax.report import stats_summary
from tests import toy_models as tm


@pytest.fixture(scope="module")
def gpt():
  m = tm.TinyGPT()
  cal = tm.batches(3)
  params = tm.with_outlier_channels(m.init(jax.random.key(0), cal[0]), tm.GPT_READERS)
  return m, params, cal, aq.calibrate(m, params, cal, progress=False)


def test_dataflow_pre_ln_is_foldable(gpt):
  _, _, _, stats = gpt
  for i in range(2):
    for d in "qkv":
      s = stats[f"block_{i}/{d}"]
      assert (s.group, s.producer, s.producer_kind, s.exclusive) == (f"block_{i}/q", f"block_{i}/ln_1", "layernorm", True)
      assert s.foldable
    s = stats[f"block_{i}/fc1"]
    assert (s.group, s.producer, s.producer_kind, s.foldable) == (f"block_{i}/fc1", f"block_{i}/ln_2", "layernorm", True)
    # After attention / gelu: produced by a plain op, nothing to fold into.
    assert stats[f"block_{i}/o"].producer_kind == "op" and not stats[f"block_{i}/o"].foldable
    assert stats[f"block_{i}/fc2"].producer_kind == "op" and not stats[f"block_{i}/fc2"].foldable
  assert stats["head"].producer == "ln_f" and stats["head"].foldable


def test_dataflow_post_ln_is_not_foldable():
  m = tm.TinyBERT()
  cal = tm.batches(1)
  stats = aq.calibrate(m, m.init(jax.random.key(0), cal[0]), cal, progress=False)
  # ln_emb / ln_ffn outputs are also the residual stream: read by q/k/v AND an add.
  for p in ("layer_0/q", "layer_1/k", "layer_0/fc1", "layer_1/fc1"):
    assert stats[p].producer_kind == "layernorm" and not stats[p].exclusive and not stats[p].foldable, p
  assert stats["layer_1/q"].producer == "layer_0/ln_ffn"
  assert stats["layer_0/fc1"].producer == "layer_0/ln_attn"


def test_dataflow_from_graph_not_names():
  class Tricky(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.LayerNorm(name="fc_not_a_norm")(x)      # a norm with a Dense-like name
      a = nn.Dense(8, name="ln_not_a_norm")(h)        # a Dense with a norm-like name
      b = nn.Dense(8, name="reads_dense")(a)          # producer: a Dense
      return b + nn.Dense(8, name="reads_h_twice")(h * 2.0)
  m = Tricky()
  x = jnp.ones((2, 8))
  stats = aq.calibrate(m, m.init(jax.random.key(0), x), [x], progress=False)
  assert stats["ln_not_a_norm"].producer_kind == "layernorm"
  assert not stats["ln_not_a_norm"].exclusive  # h is also read by the `* 2.0`
  assert (stats["reads_dense"].producer, stats["reads_dense"].producer_kind) == ("ln_not_a_norm", "dense")
  assert stats["reads_dense"].foldable
  assert stats["reads_h_twice"].producer_kind == "op"


def test_absmax_tokens_and_samples(gpt):
  m, params, cal, stats = gpt
  captured = []

  def grab(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and "/".join(context.module.path) == "block_0/fc1":
      captured.append(np.asarray(args[0]).reshape(-1, args[0].shape[-1]))
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(grab):
    for x in cal:
      m.apply(params, x)
  x = np.concatenate(captured)
  s = stats["block_0/fc1"]
  np.testing.assert_allclose(np.asarray(s.absmax), np.abs(x).max(0), rtol=1e-6)
  assert int(s.tokens) == x.shape[0] == 3 * 4 * 16
  assert s.samples.shape == (x.shape[0], tm.D)  # fewer tokens than num_samples: all of them
  # max over batches, not a mean: the outlier channels reach ~100x the others
  a = np.asarray(s.absmax)
  assert a[[3, 17, 40]].min() > 20 * np.median(a)


def test_samples_are_capped_and_uniform():
  m = tm.TinyGPT()
  cal = tm.batches(4)
  stats = aq.calibrate(m, m.init(jax.random.key(0), cal[0]), cal, num_samples=50, progress=False)
  assert stats["head"].samples.shape == (50, tm.D)
  assert int(stats["head"].tokens) == 4 * 4 * 16


def test_nan_names_layer_and_batch(gpt):
  m, params, cal, _ = gpt
  bad = cal[1].at[0, 3, 5].set(jnp.nan)
  with pytest.raises(ValueError, match=r"layer block_0/q: input has \d+ NaN/Inf values in batch 2"):
    aq.calibrate(m, params, [cal[0], bad], progress=False)


def test_empty_and_no_dense():
  m = tm.TinyGPT()
  x = tm.batches(1)[0]
  params = m.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="no batches"):
    aq.calibrate(m, params, [], progress=False)
  ln = nn.LayerNorm()
  with pytest.raises(ValueError, match="no Dense"):
    aq.calibrate(ln, ln.init(jax.random.key(0), x), [x], progress=False)
  with pytest.raises(ValueError, match="needs its params"):
    aq.calibrate(m, None, [x])


def test_dict_batches_and_progress(capsys):
  class Two(nn.Module):
    @nn.compact
    def __call__(self, x, scale):
      return nn.Dense(4, name="fc")(x * scale)
  m = Two()
  b = dict(x=jnp.ones((2, 8)), scale=jnp.float32(3.0))
  stats = aq.calibrate(m, m.init(jax.random.key(0), **b), [b] * 5)
  np.testing.assert_array_equal(np.asarray(stats["fc"].absmax), 3.0)
  assert "calibrate: batch 5/5" in capsys.readouterr().err


def test_save_load_merge(tmp_path, gpt):
  m, params, cal, stats = gpt
  f = tmp_path / "stats.npz"
  aq.save_stats(stats, f)
  back = aq.load_stats(f)
  assert set(back) == set(stats)
  for p in stats:
    a, b = stats[p], back[p]
    assert (a.group, a.producer, a.producer_kind, a.exclusive) == (b.group, b.producer, b.producer_kind, b.exclusive)
    np.testing.assert_array_equal(np.asarray(a.absmax), np.asarray(b.absmax))
    np.testing.assert_array_equal(np.asarray(a.samples), np.asarray(b.samples))
  s1 = aq.calibrate(m, params, cal[:2], progress=False)
  s2 = aq.calibrate(m, params, cal[2:], progress=False)
  merged = aq.merge_stats(s1, s2)
  for p in stats:
    np.testing.assert_array_equal(np.asarray(merged[p].absmax), np.asarray(stats[p].absmax))
    assert int(merged[p].tokens) == int(stats[p].tokens)
  with pytest.raises(ValueError, match="different layers"):
    aq.merge_stats(s1, {k: v for k, v in s2.items() if k != "head"})
  with pytest.raises(ValueError, match="not a calibration stats file"):
    aq.load_stats(_npz_without_meta(tmp_path))


def _npz_without_meta(tmp_path):
  f = tmp_path / "plain.npz"
  np.savez(f, a=np.ones(3))
  return f


def test_stats_are_a_pytree(gpt):
  # Stats go through jit and tree_map as arrays; the dataflow facts ride along as static.
  stats = gpt[3]
  doubled = jax.jit(lambda s: jax.tree_util.tree_map(lambda x: x * 2, s))(stats)
  assert set(doubled) == set(stats) and doubled["head"].producer == stats["head"].producer == "ln_f"
  for p in stats:
    np.testing.assert_array_equal(np.asarray(doubled[p].absmax), 2 * np.asarray(stats[p].absmax))
    np.testing.assert_array_equal(np.asarray(doubled[p].samples), 2 * np.asarray(stats[p].samples))


def test_summary_line_names_float_layers_and_why(capsys):
  """calibrate ends with one line in the report's wording: how many weight matmuls it
  captured, how many can be quantized, and each float one with its reason."""
  class PerHead(nn.Module):
    @nn.compact
    def __call__(self, x):  # x (H, T, D): a weight per head (batch axis 0) stays float
      y = nn.DenseGeneral(8, axis=-1, batch_dims=(0,), name="per_head")(x)
      return nn.Dense(8, name="fc")(nn.LayerNorm(name="ln")(y))
  x = jax.random.normal(jax.random.key(0), (4, 16, 8))
  m = PerHead()
  params = m.init(jax.random.key(0), x)
  stats = aq.calibrate(m, params, [x])
  line = stats_summary(stats)
  assert capsys.readouterr().err.strip().splitlines()[-1] == f"calibrate: {line}"
  reason = stats["per_head"].reason
  assert "batch axes" in reason
  float_part = f"; float ({reason}): per_head"
  assert line == f"calibrated 2 weight matmuls: 1 quantizable (1 with a foldable producer), 1 float{float_part}"
  # the same wording as the report's line, which names the layers quantize_params keeps float
  _, report = aq.quantize_params_with_report(params, stats, aq.QuantConfig(alpha=0.5, rotate=False))
  assert aq.report_summary(report).endswith(float_part)
  aq.calibrate(m, params, [x], progress=False)
  assert capsys.readouterr().err == ""
