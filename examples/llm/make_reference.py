"""Tiny random Llama-family checkpoints made by PyTorch `transformers` (CPU), and their
reference logits (a full prefill, then every decode step through transformers' own KV
cache). tests/test_models_llama.py checks the Flax port against them live when torch is
installed, and against the committed tiny checkpoint + logits when it is not.

  python examples/llm/make_reference.py      # rewrites tests/data/llama_tiny{,_reference.npz}
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
TINY_DIR = ROOT / "tests" / "data" / "llama_tiny"
TINY_REF = ROOT / "tests" / "data" / "llama_tiny_reference.npz"

# Small shapes with every feature on: GQA (4 query heads on 2 kv heads), llama3 rope
# scaling with a short original context (so the ramp is exercised), Mistral's sliding
# window shorter than the test sequence, Qwen2's q/k/v bias and tied embeddings.
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None)
ARCHS = {
    "llama": dict(rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                         high_freq_factor=4.0, original_max_position_embeddings=16)),
    "llama-linear": dict(rope_scaling=dict(type="linear", factor=2.0), tie_word_embeddings=True),
    "mistral": dict(sliding_window=5, rope_theta=1e6),
    "qwen2": dict(tie_word_embeddings=True, rope_theta=1e6),
}


def make_checkpoint(arch: str, out_dir, seed: int = 0, max_shard_size=None, **overrides):
  """A random-init transformers model of `arch` saved to out_dir as safetensors; -> the
  torch model (eval mode)."""
  import torch
  import transformers
  kind = arch.split("-")[0]
  cfg_cls, model_cls = {
      "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
      "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
      "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
  }[kind]
  torch.manual_seed(seed)
  cfg = cfg_cls(**{**TINY, **ARCHS[arch], **overrides})
  model = model_cls(cfg).eval()
  with torch.no_grad():  # norms away from 1 and non-zero biases, so a missed one shows
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.2 * torch.randn_like(p))
  kw = {} if max_shard_size is None else dict(max_shard_size=max_shard_size)
  model.save_pretrained(str(out_dir), safe_serialization=True, **kw)
  return model


def reference_logits(model, ids: np.ndarray, n_prefill: int):
  """-> (full (B, T, V): one pass over ids; steps (B, T - n_prefill + 1, V): the last
  logits of a cached prefill of ids[:, :n_prefill], then of each later token fed alone
  through transformers' KV cache)."""
  import torch
  ids_t = torch.tensor(np.asarray(ids), dtype=torch.long)
  with torch.no_grad():
    full = model(ids_t).logits.numpy()
    out = model(ids_t[:, :n_prefill], use_cache=True)
    steps, past = [out.logits[:, -1].numpy()], out.past_key_values
    for t in range(n_prefill, ids_t.shape[1]):
      out = model(ids_t[:, t:t + 1], past_key_values=past, use_cache=True)
      steps.append(out.logits[:, -1].numpy())
      past = out.past_key_values
  return full, np.stack(steps, axis=1)


def main():
  model = make_checkpoint("llama", TINY_DIR)
  ids = np.random.default_rng(1).integers(0, TINY["vocab_size"], (2, 12)).astype(np.int32)
  full, steps = reference_logits(model, ids, n_prefill=7)
  np.savez_compressed(TINY_REF, ids=ids, n_prefill=np.int32(7), full=full, steps=steps)
  print(f"wrote {TINY_DIR} and {TINY_REF}")


if __name__ == "__main__":
  main()
