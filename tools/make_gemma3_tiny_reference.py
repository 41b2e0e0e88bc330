"""Tiny random Gemma 3 checkpoints made by PyTorch `transformers` (CPU; Gemma3ForCausalLM,
eager attention) and their reference logits: a full forward, then a cached prefill and
every decode step through transformers' own KV cache. tests/test_models_gemma3.py checks
the Flax port (actquant_jax/models/gemma3.py) against the committed ones always, and
against fresh ones live when torch is installed.

  python tools/make_gemma3_tiny_reference.py   # (torch + transformers) rewrites
      tests/data/gemma3_tiny/, tests/data/gemma3_tiny_extras/, tests/data/gemma3_tiny_reference.npz

Weights are random at a scale where every path matters (norm weights away from 0, logits
of order 1-10 so the soft caps bend them), rounded to bfloat16 and saved as bfloat16
(half the bytes; both sides compute in float32 on the same rounded values). Needs no jax.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
REF = DATA / "gemma3_tiny_reference.npz"
N_PREFILL = 5

# "gemma3": Gemma 3's own features at tiny size: GQA (4 query heads on 2 kv heads),
# query_pre_attn_scalar != head_dim, sliding layers (window 4 < the 12-token test) with
# their own RoPE base next to a full layer with a linearly scaled RoPE, tied head.
# "extras": what Gemma 3 checkpoints leave off but the config allows: the final logit
# soft cap, q/k/v/o biases, an untied head, exact-erf GELU. (Not attn_logit_softcapping:
# transformers' Gemma 3 attention never passes it on, so it changes nothing there; the
# port refuses a config that sets it.)
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, query_pre_attn_scalar=24, max_position_embeddings=64, sliding_window=4,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)
VARIANTS = {
    "gemma3": dict(num_hidden_layers=4,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                   rope_theta=10_000.0, rope_local_base_freq=100.0, rope_scaling=dict(rope_type="linear", factor=2.0)),
    "extras": dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                   rope_theta=10_000.0, rope_local_base_freq=100.0, attention_bias=True,
                   tie_word_embeddings=False, final_logit_softcapping=4.0, hidden_activation="gelu"),
}


def checkpoint_dir(variant: str) -> Path:
  return DATA / ("gemma3_tiny" if variant == "gemma3" else f"gemma3_tiny_{variant}")


def _config(variant: str, **overrides):
  """A Gemma3TextConfig in the layout of the installed transformers (5.x: rope_parameters
  keyed by layer type; 4.x: rope_theta, rope_scaling, rope_local_base_freq)."""
  import transformers
  kw = {**TINY, **VARIANTS[variant], **overrides}
  if int(transformers.__version__.split(".")[0]) >= 5:
    full = {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}
    full.update(kw.pop("rope_scaling", None) or {})
    local = {"rope_type": "default", "rope_theta": kw.pop("rope_local_base_freq")}
    kw["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
  cfg = transformers.Gemma3TextConfig(**kw)
  cfg._attn_implementation = "eager"
  return cfg


def make_checkpoint(variant: str, out_dir, seed: int = 0, **overrides):
  """A random transformers Gemma3ForCausalLM of `variant`, saved to out_dir (config.json +
  bfloat16 model.safetensors); -> the torch model (eval, float32, bf16-exact weights)."""
  import torch
  import transformers
  from safetensors.torch import save_file
  torch.manual_seed(seed)
  model = transformers.Gemma3ForCausalLM(_config(variant, **overrides)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):  # used as 1 + w
        p.copy_(0.3 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.2 * torch.randn_like(p))
      elif name.endswith("embed_tokens.weight"):
        p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
      else:  # Linear (out, in)
        p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
      p.copy_(p.to(torch.bfloat16).float())
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  model.config.save_pretrained(str(out))
  state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
           if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
  save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
  return model


def reference_logits(model, ids: np.ndarray, n_prefill: int):
  """-> (full (B, T, V): one pass over ids; steps (B, T - n_prefill + 1, V): the last
  logits of a cached prefill of ids[:, :n_prefill], then of each later token fed alone
  through transformers' KV cache)."""
  import inspect

  import torch
  cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.x / 4.x
  ids_t = torch.tensor(np.asarray(ids), dtype=torch.long)
  with torch.no_grad():
    full = model(ids_t).logits.float().numpy()
    out = model(ids_t[:, :n_prefill], use_cache=True)
    steps, past = [out.logits[:, -1].float().numpy()], out.past_key_values
    for t in range(n_prefill, ids_t.shape[1]):
      out = model(ids_t[:, t:t + 1], use_cache=True, **{cache_kw: past})
      steps.append(out.logits[:, -1].float().numpy())
      past = out.past_key_values
  return full, np.stack(steps, axis=1)


def main():
  import transformers
  arrays = {}
  for i, variant in enumerate(VARIANTS):
    model = make_checkpoint(variant, checkpoint_dir(variant), seed=i)
    ids = np.random.default_rng(10 + i).integers(0, TINY["vocab_size"], (2, 12)).astype(np.int32)
    full, steps = reference_logits(model, ids, N_PREFILL)
    arrays.update({f"{variant}_ids": ids, f"{variant}_full": full, f"{variant}_steps": steps})
  np.savez_compressed(REF, n_prefill=np.int32(N_PREFILL), transformers=np.array(transformers.__version__), **arrays)
  print(f"wrote {', '.join(str(checkpoint_dir(v).relative_to(ROOT)) for v in VARIANTS)} and "
        f"{REF.relative_to(ROOT)} (transformers {transformers.__version__})", file=sys.stderr)


if __name__ == "__main__":
  main()
