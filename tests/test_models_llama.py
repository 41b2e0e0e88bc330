"""The Flax Llama-family port (actquant_jax/models/llama.py): logits against PyTorch
transformers (live when torch is installed, else the committed tiny checkpoint and its
reference logits), the KV cache and generation, the loader's errors, and W8A8 on it."""

import importlib.util
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import actquant_jax as aq
from actquant_jax.models import attention as A
from actquant_jax.models import llama as L
from examples.llm import make_reference as mr

HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="the live check needs torch and transformers (CPU build)")
SHIPPED = Path(__file__).resolve().parents[1] / "examples" / "llm" / "model"


def cached_logits(apply, model, params, ids, n_prefill, max_len=None):
  """Last logits of a cached prefill of ids[:, :n_prefill], then of each later token."""
  cache = L.init_cache(model, ids.shape[0], max_len or ids.shape[1])
  logits, cache = L.prefill(apply, params, cache, jnp.asarray(ids[:, :n_prefill]))
  out = [logits]
  for t in range(n_prefill, ids.shape[1]):
    logits, cache = L.decode_step(apply, params, cache, jnp.asarray(ids[:, t]))
    out.append(logits)
  return np.stack([np.asarray(o) for o in out], axis=1)


def test_committed_reference_logits():
  # tests/data/llama_tiny: made by transformers (examples/llm/make_reference.py), committed.
  lm = L.load_llama(mr.TINY_DIR)
  with np.load(mr.TINY_REF) as z:
    ids, n, full, steps = z["ids"], int(z["n_prefill"]), z["full"], z["steps"]
  np.testing.assert_allclose(np.asarray(jax.jit(lm.model.apply)(lm.params, jnp.asarray(ids))), full, atol=1e-4)
  np.testing.assert_allclose(cached_logits(lm.model.apply, lm.model, lm.params, ids, n, max_len=16), steps, atol=1e-4)


def test_logits_to_keep_computes_only_the_last_positions():
  # What prefill asks for: the head runs on the kept positions only (its output shape),
  # with the numbers of the full pass, float and W8A8.
  lm = L.load_llama(mr.TINY_DIR)
  ids = jnp.asarray(np.random.default_rng(4).integers(0, 97, (2, 9)), jnp.int32)
  qparams = aq.quantize_params(lm.params, aq.calibrate(lm.model, lm.params, [ids], progress=False), aq.QuantConfig(alpha=0.5, rotate=False))
  for apply, params in ((lm.model.apply, lm.params), (aq.quantized_apply(lm.model), qparams)):
    full = jax.jit(apply)(params, ids)
    last = jax.jit(lambda p, i, apply=apply: apply(p, i, logits_to_keep=3))(params, ids)
    assert last.shape == (2, 3, full.shape[-1])
    np.testing.assert_allclose(np.asarray(last), np.asarray(full[:, -3:]), atol=1e-5)
  with pytest.raises(ValueError, match="logits_to_keep must be an int >= 0"):
    lm.model.apply(lm.params, ids, logits_to_keep=-1)


@needs_torch
@pytest.mark.parametrize("arch", ["llama", "llama-linear", "mistral", "qwen2"])
def test_matches_transformers(arch, tmp_path):
  # llama sharded (several safetensors + index), the others one file.
  model = mr.make_checkpoint(arch, tmp_path, seed=3, max_shard_size="60KB" if arch == "llama" else None)
  if arch == "llama":
    assert (tmp_path / "model.safetensors.index.json").exists()
  lm = L.load_llama(tmp_path)
  ids = np.random.default_rng(2).integers(0, 97, (3, 13)).astype(np.int32)
  full, steps = mr.reference_logits(model, ids, n_prefill=6)
  np.testing.assert_allclose(np.asarray(lm.model.apply(lm.params, jnp.asarray(ids))), full, atol=1e-4)
  np.testing.assert_allclose(cached_logits(lm.model.apply, lm.model, lm.params, ids, 6, max_len=20), steps, atol=1e-4)


@needs_torch
def test_greedy_generation_matches_transformers(tmp_path):
  import torch
  model = mr.make_checkpoint("qwen2", tmp_path, seed=4)
  lm = L.load_llama(tmp_path)
  ids = np.random.default_rng(5).integers(0, 97, (2, 5)).astype(np.int32)
  ours = np.asarray(L.generate(lm.model, lm.params, ids, 10))
  with torch.no_grad():
    theirs = model.generate(torch.tensor(ids, dtype=torch.long), max_new_tokens=10, do_sample=False,
                            pad_token_id=0).numpy()[:, 5:]
  np.testing.assert_array_equal(ours, theirs)


@needs_torch
def test_saved_checkpoint_loads_in_transformers(tmp_path):
  import torch
  import transformers
  lm = L.load_llama(mr.TINY_DIR)
  L.save_llama(tmp_path, lm.params, lm.cfg, max_shard_bytes=100_000)
  assert len(list(tmp_path.glob("*.safetensors"))) > 1
  theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  ids = np.arange(10, dtype=np.int32)[None] % 97
  with torch.no_grad():
    ref = theirs(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(np.asarray(lm.model.apply(lm.params, jnp.asarray(ids))), ref, atol=1e-4)


def test_save_load_roundtrip_sharded_bf16(tmp_path):
  import ml_dtypes
  lm = L.load_llama(mr.TINY_DIR)
  L.save_llama(tmp_path, lm.params, lm.cfg, dtype=ml_dtypes.bfloat16, max_shard_bytes=50_000)
  assert (tmp_path / "model.safetensors.index.json").exists()
  back = L.load_llama(tmp_path, dtype="bfloat16")
  leaves = jax.tree.leaves(back.params)
  assert all(x.dtype == jnp.bfloat16 for x in leaves)
  for a, b in zip(jax.tree.leaves(lm.params), leaves):
    np.testing.assert_array_equal(np.asarray(jnp.asarray(a, jnp.bfloat16)), np.asarray(b))
  # bf16 logits close to f32
  ids = jnp.arange(12)[None] % 97
  f32 = np.asarray(lm.model.apply(lm.params, ids))
  bf = np.asarray(back.model.apply(back.params, ids))
  assert np.abs(bf - f32).max() < 0.05 * np.abs(f32).max()


def test_generation_cache_and_sampling():
  lm = L.load_llama(mr.TINY_DIR)
  ids = np.random.default_rng(0).integers(0, 97, (2, 6)).astype(np.int32)
  greedy = np.asarray(L.generate(lm.model, lm.params, ids, 8))
  # greedy: each token is the argmax of the uncached forward over everything before it
  seq = np.concatenate([ids, greedy], axis=1)
  full = np.asarray(jax.jit(lm.model.apply)(lm.params, jnp.asarray(seq)))
  np.testing.assert_array_equal(full[:, 5:-1].argmax(-1), greedy)
  a = np.asarray(L.generate(lm.model, lm.params, ids, 8, temperature=1.0, top_k=10, rng=jax.random.key(1)))
  b = np.asarray(L.generate(lm.model, lm.params, ids, 8, temperature=1.0, top_k=10, rng=jax.random.key(1)))
  c = np.asarray(L.generate(lm.model, lm.params, ids, 8, temperature=1.0, rng=jax.random.key(2)))
  np.testing.assert_array_equal(a, b)
  assert a.shape == c.shape == (2, 8) and not np.array_equal(a, c)
  with pytest.raises(ValueError, match="max_len 10 < prompt 6"):
    L.generate(lm.model, lm.params, ids, 8, max_len=10)


@pytest.mark.parametrize("window", [None, 4], ids=["causal", "sliding-window"])
def test_blocked_attention_and_chunked_prefill_match_one_block(window, monkeypatch):
  # Causal attention runs in query blocks (each reads only the keys up to its last query)
  # and a prompt after earlier cache entries merges its own blocks with the cache's part.
  # With 3-query blocks: full forward, a 5 + 7 token chunked prefill (the second chunk at
  # index 5) and decode steps all equal the one-block forward.
  import dataclasses
  lm = L.load_llama(mr.TINY_DIR)
  model = L.LlamaForCausalLM(dataclasses.replace(lm.model.cfg, sliding_window=window))
  ids = np.random.default_rng(0).integers(0, 97, (2, 14)).astype(np.int32)
  forward = lambda: np.asarray(jax.jit(lambda p, x: model.apply(p, x))(lm.params, jnp.asarray(ids)))  # a new trace
  one_block = forward()
  monkeypatch.setattr(A, "BLOCK_Q", 3)
  np.testing.assert_allclose(forward(), one_block, atol=2e-5)
  apply = lambda *a, **k: model.apply(*a, **k)
  cache = L.init_cache(model, 2, 16)
  first, cache = L.prefill(apply, lm.params, cache, jnp.asarray(ids[:, :5]))
  second, cache = L.prefill(apply, lm.params, cache, jnp.asarray(ids[:, 5:12]))
  step, _ = L.decode_step(apply, lm.params, cache, jnp.asarray(ids[:, 12]))
  for got, pos in [(first, 4), (second, 11), (step, 12)]:
    np.testing.assert_allclose(np.asarray(got), one_block[:, pos], atol=2e-5)


def test_loader_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json"):
    L.load_llama(tmp_path)
  with pytest.raises(FileNotFoundError, match="not a directory"):
    L.load_llama(tmp_path / "nope")
  cfg = json.loads((mr.TINY_DIR / "config.json").read_text())
  with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
    L.LlamaConfig.from_hf({**cfg, "model_type": "gpt2"})
  with pytest.raises(ValueError, match="unsupported rope type .yarn."):
    L.LlamaConfig.from_hf({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
  with pytest.raises(ValueError, match="unsupported hidden_act 'gelu'"):
    L.LlamaConfig.from_hf({**cfg, "hidden_act": "gelu"})
  w = L.read_checkpoint_weights(mr.TINY_DIR)
  c = L.LlamaConfig.from_hf(cfg)
  bad = dict(w)
  del bad["model.layers.1.mlp.down_proj.weight"]
  with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.down_proj.weight'"):
    L.params_from_hf(bad, c)
  with pytest.raises(ValueError, match="unused tensors"):
    L.params_from_hf({**w, "model.layers.2.mlp.up_proj.weight": w["model.layers.0.mlp.up_proj.weight"]}, c)
  shutil.copy(mr.TINY_DIR / "config.json", tmp_path / "config.json")
  with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
    L.load_llama(tmp_path)
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
  with pytest.raises(FileNotFoundError, match="shards missing"):
    L.load_llama(tmp_path)


def _calibrated(lm, n=4, t=16, seed=0):
  rng = np.random.default_rng(seed)
  batches = [jnp.asarray(rng.integers(0, lm.cfg.vocab_size, (2, t)).astype(np.int32)) for _ in range(n)]
  return aq.calibrate(lm.model, lm.params, batches, progress=False)


def test_w8a8_decode_runs_int8():
  lm = L.load_llama(mr.TINY_DIR)
  stats = _calibrated(lm)
  assert len(stats) == 7 + 1  # q k v o gate up down (stacked over the scanned layers), lm_head
  assert stats["layers/mlp/down_proj"].layers == lm.cfg.num_layers
  # q/k/v read the input RMSNorm, gate/up the post-attention one: 1/s folds into them
  assert stats["layers/self_attn/k_proj"].foldable and stats["layers/mlp/up_proj"].foldable
  assert stats["layers/self_attn/k_proj"].group == "layers/self_attn/q_proj"
  qparams = aq.quantize_params(lm.params, stats, aq.QuantConfig(alpha=0.5, rotate=False))
  qapply = aq.quantized_apply(lm.model)
  cache = L.init_cache(lm.model, 2, 12)
  # the decode step's program: every projection is an int8 matmul, no float kernel is left
  jaxpr = str(jax.make_jaxpr(lambda p, c, t: L.decode_step(qapply, p, c, t))(qparams, cache, jnp.zeros(2, jnp.int32)))
  assert "i8[" in jaxpr
  assert "f32[64,64]" not in jaxpr and "f32[64,96]" not in jaxpr  # the float q/o and gate kernels
  ids = np.random.default_rng(1).integers(0, 97, (2, 12)).astype(np.int32)
  ref = cached_logits(lm.model.apply, lm.model, lm.params, ids, 6)
  q = cached_logits(qapply, lm.model, qparams, ids, 6)
  assert np.abs(q - ref).max() < 0.1 * np.abs(ref).max()
  # and the cached quantized logits are the uncached quantized forward's
  qfull = np.asarray(jax.jit(qapply)(qparams, jnp.asarray(ids)))
  np.testing.assert_allclose(q, qfull[:, 5:], atol=2e-2 * np.abs(qfull).max())
  toks = np.asarray(L.generate(qapply, qparams, ids[:, :6], 5, model=lm.model))
  assert toks.shape == (2, 5)


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").exists(), reason="the shipped model is not built")
def test_shipped_model_w8a8_perplexity():
  # Small version of examples/llm/run.py on the model we ship: W8A8 dynamic stays close to float.
  from examples.llm.run import run
  recs = run(model_dir=SHIPPED, n_calib=4, n_eval=4, speed=False, gen_tokens=0, log=lambda s: None,
             mode_names=["float32", "W8A8 dynamic, SmoothQuant 0.5", "W8A8 static, auto alpha"])
  by = {r["mode"]: r for r in recs}
  f = by["float32"]["perplexity"]
  assert f < 130  # 100.1 on all held-out windows (README)
  assert by["W8A8 dynamic, SmoothQuant 0.5"]["perplexity"] < 1.05 * f
  assert by["W8A8 static, auto alpha"]["perplexity"] < 1.15 * f
  assert by["W8A8 dynamic, SmoothQuant 0.5"]["top1_agreement"] > 0.9


@pytest.mark.parametrize("name", ["qwen2", "llama3"])
def test_transformers5_checkpoint_loads_with_its_rope(name, tmp_path):
  # Saved by transformers 5.25 (tests/data/hf5_configs, written by a random-init model):
  # RoPE only in `rope_parameters` (Qwen2 theta 1e6; Llama theta 5e5 with llama3 scaling),
  # `dtype` instead of `torch_dtype`. The theta-10000 default would be off by ~0.7.
  d = Path(__file__).parent / "data" / "hf5_configs" / name
  lm = L.load_llama(d)
  want = {"qwen2": (1e6, ()), "llama3": (5e5, "llama3")}[name]
  assert lm.cfg.rope_theta == want[0]
  assert lm.cfg.rope_scaling_dict.get("rope_type", ()) == want[1]
  with np.load(d / "logits.npz") as z:
    np.testing.assert_allclose(np.asarray(lm.model.apply(lm.params, jnp.asarray(z["input_ids"]))), z["logits"],
                               atol=1e-5)
  # a field that changes the math and that the loader does not implement: refused by name
  cfg = json.loads((d / "config.json").read_text())
  for extra in ({"attn_logit_softcapping": 30.0}, {"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn",
                                                                         "factor": 2.0}}):
    shutil.copytree(d, tmp_path / "x", dirs_exist_ok=True)
    (tmp_path / "x" / "config.json").write_text(json.dumps({**cfg, **extra}))
    with pytest.raises(aq.ModelConfigError, match="attn_logit_softcapping|'yarn'"):
      L.load_llama(tmp_path / "x")
