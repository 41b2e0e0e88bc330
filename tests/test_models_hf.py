"""HF transformers Flax models (random-init small configs, outlier channels planted in
the norm scales as trained LLMs have them): every weight matmul runs in int8 -- GPT-2's
own FlaxConv1D and tied head, Llama's RMSNorm folding, Gemma's tied `embed.attend` head
-- and KV-cache decoding through `quantized_apply(..., mutable=["cache"])`.
Skipped when transformers is not installed (`pip install -e .[hf]`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

import actquant_jax as aq  # noqa: E402
from tests import toy_models as tm  # noqa: E402

V, T = 128, 16


def _make(name):
  if name == "gpt2":
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return transformers.FlaxGPT2LMHeadModel(cfg, seed=0)
  if name == "llama":
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.FlaxLlamaForCausalLM(cfg, seed=0)
  cfg = transformers.GemmaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                                 max_position_embeddings=32, hidden_activation="gelu_pytorch_tanh")
  return transformers.FlaxGemmaForCausalLM(cfg, seed=0)


def _plant_outliers(params):
  """Norm scales (any 1-D param of a *norm* / ln_* module) get channels 3 and 17 x30."""
  def go(path, v):
    names = "/".join(str(getattr(k, "key", k)) for k in path).lower()
    if v.ndim == 1 and ("norm" in names or "ln_" in names) and ("scale" in names or "weight" in names):
      return v.at[np.array([3, 17])].multiply(30.0)
    return v
  return jax.tree_util.tree_map_with_path(go, params)


def _forward(mod, ids):
  return mod(ids, jnp.ones_like(ids), jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)).logits


# name: (weight matmuls, smoothing vectors folded into the model's own norms, at run time);
# the tied heads (GPT-2's, Gemma's) are not smoothed: their int8 table serves the lookup
EXPECT = {"gpt2": (9, 4, 4), "llama": (15, 11, 4), "gemma": (15, 10, 4)}


@pytest.mark.parametrize("name", list(EXPECT))
def test_every_weight_matmul_int8(name):
  model = _make(name)
  params = {"params": _plant_outliers(model.params)}
  ids = [jax.random.randint(jax.random.key(i), (2, T), 0, V) for i in range(3)]
  fwd = lambda v, b: model.module.apply(v, b, method=_forward)
  stats = aq.calibrate(model.module, params, ids[:2], forward=fwd, progress=False)
  q, report = aq.quantize_params_with_report(params, stats, aq.QuantConfig(alpha=0.5, rotate=False))
  n, folded, runtime = EXPECT[name]
  assert aq.report_summary(report).startswith(f"quantized {n} of {n} weight matmuls; {folded} smoothing vectors "
                                               f"folded, {runtime} at run time")
  f = aq.quantized_apply(model.module, method=_forward, backend="xla")
  assert tm.int8_matmuls(f, q, ids[2]) == n
  y, y0 = jax.jit(f)(q, ids[2]), jax.jit(fwd)(params, ids[2])  # (jitted: one compile, not one per eager op)
  assert float(jnp.linalg.norm(y - y0) / jnp.linalg.norm(y0)) < 0.05


@pytest.fixture(scope="module")
def quantized_gpt2():
  """GPT-2 with planted outliers, calibrated on two batches and quantized (default
  config): (model, three (2, 8) id batches, qparams). Shared: nothing below changes it."""
  model = _make("gpt2")
  params = {"params": _plant_outliers(model.params)}
  ids = [jax.random.randint(jax.random.key(i), (2, 8), 0, V) for i in range(3)]
  fwd = lambda v, b: model.module.apply(v, b, method=_forward)
  q = aq.quantize_params(params, aq.calibrate(model.module, params, ids[:2], forward=fwd, progress=False), aq.QuantConfig(alpha=0.5, rotate=False))
  return model, ids, q


def test_gpt2_kv_cache_decoding_runs_int8(quantized_gpt2):
  model, ids, q = quantized_gpt2
  cache = model.init_cache(2, 8)
  mask = jnp.ones((2, 8), jnp.int32)

  qstep = aq.quantized_apply(model.module, backend="xla", method=lambda mod, tok, t: mod(
      tok, mask, jnp.full((2, 1), t), init_cache=False))
  assert tm.int8_matmuls(lambda v, tok: qstep(v, tok, 0, mutable=["cache"]), {**q, "cache": cache}, ids[2][:, :1]) == 9
  logits = []
  step = jax.jit(lambda v, tok, t: qstep(v, tok, t, mutable=["cache"]))  # the position traced: one compile
  for t in range(8):
    out, upd = step({**q, "cache": cache}, ids[2][:, t:t + 1], t)
    cache = upd["cache"]
    logits.append(out.logits)
  full = aq.quantized_apply(model.module, method=_forward, backend="xla")(q, ids[2])
  np.testing.assert_allclose(jnp.concatenate(logits, 1), full, rtol=2e-3, atol=2e-3)


def test_gpt2_generate_with_qparams(quantized_gpt2):
  model, ids, q = quantized_gpt2
  with aq.quantized(model.module):
    assert tm.int8_matmuls(lambda v, b: model.module.apply(v, b, method=_forward), q, ids[2]) == 9
    out = model.generate(ids[2], params=q["params"], max_new_tokens=4, do_sample=False).sequences
  assert "apply" not in vars(model.module)  # restored
  # the same greedy tokens as a hand-written int8 greedy loop over full sequences
  f = jax.jit(aq.quantized_apply(model.module, method=_forward))
  seq = ids[2]
  for _ in range(4):
    seq = jnp.concatenate([seq, jnp.argmax(f(q, seq)[:, -1], -1)[:, None]], 1)
  np.testing.assert_array_equal(out, seq)
