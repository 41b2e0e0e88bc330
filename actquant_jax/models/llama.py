"""A compact Flax linen causal LM for the Llama family (Llama 2/3, Mistral, Qwen2), written
with plain nn.Dense and nn.RMSNorm so actquant-jax calibrates, smooths (folding 1/s into
the RMSNorm scales in front of q/k/v and gate/up) and quantizes it unmodified; a
fixed-size KV cache in the linen "cache" collection; jitted prefill / decode steps with
greedy or sampled generation; and a loader for a local Hugging Face checkpoint directory
(config.json, *.safetensors or a sharded model.safetensors.index.json, tokenizer.json).

  lm = load_llama("path/to/checkpoint")                      # float32 (or dtype="bfloat16")
  logits = jax.jit(lm.model.apply)(lm.params, ids)           # (B, T, vocab), no cache
  out = generate(lm.model.apply, lm.params, ids, 64)         # greedy, KV cache
  out = generate(aq.quantized_apply(lm.model), qparams, ids, 64)   # the same, W8A8

The cache: `init_cache(model, batch, max_len)` makes zeros; apply(..., decode=True,
mutable=["cache"]) writes the tokens' keys/values at the cache index, attends over the
cache (causal, and Mistral's sliding window) and advances the index. Every sequence of
a batch shares one position (prompts of equal length).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy

from actquant_jax.errors import ModelArgumentError, ModelConfigError
from actquant_jax.models import attention as A
from actquant_jax.models import hf_config

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int = 32000
  hidden_size: int = 4096
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 128
  intermediate_size: int = 11008
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple = ()            # sorted (key, value) pairs of HF's rope_scaling dict
  max_position: int = 4096
  tie_word_embeddings: bool = False
  qkv_bias: bool = False              # Qwen2; Llama's attention_bias (also on o_proj)
  o_bias: bool = False
  mlp_bias: bool = False
  sliding_window: int | None = None   # Mistral
  model_type: str = "llama"

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ModelConfigError(f"LlamaConfig: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
    rope_type = self.rope_scaling_dict.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE:
      raise ModelConfigError(f"LlamaConfig: unsupported rope type {rope_type!r} (supported: {SUPPORTED_ROPE})")

  @property
  def rope_scaling_dict(self) -> dict:
    return dict(self.rope_scaling)

  @classmethod
  def from_hf(cls, cfg: dict) -> "LlamaConfig":
    """From a Hugging Face config.json dict (model_type llama, mistral or qwen2), as
    transformers 4.x or 5.x writes it. A field that may change the math and is not
    implemented here raises ModelConfigError (hf_config.check_fields)."""
    arch = cfg.get("model_type")
    where = f"config.json ({arch})"
    if arch not in SUPPORTED_ARCHS:
      raise ModelConfigError(f"config.json: unsupported model_type {arch!r} (supported: {SUPPORTED_ARCHS})")
    hf_config.check_fields(cfg, _IMPLEMENTED[arch], where)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
      raise ModelConfigError(f"{where}: unsupported hidden_act {act!r} (the Llama family uses 'silu')")
    if cfg.get("rope_interleaved", False):
      raise ModelConfigError(f"{where}: rope_interleaved=true is not implemented (HF's rotate-half layout only)")
    heads = cfg["num_attention_heads"]
    theta, scaling = hf_config.rope_from_hf(cfg, where)
    window = None
    if arch == "mistral":
      window = cfg.get("sliding_window")
    elif arch == "qwen2":
      if cfg.get("use_sliding_window", False):
        raise ModelConfigError(f"{where}: Qwen2 use_sliding_window=true is not implemented")
      local = sorted(set(cfg.get("layer_types") or ()) - {"full_attention"})
      if local:
        raise ModelConfigError(f"{where}: layer_types {local} are not implemented (full_attention only)")
    attention_bias = bool(cfg.get("attention_bias", False))
    return cls(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
        num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        intermediate_size=cfg["intermediate_size"], rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=theta, rope_scaling=scaling, max_position=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2" or attention_bias, o_bias=attention_bias and arch != "qwen2",
        mlp_bias=bool(cfg.get("mlp_bias", False)), sliding_window=window, model_type=arch)

  def to_hf(self) -> dict:
    """A config.json dict (for saving a checkpoint this code made)."""
    d = dict(model_type=self.model_type, architectures=[_HF_ARCH[self.model_type]], vocab_size=self.vocab_size,
             hidden_size=self.hidden_size, num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
             num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
             intermediate_size=self.intermediate_size, rms_norm_eps=self.rms_norm_eps,
             rope_theta=self.rope_theta, rope_scaling=self.rope_scaling_dict or None,
             max_position_embeddings=self.max_position, tie_word_embeddings=self.tie_word_embeddings,
             hidden_act="silu")
    if self.model_type == "llama":
      d.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
    if self.model_type == "mistral":
      d.update(sliding_window=self.sliding_window)
    return d

  @property
  def num_params(self) -> int:
    d, h, kv, hd, f = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size
    layer = d * hd * (h + 2 * kv) + h * hd * d + 3 * d * f + 2 * d
    return self.vocab_size * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + d


_HF_ARCH = dict(llama="LlamaForCausalLM", mistral="MistralForCausalLM", qwen2="Qwen2ForCausalLM")
_COMMON = {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
           "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "hidden_act",
           "tie_word_embeddings", "rope_interleaved"}
_IMPLEMENTED = dict(llama=_COMMON | {"attention_bias", "mlp_bias"}, mistral=_COMMON | {"sliding_window"},
                    qwen2=_COMMON | {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"})


# ------------------------------------------------------------------ RoPE

def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
  """(head_dim/2,) inverse frequencies, with the checkpoint's theta and rope scaling."""
  d = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
  sc = cfg.rope_scaling_dict
  kind = sc.get("rope_type", "default")
  if kind == "linear":
    inv = inv / sc["factor"]
  elif kind == "llama3":
    # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
    factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old_len = sc["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old_len / lo, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def apply_rope(x, positions, inv_freq):
  """x (B, T, H, hd), positions (B, T) -> x rotated (HF's rotate-half layout); the angles
  are computed in f32, the product in x's dtype, as in the reference."""
  ang = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, hd/2)
  ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(ang).astype(x.dtype), jnp.sin(ang).astype(x.dtype)
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rot * sin


# ------------------------------------------------------------------ modules

class Attention(nn.Module):
  cfg: LlamaConfig
  kv_cache: str = "float"

  @nn.compact
  def __call__(self, x, positions, cache=None, layer=None, index=None):
    """cache None: positions 0..t-1, no cache. Else (decode) the stacked cache arrays,
    this layer's index in them and each sequence's position -> (out, cache)."""
    c = self.cfg
    b, t, _ = x.shape
    h, kv, hd = c.num_heads, c.num_kv_heads, c.head_dim
    q = nn.Dense(h * hd, use_bias=c.qkv_bias, name="q_proj")(x).reshape(b, t, h, hd)
    k = nn.Dense(kv * hd, use_bias=c.qkv_bias, name="k_proj")(x).reshape(b, t, kv, hd)
    v = nn.Dense(kv * hd, use_bias=c.qkv_bias, name="v_proj")(x).reshape(b, t, kv, hd)
    inv_freq = rope_inv_freq(c)
    rope = lambda y, pos: apply_rope(y, pos, inv_freq)
    window, scale = c.sliding_window, hd ** -0.5
    attend = functools.partial(A.attend_keys, scale=scale)
    causal = lambda qg, k, v: A.causal_blocks(qg, k, v, attend, window, max_window=window)
    if cache is not None:
      ctx, cache = A.cached_attention(q, k, v, cache, layer, index, rope=rope, causal=causal, kv_cache=self.kv_cache,
                                      scale=scale, softcap=None, window=window)
    else:  # positions are 0..t-1 (LlamaForCausalLM's own)
      q, k = rope(q, positions), rope(k, positions)
      ctx = A.merge([causal(q.reshape(b, t, kv, h // kv, hd), k, v)])
    ctx = ctx.astype(q.dtype).reshape(b, t, h * hd)
    return nn.Dense(c.hidden_size, use_bias=c.o_bias, name="o_proj")(ctx), cache


class MLP(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    gate = nn.Dense(c.intermediate_size, use_bias=c.mlp_bias, name="gate_proj")(x)
    up = nn.Dense(c.intermediate_size, use_bias=c.mlp_bias, name="up_proj")(x)
    return nn.Dense(c.hidden_size, use_bias=c.mlp_bias, name="down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
  """One pre-norm block; the scan's body: ((x, cache), positions, index, layer) -> ((x,
  cache), None), cache the stacked KV arrays ({} without one)."""
  cfg: LlamaConfig
  kv_cache: str = "float"

  @nn.compact
  def __call__(self, carry, positions, index, layer):
    x, cache = carry
    eps, dtype = self.cfg.rms_norm_eps, x.dtype
    h, cache = Attention(self.cfg, self.kv_cache, name="self_attn")(
        nn.RMSNorm(epsilon=eps, name="input_layernorm")(x), positions, cache or None, layer, index)
    x = x + h
    y = x + MLP(self.cfg, name="mlp")(nn.RMSNorm(epsilon=eps, name="post_attention_layernorm")(x))
    return (y.astype(dtype), cache or {}), None  # the carry keeps its dtype (init: f32 layers after a bf16 embedding)


def scanned_layers(layer_cls, cfg, length: int, *, in_axes=nn.broadcast, name: str = "layers", **kw):
  """`length` copies of layer_cls as one nn.scan: params stacked on a leading layer axis
  (params["layers"][...] of shape (L, ...)), the body traced and compiled once whatever
  the depth. The body is called (carry, *args) -> (carry, None); in_axes says which args
  are per layer (0) and which the same for all (nn.broadcast)."""
  return nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=in_axes, length=length)(cfg, name=name, **kw)


def run_layers(mdl: nn.Module, layers, x, per_layer: tuple, *, decode: bool, kv_cache: str, lengths, num_kv_heads: int,
               head_dim: int, dtype):
  """x through the scanned `layers` (called (carry, positions, index, *per_layer, layer ids)),
  with the model's KV cache when decoding: its stacked arrays ride in the scan's carry
  (written in place), and each sequence's index advances by its real length (lengths,
  or all t tokens)."""
  b, t = x.shape[:2]
  positions = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
  ids = jnp.arange(mdl.cfg.num_layers, dtype=jnp.int32)
  if not decode:
    (x, _), _ = layers((x, {}), positions, jnp.zeros((b,), jnp.int32), *per_layer, ids)
    return x
  cvars, index, initialized = A.cache_variables(mdl, kv_cache, mdl.cfg.num_layers, b, t, num_kv_heads, head_dim,
                                                 dtype)
  (x, cache), _ = layers((x, {n: c.value for n, c in cvars.items()}), positions, index.value, *per_layer, ids)
  if initialized:  # (init: the zeros of the shapes; init_cache makes its own)
    for n, c in cvars.items():
      c.value = cache[n]
    index.value = index.value + (t if lengths is None else lengths.astype(jnp.int32))
  return x


class LlamaForCausalLM(nn.Module):
  """input_ids (B, T) int -> logits (B, T, vocab) in f32.

  decode=False: one causal pass over positions 0..T-1 (training, perplexity,
  calibration). decode=True: through the KV cache (pass the cache and mutable=["cache"]),
  each sequence at its own position; lengths (B,): the real tokens of right-padded
  prompts (the rest are padding the cache does not keep). logits_to_keep > 0: the logits
  of the last that many positions only (B, n, vocab), as in transformers: a prefill needs
  one, and the (T, vocab) head is its largest matmul; with lengths, 1 keeps each
  sequence's last real position. kv_cache: the cache's format, "float" (the params'
  dtype), "int8" or "fp8" (models/attention.py).
  """
  cfg: LlamaConfig
  param_dtype: Any = jnp.float32
  kv_cache: str = "float"

  @nn.compact
  def __call__(self, input_ids, decode: bool = False, logits_to_keep: int = 0, lengths=None):
    c = self.cfg
    b, t = input_ids.shape
    check_call(self, logits_to_keep, lengths, decode)
    embed = nn.Embed(c.vocab_size, c.hidden_size, param_dtype=self.param_dtype, name="embed_tokens",
                     embedding_init=nn.initializers.normal(0.02))
    x = embed(input_ids)
    layers = scanned_layers(DecoderLayer, c, c.num_layers, in_axes=(nn.broadcast, nn.broadcast, 0),
                            kv_cache=self.kv_cache)
    x = run_layers(self, layers, x, (), decode=decode, kv_cache=self.kv_cache, lengths=lengths,
                   num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=self.param_dtype)
    x = nn.RMSNorm(epsilon=c.rms_norm_eps, name="norm")(kept_positions(x, logits_to_keep, lengths))
    if c.tie_word_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(c.vocab_size, use_bias=False, name="lm_head")(x)
    return logits.astype(jnp.float32)


def check_call(model: nn.Module, logits_to_keep, lengths, decode: bool) -> None:
  """The call arguments of a bundled causal LM (named errors)."""
  name = type(model).__name__
  A.check_kv_cache(model.kv_cache, f"{name}.kv_cache")
  if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
    raise ModelArgumentError(f"{name}: logits_to_keep must be an int >= 0 (0: every position), "
                             f"got {logits_to_keep!r}")
  if lengths is not None and (not decode or logits_to_keep not in (0, 1)):
    raise ModelArgumentError(f"{name}: lengths (right-padded prompts) is for decode=True with logits_to_keep "
                             f"0 or 1, got decode={decode}, logits_to_keep={logits_to_keep}")


def kept_positions(x, logits_to_keep: int, lengths=None):
  """x (B, T, d) -> the positions whose logits are wanted: all (0), the last n, or with
  lengths (B,) and n = 1 each sequence's last real one (B, 1, d)."""
  if not logits_to_keep:
    return x
  if lengths is None:
    return x[:, -logits_to_keep:]
  return jnp.take_along_axis(x, (lengths.astype(jnp.int32) - 1)[:, None, None], axis=1)


# ------------------------------------------------------------------ cache and generation

def init_cache(model: nn.Module, batch: int, max_len: int, dtype=None) -> dict:
  """Zero KV cache for `batch` sequences of up to `max_len` tokens, of any bundled causal LM
  (its "cache" collection, in the model's kv_cache format; a float cache in `dtype`, the
  params' by default)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch, max_len), jnp.int32),
                                             decode=True))["cache"]
  dtype = dtype or model.param_dtype

  def zeros(path, s):
    float_kv = path[-1].key in ("k", "v") and jnp.issubdtype(s.dtype, jnp.floating) and s.dtype.itemsize > 1
    return jnp.zeros(s.shape, dtype if float_kv else s.dtype)
  return jax.tree_util.tree_map_with_path(zeros, shapes)


@functools.partial(jax.jit, static_argnames=("apply",))
def prefill(apply, params, cache, input_ids, lengths=None):
  """Run the prompts through the cache. lengths (B,): right-padded prompts of these
  lengths (None: all T tokens are real). -> (logits of each prompt's last token (B,
  vocab), cache)."""
  variables = {**params, "cache": cache}
  logits, new = apply(variables, input_ids, decode=True, logits_to_keep=1, lengths=lengths, mutable=["cache"])
  return logits[:, -1], new["cache"]


@functools.partial(jax.jit, static_argnames=("apply",))
def decode_step(apply, params, cache, token):
  """One token (B,) through the cache -> (logits (B, vocab), cache)."""
  logits, new = apply({**params, "cache": cache}, token[:, None], decode=True, mutable=["cache"])
  return logits[:, 0], new["cache"]


def sample(logits, rng, temperature: float = 0.0, top_k: int = 0):
  """Greedy at temperature 0, else softmax(logits / temperature) over the top_k (0: all)."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("apply", "steps", "temperature", "top_k", "eos_token_id",
                                             "pad_token_id"))
def decode_loop(apply, params, cache, first_logits, rng, steps: int, temperature: float = 0.0, top_k: int = 0,
                eos_token_id: int | None = None, pad_token_id: int = 0):
  """`steps` tokens after the prefill, in one jitted loop: token i is sampled from the
  logits of step i-1, then fed through the cache. With eos_token_id, a sequence stops at
  its EOS (kept in its output, pad_token_id after it) and the loop ends when every
  sequence has. -> (tokens (B, steps), cache)."""
  b = first_logits.shape[0]
  keys = jax.random.split(rng, steps)
  if eos_token_id is None:
    def body(carry, key):
      logits, cache = carry
      tok = sample(logits, key, temperature, top_k)
      logits, cache = decode_step(apply, params, cache, tok)
      return (logits, cache), tok
    (_, cache), toks = jax.lax.scan(body, (first_logits, cache), keys)
    return toks.T, cache

  def cond(carry):
    i, _, _, done, _ = carry
    return (i < steps) & ~jnp.all(done)

  def step(carry):
    i, logits, cache, done, toks = carry
    tok = jnp.where(done, pad_token_id, sample(logits, keys[i], temperature, top_k))
    toks = toks.at[:, i].set(tok)
    done = done | (tok == eos_token_id)
    logits, cache = decode_step(apply, params, cache, tok)
    return i + 1, logits, cache, done, toks
  init = (jnp.int32(0), first_logits, cache, jnp.zeros((b,), bool), jnp.full((b, steps), pad_token_id, jnp.int32))
  _, _, cache, _, toks = jax.lax.while_loop(cond, step, init)
  return toks, cache


def pad_prompts(prompts) -> tuple[np.ndarray, np.ndarray]:
  """A (B, T) array (all of length T) or a list of 1-D token sequences of any lengths ->
  (ids (B, max length) right-padded with 0, lengths (B,))."""
  if isinstance(prompts, (list, tuple)):
    seqs = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    if not seqs or min(len(s) for s in seqs) == 0:
      raise ModelArgumentError("generate: prompts must be a non-empty list of non-empty token sequences")
    ids = np.zeros((len(seqs), max(len(s) for s in seqs)), np.int32)
    for i, s in enumerate(seqs):
      ids[i, :len(s)] = s
    return ids, np.asarray([len(s) for s in seqs], np.int32)
  ids = np.asarray(prompts)
  if ids.ndim != 2 or ids.shape[1] == 0:
    raise ModelArgumentError(f"generate: input_ids must be (B, T) with T > 0 or a list of sequences, "
                             f"got shape {ids.shape}")
  return ids.astype(np.int32), np.full((ids.shape[0],), ids.shape[1], np.int32)


def generate(apply, params, input_ids, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
             rng=None, max_len: int | None = None, cache_dtype=None, model: nn.Module | None = None,
             eos_token_id: int | None = None, pad_token_id: int = 0):
  """Generate `max_new_tokens` after each prompt: input_ids (B, T), or a list of token
  sequences of different lengths (a ragged batch: right-padded, each sequence at its own
  position in the cache, so its tokens are those it gets alone).

  apply: the model (its .apply is used), model.apply, or aq.quantized_apply(model) with
  quantized params (then pass `model` too, for the cache shapes and format). Any bundled
  causal LM (Llama family, Gemma 3). eos_token_id: each sequence stops at its own EOS
  (pad_token_id after it). -> tokens (B, max_new_tokens).
  """
  if isinstance(apply, nn.Module):
    model, apply = apply, apply.apply
  if model is None:
    model = getattr(apply, "__self__", None)
  if not isinstance(model, nn.Module) or not hasattr(model, "cfg"):
    raise ModelArgumentError("generate: pass model= (the causal LM module: its cache shapes are needed)")
  ids, lengths = pad_prompts(input_ids)
  b, t = ids.shape
  max_len = max_len or t + max_new_tokens
  if max_len < t + max_new_tokens:
    raise ModelArgumentError(f"generate: max_len {max_len} < prompt {t} + max_new_tokens {max_new_tokens}")
  cache = init_cache(model, b, max_len, cache_dtype)
  ragged = bool((lengths != t).any())
  logits, cache = prefill(apply, params, cache, jnp.asarray(ids), jnp.asarray(lengths) if ragged else None)
  rng = jax.random.key(0) if rng is None else rng
  toks, _ = decode_loop(apply, params, cache, logits, rng, max_new_tokens, float(temperature), int(top_k),
                        eos_token_id, int(pad_token_id))
  return toks


# ------------------------------------------------------------------ safetensors

def read_checkpoint_weights(model_dir) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint dir: model.safetensors.index.json's shards, else every
  *.safetensors file."""
  d = Path(model_dir)
  index = d / "model.safetensors.index.json"
  if index.exists():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    missing = [f for f in files if not (d / f).exists()]
    if missing:
      raise FileNotFoundError(f"{index}: shards missing from {d}: {missing}")
  else:
    files = sorted(p.name for p in d.glob("*.safetensors"))
  if not files:
    raise FileNotFoundError(f"{d}: no *.safetensors weights (PyTorch .bin checkpoints are not read)")
  out = {}
  for f in files:
    out.update(safetensors.numpy.load_file(str(d / f)))
  return out


# ------------------------------------------------------------------ HF weights <-> params

def stack_layers(per_layer: list[dict]) -> dict:
  """[layer i's param tree] -> one tree of (L, ...) arrays (the scanned layers' layout)."""
  return jax.tree.map(lambda *a: jnp.stack(a), *per_layer)


def unstack_layers(stacked: dict, num_layers: int) -> list[dict]:
  return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(num_layers)]


class TensorSource:
  """Pops HF-named tensors from a state dict, cast to `dtype`; `finish` raises on leftovers:
  every tensor of a checkpoint is used or the load fails (ModelConfigError, naming it)."""

  def __init__(self, weights: dict, dtype, where: str):
    self.w = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
    self.dtype, self.where = dtype, where

  def _cast(self, a):
    a = np.asarray(a)
    return jnp.asarray(a if a.dtype == np.dtype(self.dtype) else a.astype(np.float32), self.dtype)

  def pop(self, name: str, transpose: bool = False):
    if name not in self.w:
      raise ModelConfigError(f"{self.where}: missing tensor {name!r}")
    a = np.asarray(self.w.pop(name))
    return self._cast(a.T if transpose else a)

  def linear(self, name: str, bias: bool) -> dict:
    d = {"kernel": self.pop(f"{name}.weight", transpose=True)}  # torch Linear is (out, in)
    if bias:
      d["bias"] = self.pop(f"{name}.bias")
    return d

  def finish(self, *optional: str) -> None:
    for name in optional:
      self.w.pop(name, None)
    if self.w:
      raise ModelConfigError(f"{self.where}: unused tensors {sorted(self.w)[:5]}")


def params_from_hf(weights: dict, cfg: LlamaConfig, dtype=jnp.float32) -> dict:
  """HF state dict (name -> array) -> LlamaForCausalLM variables in `dtype`, the layers
  stacked. Every tensor must be used: missing names and leftovers raise."""
  src = TensorSource(weights, dtype, "Llama weights")
  norm = lambda name: {"scale": src.pop(f"{name}.weight")}
  layers = []
  for i in range(cfg.num_layers):
    pre = f"model.layers.{i}"
    layers.append({
        "input_layernorm": norm(f"{pre}.input_layernorm"),
        "post_attention_layernorm": norm(f"{pre}.post_attention_layernorm"),
        "self_attn": {n: src.linear(f"{pre}.self_attn.{n}", cfg.o_bias if n == "o_proj" else cfg.qkv_bias)
                      for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "mlp": {n: src.linear(f"{pre}.mlp.{n}", cfg.mlp_bias) for n in ("gate_proj", "up_proj", "down_proj")},
    })
  p = {"embed_tokens": {"embedding": src.pop("model.embed_tokens.weight")}, "layers": stack_layers(layers),
       "norm": norm("model.norm")}
  if not cfg.tie_word_embeddings:
    p["lm_head"] = src.linear("lm_head", False)
  src.finish("lm_head.weight")  # some tied checkpoints store the head's copy
  return {"params": p}


def params_to_hf(params: dict, cfg: LlamaConfig, dtype=np.float32) -> dict[str, np.ndarray]:
  """The inverse of params_from_hf: HF names, torch (out, in) layout, numpy `dtype`."""
  p = params["params"] if "params" in params else params
  arr = lambda a: np.asarray(jnp.asarray(a, jnp.float32)).astype(dtype)
  out = {"model.embed_tokens.weight": arr(p["embed_tokens"]["embedding"]), "model.norm.weight": arr(p["norm"]["scale"])}
  for i, L in enumerate(unstack_layers(p["layers"], cfg.num_layers)):
    pre = f"model.layers.{i}"
    for n in ("input_layernorm", "post_attention_layernorm"):
      out[f"{pre}.{n}.weight"] = arr(L[n]["scale"])
    for grp in ("self_attn", "mlp"):
      for n, d in L[grp].items():
        out[f"{pre}.{grp}.{n}.weight"] = np.ascontiguousarray(arr(d["kernel"]).T)
        if "bias" in d:
          out[f"{pre}.{grp}.{n}.bias"] = arr(d["bias"])
  if not cfg.tie_word_embeddings:
    out["lm_head.weight"] = np.ascontiguousarray(arr(p["lm_head"]["kernel"]).T)
  return out


# ------------------------------------------------------------------ loading

@dataclasses.dataclass
class CausalLM:
  """A loaded checkpoint: module, params, tokenizer (None if the checkpoint has none), and
  the token ids `encode` prepends (bos_token_id: None for none) / generation stops at."""

  model: nn.Module
  params: dict
  tokenizer: Any
  cfg: Any
  bos_token_id: int | None = None
  eos_token_id: int | None = None

  def encode(self, text: str) -> np.ndarray:
    if self.tokenizer is None:
      raise ModelArgumentError("this checkpoint has no tokenizer")
    # The tokenizer's own special tokens (a tokenizer.json post-processor adding BOS), or
    # the BOS a GGUF asks for (its rebuilt tokenizer has no post-processor).
    ids = self.tokenizer.encode(text).ids
    return np.asarray(([] if self.bos_token_id is None else [self.bos_token_id]) + ids, np.int32)

  def decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)])


def load_llama(model_dir, dtype="float32") -> CausalLM:
  """Load a Llama / Mistral / Qwen2 checkpoint directory; params in `dtype` (float32 or
  bfloat16)."""
  d = Path(model_dir)
  if not d.is_dir():
    raise FileNotFoundError(f"load_llama: model_dir {str(d)!r} is not a directory")
  if not (d / "config.json").exists():
    raise FileNotFoundError(f"load_llama: model_dir {str(d)!r} has no config.json")
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.float32, jnp.bfloat16):
    raise ModelArgumentError(f"load_llama: dtype must be float32 or bfloat16, got {dtype}")
  cfg = LlamaConfig.from_hf(json.loads((d / "config.json").read_text()))
  params = params_from_hf(read_checkpoint_weights(d), cfg, dtype)
  tok = None
  if (d / "tokenizer.json").exists():
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
  return CausalLM(LlamaForCausalLM(cfg, param_dtype=dtype), params, tok, cfg)


def save_llama(model_dir, params: dict, cfg: LlamaConfig, dtype=np.float32, tokenizer=None,
               max_shard_bytes: int | None = None) -> None:
  """Write config.json + model.safetensors (or shards + index when over max_shard_bytes)
  + tokenizer.json: a directory load_llama and transformers both read."""
  d = Path(model_dir)
  d.mkdir(parents=True, exist_ok=True)
  hf = cfg.to_hf()
  hf["torch_dtype"] = "bfloat16" if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16) else "float32"
  (d / "config.json").write_text(json.dumps(hf, indent=2))
  tensors = params_to_hf(params, cfg, dtype)
  if max_shard_bytes is None or sum(a.nbytes for a in tensors.values()) <= max_shard_bytes:
    safetensors.numpy.save_file(tensors, str(d / "model.safetensors"), {"format": "pt"})
  else:
    shards, cur, size = [], {}, 0
    for k, a in tensors.items():
      if cur and size + a.nbytes > max_shard_bytes:
        shards.append(cur)
        cur, size = {}, 0
      cur[k], size = a, size + a.nbytes
    shards.append(cur)
    weight_map = {}
    for i, sh in enumerate(shards):
      name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      safetensors.numpy.save_file(sh, str(d / name), {"format": "pt"})
      weight_map.update({k: name for k in sh})
    (d / "model.safetensors.index.json").write_text(json.dumps(
        dict(metadata=dict(total_size=sum(a.nbytes for a in tensors.values())), weight_map=weight_map), indent=2))
  if tokenizer is not None:
    tokenizer.save(str(d / "tokenizer.json"))
