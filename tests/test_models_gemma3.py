"""The Flax Gemma 3 port (actquant_jax/models/gemma3.py): logits against PyTorch
transformers (the committed tiny checkpoints and their reference logits, made by
tools/make_gemma3_tiny_reference.py; live as well when torch is installed), the scanned
layers and their stacked KV cache through llama.py's generic prefill / decode_step, the
config and weight loaders, and W8A8 on it (every weight matmul int8)."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import actquant_jax as aq
from actquant_jax.models import attention as A
from actquant_jax.models import gemma3 as G
from actquant_jax.models import llama as L
from tests import toy_models as tm
from tools import make_gemma3_tiny_reference as mr

HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="the live check needs torch and transformers (CPU build)")
VARIANTS = list(mr.VARIANTS)


@pytest.fixture(scope="module")
def tiny():
  return G.load_gemma3(mr.checkpoint_dir("gemma3"))


@pytest.fixture(scope="module")
def tiny_ref():
  """(ids (2, 12), n_prefill, transformers' full logits, its cached steps) of gemma3_tiny."""
  with np.load(mr.REF) as z:
    return z["gemma3_ids"], int(z["n_prefill"]), z["gemma3_full"], z["gemma3_steps"]


_forward = jax.jit(lambda model, params, ids: model.apply(params, ids), static_argnums=0)  # one compile per model


def cached_logits(apply, model, params, ids, n_prefill, max_len=None):
  """Last logits of a cached prefill of ids[:, :n_prefill] (none if 0), then of each later
  token (decode steps)."""
  cache = L.init_cache(model, ids.shape[0], max_len or ids.shape[1])
  out = []
  if n_prefill:
    logits, cache = L.prefill(apply, params, cache, jnp.asarray(ids[:, :n_prefill]))
    out.append(logits)
  for t in range(n_prefill, ids.shape[1]):
    logits, cache = L.decode_step(apply, params, cache, jnp.asarray(ids[:, t]))
    out.append(logits)
  return np.stack([np.asarray(o) for o in out], axis=1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_committed_reference_logits(variant, tiny, tiny_ref):
  # tests/data/gemma3_tiny*: made by transformers' Gemma3ForCausalLM, committed with its
  # logits: a full forward, and a 5-token prefill + 7 decode steps through its KV cache
  # (past the sliding window of 4). The extras variant (biases, untied head, final soft
  # cap, erf GELU: per-token math, the same in both paths) is checked on the forward.
  lm = tiny if variant == "gemma3" else G.load_gemma3(mr.checkpoint_dir(variant))
  with np.load(mr.REF) as z:
    ids, n, full, steps = z[f"{variant}_ids"], int(z["n_prefill"]), z[f"{variant}_full"], z[f"{variant}_steps"]
  np.testing.assert_allclose(np.asarray(_forward(lm.model, lm.params, jnp.asarray(ids))), full, atol=1e-4)
  if variant == "gemma3":
    np.testing.assert_allclose(cached_logits(lm.model.apply, lm.model, lm.params, ids, n, max_len=16), steps, atol=1e-4)


@needs_torch
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_transformers(variant, tmp_path):
  model = mr.make_checkpoint(variant, tmp_path, seed=7)
  lm = G.load_gemma3(tmp_path)
  ids = np.random.default_rng(3).integers(0, 128, (3, 13)).astype(np.int32)
  full, steps = mr.reference_logits(model, ids, n_prefill=6)
  np.testing.assert_allclose(np.asarray(lm.model.apply(lm.params, jnp.asarray(ids))), full, atol=1e-4)
  np.testing.assert_allclose(cached_logits(lm.model.apply, lm.model, lm.params, ids, 6, max_len=20), steps, atol=1e-4)


@needs_torch
def test_to_hf_loads_in_transformers(tiny, tiny_ref, tmp_path):
  # config.to_hf() + params_to_hf: a checkpoint transformers reads, with the same logits
  import torch
  import transformers
  (tmp_path / "config.json").write_text(json.dumps(tiny.cfg.to_hf()))
  safetensors.numpy.save_file(G.params_to_hf(tiny.params, tiny.cfg), str(tmp_path / "model.safetensors"),
                              {"format": "pt"})
  theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
  ids, _, full, _ = tiny_ref
  with torch.no_grad():
    np.testing.assert_allclose(theirs(torch.tensor(ids, dtype=torch.long)).logits.numpy(), full, atol=1e-4)


def test_layers_are_one_scan(tiny):
  # Every layer param stacked on a leading axis of 4 under params["layers"], the cache too;
  # the program has one scan whatever the depth.
  p = tiny.params["params"]
  assert set(p) == {"embed_tokens", "layers", "norm"}  # tied head
  assert p["layers"]["self_attn"]["q_proj"]["kernel"].shape == (4, 64, 64)
  assert p["layers"]["self_attn"]["k_norm"]["scale"].shape == (4, 16)
  assert p["layers"]["post_feedforward_layernorm"]["scale"].shape == (4, 64)
  cache = L.init_cache(tiny.model, 2, 16)
  assert cache["k"].shape == (4, 2, 2, 16, 16)  # (L, B, kv, hd, S): keys K-major, every layer's stacked
  assert cache["index"].shape == (2,)  # a position per sequence
  ids = jnp.zeros((2, 12), jnp.int32)
  jaxpr = jax.make_jaxpr(tiny.model.apply)(tiny.params, ids)
  assert [e.primitive.name for e in jaxpr.eqns].count("scan") == 1
  # a first call with decode=True and no cache creates it (shapes only, as init_cache does)
  shapes = jax.eval_shape(lambda: tiny.model.init(jax.random.key(0), ids, decode=True))
  assert shapes["cache"]["v"].shape == (4, 2, 2, 12, 16)  # (L, B, kv, S, hd)
  assert shapes["params"]["layers"]["mlp"]["down_proj"]["kernel"].shape == (4, 96, 64)
  assert G.Gemma3Config.from_hf(json.loads((mr.checkpoint_dir("gemma3") / "config.json").read_text())).num_params \
      == sum(a.size for a in jax.tree.leaves(tiny.params))


def test_cache_and_blocks_match_forward(tiny, tiny_ref, monkeypatch):
  # With 3-query attention blocks (blocks after the second start past the window: the
  # sliding layers read only their window, under a lax.cond on the scanned layer kind):
  # the full forward, a 5 + 4 token chunked prefill (the second chunk after the cache),
  # then decode steps past the window, all equal the one-block forward at each position.
  ids, n, _, _ = tiny_ref
  one_block = np.asarray(_forward(tiny.model, tiny.params, jnp.asarray(ids)))
  monkeypatch.setattr(A, "BLOCK_Q", 3)
  apply = lambda *a, **k: tiny.model.apply(*a, **k)  # a new trace, with the 3-query blocks
  blocked = np.asarray(jax.jit(apply)(tiny.params, jnp.asarray(ids)))
  np.testing.assert_allclose(blocked, one_block, atol=1e-5)
  cache = L.init_cache(tiny.model, 2, 16)
  first, cache = L.prefill(tiny.model.apply, tiny.params, cache, jnp.asarray(ids[:, :n]))
  second, cache = L.prefill(apply, tiny.params, cache, jnp.asarray(ids[:, n:n + 4]))
  got = [(first, n - 1), (second, n + 3)]
  for t in range(n + 4, 12):
    step, cache = L.decode_step(tiny.model.apply, tiny.params, cache, jnp.asarray(ids[:, t]))
    got.append((step, t))
  assert np.asarray(cache["index"]).tolist() == [12, 12]
  for logits, pos in got:
    np.testing.assert_allclose(np.asarray(logits), one_block[:, pos], atol=1e-5)
  # decode_loop (the jitted scan of steps) runs it too: greedy = argmax of the forward
  cache = L.init_cache(tiny.model, 2, 16)
  first, cache = L.prefill(tiny.model.apply, tiny.params, cache, jnp.asarray(ids[:, :n]))
  toks, _ = L.decode_loop(tiny.model.apply, tiny.params, cache, first, jax.random.key(0), 12 - n)
  seq = np.concatenate([ids[:, :n], np.asarray(toks)], axis=1)
  full = np.asarray(_forward(tiny.model, tiny.params, jnp.asarray(seq)))
  np.testing.assert_array_equal(full[:, n - 1:-1].argmax(-1), np.asarray(toks))


def test_attention_softcap_and_scale():
  # attn_logit_softcapping (set on the dataclass; from_hf refuses it) is tanh(s / cap) * cap
  # on the scaled scores, before the mask: checked against a direct computation.
  rng = np.random.default_rng(2)
  qg = rng.standard_normal((1, 3, 2, 2, 8)).astype(np.float32) * 3
  k, v = rng.standard_normal((2, 1, 5, 2, 8)).astype(np.float32) * 3
  allowed = np.tril(np.ones((3, 5), bool), k=2)
  attend = jax.jit(lambda *a: A.merge([A.attend_keys(*a, scale=0.2, softcap=1.5)]))
  ctx = attend(qg, k, v, jnp.asarray(allowed))
  s = np.einsum("btkgd,bskd->bktgs", qg, k) * 0.2
  s = np.where(allowed[:, None, :], np.tanh(s / 1.5) * 1.5, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  want = np.einsum("bktgs,bskd->btkgd", p / p.sum(-1, keepdims=True), v)
  np.testing.assert_allclose(np.asarray(ctx), want, atol=1e-5)


def test_config_layouts():
  # the committed config.json: transformers 5.x's layout (rope_parameters by layer type)
  hf5 = json.loads((mr.checkpoint_dir("gemma3") / "config.json").read_text())
  assert set(hf5["rope_parameters"]) == {"full_attention", "sliding_attention"} and "rope_theta" not in hf5
  c = G.Gemma3Config.from_hf(hf5)
  assert c.layer_types == ("sliding_attention", "sliding_attention", "full_attention", "sliding_attention")
  assert (c.rope_theta, dict(c.rope_scaling), c.rope_local_theta, c.rope_local_scaling) == (
      10_000.0, {"rope_type": "linear", "factor": 2.0}, 100.0, ())
  assert c.query_pre_attn_scalar == 24.0 and c.tie_word_embeddings and c.final_logit_softcapping is None
  # transformers 4.x: rope_theta + rope_scaling (full-attention layers) + rope_local_base_freq
  hf4 = {k: v for k, v in hf5.items() if k != "rope_parameters"}
  hf4.update(rope_theta=10_000.0, rope_scaling={"type": "linear", "factor": 2.0}, rope_local_base_freq=100.0)
  assert G.Gemma3Config.from_hf(hf4) == c
  assert G.Gemma3Config.from_hf(c.to_hf()) == c
  # Gemma3ForConditionalGeneration: the text_config, which leaves out every default
  mm = G.Gemma3Config.from_hf({"model_type": "gemma3", "text_config": {
      "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
      "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}, "vision_config": {}})
  assert (mm.vocab_size, mm.num_heads, mm.num_kv_heads, mm.head_dim, mm.query_pre_attn_scalar) == (
      262_208, 8, 4, 256, 256)
  assert mm.layer_types[:6] == ("sliding_attention",) * 5 + ("full_attention",) and len(mm.layer_types) == 34
  assert (mm.rope_theta, mm.rope_local_theta, dict(mm.rope_scaling)["factor"]) == (1e6, 1e4, 8.0)
  assert abs(mm.num_params / 1e9 - 3.88) < 0.01  # gemma-3-4b's language model
  for bad, match in [({"model_type": "gemma2"}, "unsupported model_type 'gemma2'"),
                     ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
                      "rope_scaling: unsupported rope type 'yarn'"),
                     ({"rope_parameters": {"full_attention": {"rope_type": "dynamic", "factor": 2.0}}},
                      "full_attention rope_parameters: unsupported rope type 'dynamic'"),
                     ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0 is not implemented"),
                     ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
                     ({"hidden_activation": "silu"}, "unsupported hidden_activation 'silu'"),
                     ({"altup_num_inputs": 4}, "field\\(s\\) \\['altup_num_inputs'\\] are not implemented"),
                     ({"layer_types": ["sliding_attention"] * 3}, "layer_types has 3 entries for 4 layers"),
                     ({"layer_types": ["chunked_attention"] * 4}, "unsupported layer_types")]:
    with pytest.raises(aq.ModelConfigError, match=match):
      G.Gemma3Config.from_hf({**hf4, **bad})
  with pytest.raises(aq.ModelConfigError, match="sliding_attention rope_parameters: unsupported rope type 'yarn'"):
    G.Gemma3Config.from_hf({**hf5, "rope_parameters": {**hf5["rope_parameters"], "sliding_attention": {
        "rope_type": "yarn", "factor": 2.0}}})


def test_weights_loader(tiny):
  w = L.read_checkpoint_weights(mr.checkpoint_dir("gemma3"))
  c = tiny.cfg
  back = G.params_to_hf(tiny.params, c)
  assert set(back) == set(w)
  for k in w:
    np.testing.assert_array_equal(back[k], np.asarray(w[k], np.float32))
  # the multimodal checkpoints' names (transformers >= 4.52, and the older saved layout),
  # the vision tower's tensors dropped
  for prefix, head, vision in (("model.language_model.", "lm_head.weight", "model.vision_tower.x.weight"),
                               ("language_model.model.", "language_model.lm_head.weight", "vision_tower.x.weight")):
    mm = {prefix + k[len("model."):]: v for k, v in w.items()}
    mm.update({vision: w["model.norm.weight"], head: w["model.embed_tokens.weight"]})
    got = G.params_from_hf(mm, c)
    jax.tree.map(np.testing.assert_array_equal, got, tiny.params)
  bad = dict(w)
  del bad["model.layers.3.self_attn.k_norm.weight"]
  with pytest.raises(aq.ModelConfigError, match="missing tensor 'model.layers.3.self_attn.k_norm.weight'"):
    G.params_from_hf(bad, c)
  with pytest.raises(aq.ModelConfigError, match="unused tensors"):
    G.params_from_hf({**w, "model.layers.4.mlp.up_proj.weight": w["model.layers.0.mlp.up_proj.weight"]}, c)
  with pytest.raises(aq.ModelConfigError, match="unused tensors"):  # a vision tensor in a text checkpoint
    G.params_from_hf({**w, "vision_tower.x.weight": w["model.norm.weight"]}, c)


def test_bf16_close_to_f32(tiny):
  lm = G.load_gemma3(mr.checkpoint_dir("gemma3"), dtype="bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(lm.params))
  ids = jnp.asarray(np.random.default_rng(5).integers(0, 128, (2, 12)), jnp.int32)
  f32 = np.asarray(_forward(tiny.model, tiny.params, ids))
  bf = np.asarray(_forward(lm.model, lm.params, ids))
  assert bf.dtype == np.float32
  assert np.abs(bf - f32).max() < 0.05 * np.abs(f32).max()


def test_w8a8_every_weight_matmul_int8(tiny, tiny_ref):
  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.integers(0, 128, (2, 12)), jnp.int32) for _ in range(2)]
  stats = aq.calibrate(tiny.model, tiny.params, batches, progress=False)
  # q k v o gate up down, each one stacked site of 4 layers; the tied head (embedding.T)
  assert set(stats) == {f"layers/{g}/{n}" for g, ns in (("self_attn", G._ATTN), ("mlp", G._MLP)) for n in ns} \
      | {"embed_tokens/embedding"}
  assert all(stats[k].layers == 4 for k in stats if k.startswith("layers/"))
  assert stats["layers/self_attn/k_proj"].group == "layers/self_attn/q_proj"
  assert stats["layers/mlp/up_proj"].group == "layers/mlp/gate_proj"
  q, report = aq.quantize_params_with_report(tiny.params, stats, aq.QuantConfig(alpha=0.5, rotate=False))
  assert aq.report_summary(report).startswith("quantized 8 of 8 weight matmuls")
  f = aq.quantized_apply(tiny.model)
  ids, n = tiny_ref[:2]
  assert tm.int8_matmuls(f, q, jnp.asarray(ids)) == 8  # the scan body's seven, and the head
  cache = L.init_cache(tiny.model, 2, 16)
  assert tm.int8_matmuls(lambda p, c, t: L.decode_step(f, p, c, t), q, cache, jnp.asarray(ids[:, 0])) == 8
  y0 = np.asarray(_forward(tiny.model, tiny.params, jnp.asarray(ids)))
  y = np.asarray(jax.jit(f)(q, jnp.asarray(ids)))
  assert np.linalg.norm(y - y0) < 0.1 * np.linalg.norm(y0)
  assert (y.argmax(-1) == y0.argmax(-1)).mean() >= 0.75
  # the quantized cache path (every token a decode step) is the quantized forward's
  qsteps = cached_logits(f, tiny.model, q, ids, 0, max_len=16)
  np.testing.assert_allclose(qsteps, y, atol=1e-4 * np.abs(y).max())
