"""A compact Flax linen causal LM for Gemma 3 (the text model: Gemma3ForCausalLM, and the
language model of Gemma3ForConditionalGeneration), written with plain nn.Dense like
llama.py so actquant-jax calibrates, smooths and quantizes it unmodified, with its layers
as one `nn.scan` (params and KV cache stacked on a leading layer axis: compile time does
not grow with depth).

  lm = load_gemma3("path/to/checkpoint")                     # float32 (or dtype="bfloat16")
  logits = jax.jit(lm.model.apply)(lm.params, ids)           # (B, T, vocab), no cache
  cache = init_cache(lm.model, batch, max_len)               # llama.py's: zeros, stacked (L, ...)
  logits, cache = prefill(lm.model.apply, lm.params, cache, ids)   # llama.py's generic steps
  logits, cache = decode_step(aq.quantized_apply(lm.model), qparams, cache, tok)   # W8A8

Gemma 3 against Llama: the embedding times sqrt(hidden) (in the params' dtype); RMSNorm as
x / rms(x) * (1 + scale), in f32; four norms a layer (input, post-attention,
pre-feedforward, post-feedforward: the attention and MLP outputs are normed before their
residual adds); q_norm / k_norm (over head_dim, per head) before RoPE; scores scaled by
query_pre_attn_scalar ** -0.5; GeGLU (tanh GELU) MLP; interleaved sliding-window layers
(config.layer_types) with their own RoPE base (rope_local_base_freq) against the global
layers' rope_theta and rope scaling; optional final-logit soft-capping tanh(x / cap) * cap;
tied head. (attn_logit_softcapping is implemented but refused from a config.json:
transformers' Gemma 3 never applies it.)

The layer kind is data: the scan runs over a per-layer window (the sliding window, or
_FULL on full-attention layers) that picks the RoPE frequencies and masks the keys, so
one compiled body serves both kinds.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from actquant_jax.errors import ModelArgumentError, ModelConfigError
from actquant_jax.models import attention as A
from actquant_jax.models import hf_config
from actquant_jax.models.llama import (  # noqa: F401  (re-exported: the generic cache steps)
    CausalLM, TensorSource, apply_rope, check_call, decode_loop, decode_step, generate, init_cache, kept_positions,
    prefill, read_checkpoint_weights, rope_inv_freq, run_layers, sample, scanned_layers, stack_layers, unstack_layers)

SUPPORTED_ROPE = hf_config.ROPE_TYPES
LAYER_TYPES = ("sliding_attention", "full_attention")
ACTIVATIONS = {"gelu_pytorch_tanh": True, "gelu": False}  # name -> jax.nn.gelu(approximate=)
_FULL = A.FULL_WINDOW  # the window of a full-attention layer: longer than any sequence

# Gemma3TextConfig's defaults: a Gemma3ForConditionalGeneration config.json's text_config
# leaves out every field that has its default (gemma-3-4b-it's lists only 6).
_HF_DEFAULTS = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072,
    rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1_000_000.0, attention_bias=False,
    query_pre_attn_scalar=256, sliding_window=4096, layer_types=None, final_logit_softcapping=None,
    attn_logit_softcapping=None, rope_scaling=None, rope_local_base_freq=10_000.0,
    use_bidirectional_attention=False, sliding_window_pattern=6)
# config.json fields read here (besides hf_config.GENERIC_FIELDS); any other raises.
# cache_implementation ("hybrid") only picks transformers' cache class for generate.
_IMPLEMENTED = frozenset(_HF_DEFAULTS) | {"rope_parameters", "hidden_act", "_sliding_window_pattern",
                                          "cache_implementation"}


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
  vocab_size: int = 262_208
  hidden_size: int = 2304
  num_layers: int = 26
  num_heads: int = 8
  num_kv_heads: int = 4
  head_dim: int = 256
  intermediate_size: int = 9216
  rms_norm_eps: float = 1e-6
  query_pre_attn_scalar: float = 256.0
  sliding_window: int | None = 4096
  layer_types: tuple = ()              # "sliding_attention" / "full_attention" per layer
  rope_theta: float = 1_000_000.0      # full-attention layers
  rope_scaling: tuple = ()             # full-attention layers: sorted (key, value) pairs of HF's dict
  rope_local_theta: float = 10_000.0   # sliding layers (HF: rope_local_base_freq)
  rope_local_scaling: tuple = ()       # sliding layers ("default" in every Gemma 3)
  max_position: int = 131_072
  tie_word_embeddings: bool = True
  attention_bias: bool = False
  hidden_activation: str = "gelu_pytorch_tanh"
  attn_logit_softcapping: float | None = None   # applied when set here (from_hf refuses it: see there)
  final_logit_softcapping: float | None = None

  def __post_init__(self):
    if not self.layer_types:
      object.__setattr__(self, "layer_types", tuple(_pattern_types(self.num_layers, 6)))
    if len(self.layer_types) != self.num_layers:
      raise ModelConfigError(f"Gemma3Config: layer_types has {len(self.layer_types)} entries for "
                             f"{self.num_layers} layers")
    bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
    if bad:
      raise ModelConfigError(f"Gemma3Config: unsupported layer_types {bad} (supported: {LAYER_TYPES})")
    if self.num_heads % self.num_kv_heads:
      raise ModelConfigError(f"Gemma3Config: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
    if self.has_sliding and not (self.sliding_window and self.sliding_window > 0):
      raise ModelConfigError(f"Gemma3Config: sliding_attention layers need a sliding_window > 0, "
                             f"got {self.sliding_window!r}")
    if self.hidden_activation not in ACTIVATIONS:
      raise ModelConfigError(f"Gemma3Config: unsupported hidden_activation {self.hidden_activation!r} "
                             f"(supported: {tuple(ACTIVATIONS)})")
    for field, sc in (("rope_scaling", self.rope_scaling), ("rope_local_scaling", self.rope_local_scaling)):
      kind = dict(sc).get("rope_type", "default")
      if kind not in SUPPORTED_ROPE:
        raise ModelConfigError(f"Gemma3Config: {field}: unsupported rope type {kind!r} "
                               f"(supported: {SUPPORTED_ROPE})")

  @property
  def has_sliding(self) -> bool:
    return "sliding_attention" in self.layer_types

  @property
  def has_full(self) -> bool:
    return "full_attention" in self.layer_types

  @property
  def layer_windows(self) -> np.ndarray:
    """(L,) int32: each layer's window (the sliding window, or _FULL)."""
    return np.array([self.sliding_window if t == "sliding_attention" else _FULL for t in self.layer_types], np.int32)

  @classmethod
  def from_hf(cls, cfg: dict) -> "Gemma3Config":
    """From a Hugging Face config.json dict: Gemma3ForCausalLM's (model_type gemma3_text) or
    Gemma3ForConditionalGeneration's (model_type gemma3: its text_config). Both transformers
    4.x (rope_theta, rope_scaling, rope_local_base_freq) and 5.x (rope_parameters, a dict
    by layer type) layouts. Fields that change the math and are not implemented raise."""
    if cfg.get("model_type") == "gemma3" or "text_config" in cfg:
      cfg = {"model_type": "gemma3_text", **(cfg.get("text_config") or {})}
    arch = cfg.get("model_type")
    if arch != "gemma3_text":
      raise ModelConfigError(f"config.json: unsupported model_type {arch!r} (supported: 'gemma3_text', or 'gemma3' "
                             f"with a text_config)")
    where = "config.json (gemma3_text)"
    hf_config.check_fields(cfg, _IMPLEMENTED, where)
    c = {**_HF_DEFAULTS, **cfg}
    if c.get("use_bidirectional_attention"):
      raise ModelConfigError(f"{where}: use_bidirectional_attention=true is not implemented (causal LMs only)")
    if c.get("attn_logit_softcapping") is not None:
      # transformers' Gemma3Attention never passes it to the attention function (Gemma 2's
      # does): a config that sets it runs uncapped there. Either reading would be a guess.
      raise ModelConfigError(f"{where}: attn_logit_softcapping={c['attn_logit_softcapping']!r} is not implemented "
                             f"(transformers' Gemma 3 ignores it; no Gemma 3 checkpoint sets it)")
    act = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ACTIVATIONS:
      raise ModelConfigError(f"{where}: unsupported hidden_activation {act!r} (supported: {tuple(ACTIVATIONS)})")
    n = c["num_hidden_layers"]
    pattern = c.get("sliding_window_pattern") or c.get("_sliding_window_pattern") or 6
    types_ = c.get("layer_types") or _pattern_types(n, pattern)
    (theta, scaling), (local_theta, local_scaling) = _hf_rope(c, where)
    heads = c["num_attention_heads"]
    return cls(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=n, num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads, intermediate_size=c["intermediate_size"],
        rms_norm_eps=c["rms_norm_eps"], query_pre_attn_scalar=float(c["query_pre_attn_scalar"]),
        sliding_window=c.get("sliding_window"), layer_types=tuple(types_),
        rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta, rope_local_scaling=local_scaling,
        max_position=c["max_position_embeddings"], tie_word_embeddings=bool(c["tie_word_embeddings"]),
        attention_bias=bool(c["attention_bias"]), hidden_activation=act,
        final_logit_softcapping=_opt_float(c.get("final_logit_softcapping")))

  def to_hf(self) -> dict:
    """A config.json dict (Gemma3ForCausalLM, transformers 4.x layout, which 5.x reads too)."""
    if self.rope_local_scaling:
      raise ModelConfigError("Gemma3Config.to_hf: a scaled local RoPE has no transformers 4.x field")
    if self.attn_logit_softcapping is not None:
      raise ModelConfigError("Gemma3Config.to_hf: attn_logit_softcapping would be ignored by transformers' Gemma 3")
    return dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], vocab_size=self.vocab_size,
                hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
                intermediate_size=self.intermediate_size, rms_norm_eps=self.rms_norm_eps,
                query_pre_attn_scalar=_int_if_whole(self.query_pre_attn_scalar), sliding_window=self.sliding_window,
                layer_types=list(self.layer_types), rope_theta=self.rope_theta,
                rope_scaling=dict(self.rope_scaling) or None, rope_local_base_freq=self.rope_local_theta,
                max_position_embeddings=self.max_position, tie_word_embeddings=self.tie_word_embeddings,
                attention_bias=self.attention_bias, hidden_activation=self.hidden_activation,
                final_logit_softcapping=self.final_logit_softcapping)

  @property
  def num_params(self) -> int:
    d, h, kv, hd, f = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size
    layer = d * hd * (h + 2 * kv) + h * hd * d + 3 * d * f + 4 * d + 2 * hd
    if self.attention_bias:
      layer += hd * (h + 2 * kv) + d
    return self.vocab_size * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + d


def _pattern_types(n: int, pattern: int) -> list:
  """The pre-layer_types layout: every `pattern`-th layer full, the others sliding."""
  return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]


def _opt_float(v):
  return None if v is None else float(v)


def _int_if_whole(v):
  return int(v) if float(v).is_integer() else v  # transformers 5 validates query_pre_attn_scalar as an int


def _hf_rope(c: dict, where: str):
  """((theta, scaling) of the full-attention layers, (theta, scaling) of the sliding ones)."""
  local_default = float(c.get("rope_local_base_freq") or 10_000.0)
  params = c.get("rope_parameters")
  if params is not None and any(isinstance(v, dict) for v in params.values()):  # 5.x, by layer type
    other = sorted(set(params) - set(LAYER_TYPES))
    if other:
      raise ModelConfigError(f"{where}: rope_parameters for layer types {other} are not implemented")
    one = lambda kind, theta: hf_config.rope_from_hf({"rope_parameters": params.get(kind) or {}},
                                                     f"{where} {kind}", default_theta=theta)
    return one("full_attention", 1_000_000.0), one("sliding_attention", local_default)
  # 4.x (rope_theta, rope_scaling), or one rope_parameters set: the full-attention layers'.
  # HF builds the sliding layers' rotary embedding from rope_local_base_freq, type default.
  return hf_config.rope_from_hf(c, where, default_theta=1_000_000.0), (local_default, ())


def _inv_freq(head_dim: int, theta: float, scaling: tuple) -> np.ndarray:
  return rope_inv_freq(types.SimpleNamespace(head_dim=head_dim, rope_theta=theta, rope_scaling_dict=dict(scaling)))


# ------------------------------------------------------------------ modules

class RMSNorm(nn.Module):
  """Gemma's RMSNorm: x / rms(x) * (1 + scale), in f32, then x's dtype (scale starts at 0,
  as HF stores it: the `weight` of Gemma3RMSNorm)."""
  epsilon: float = 1e-6
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
    y = normed * (1 + scale.astype(jnp.float32))
    return y.astype(x.dtype)


class Attention(nn.Module):
  cfg: Gemma3Config
  param_dtype: Any = jnp.float32
  kv_cache: str = "float"

  @nn.compact
  def __call__(self, x, positions, window, cache=None, layer=None, index=None):
    """window: this layer's (traced) window, _FULL on a full-attention layer; cache,
    layer, index: as llama.Attention's (decode) -> (out, cache)."""
    c = self.cfg
    b, t, _ = x.shape
    h, kv, hd = c.num_heads, c.num_kv_heads, c.head_dim
    dense = lambda n, name: nn.Dense(n, use_bias=c.attention_bias, param_dtype=self.param_dtype, name=name)
    q = dense(h * hd, "q_proj")(x).reshape(b, t, h, hd)
    k = dense(kv * hd, "k_proj")(x).reshape(b, t, kv, hd)
    v = dense(kv * hd, "v_proj")(x).reshape(b, t, kv, hd)
    q = RMSNorm(c.rms_norm_eps, self.param_dtype, name="q_norm")(q)
    k = RMSNorm(c.rms_norm_eps, self.param_dtype, name="k_norm")(k)
    full_inv = _inv_freq(hd, c.rope_theta, c.rope_scaling)
    local_inv = _inv_freq(hd, c.rope_local_theta, c.rope_local_scaling)
    if c.has_sliding and c.has_full:
      inv_freq = jnp.where(window < _FULL, local_inv, full_inv)
    else:
      inv_freq = local_inv if c.has_sliding else full_inv
    rope = lambda y, pos: apply_rope(y, pos, inv_freq)
    scale, softcap = float(c.query_pre_attn_scalar) ** -0.5, c.attn_logit_softcapping
    attend = functools.partial(A.attend_keys, scale=scale, softcap=softcap)
    causal = lambda qg, k, v: A.causal_blocks(qg, k, v, attend, window, mixed=c.has_sliding and c.has_full,
                                              max_window=c.sliding_window if c.has_sliding else None)
    if cache is not None:
      ctx, cache = A.cached_attention(q, k, v, cache, layer, index, rope=rope, causal=causal, kv_cache=self.kv_cache,
                                      scale=scale, softcap=softcap, window=window)
    else:
      q, k = rope(q, positions), rope(k, positions)
      ctx = A.merge([causal(q.reshape(b, t, kv, h // kv, hd), k, v)])
    ctx = ctx.astype(q.dtype).reshape(b, t, h * hd)
    return dense(c.hidden_size, "o_proj")(ctx), cache


class MLP(nn.Module):
  cfg: Gemma3Config
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    dense = lambda n, name: nn.Dense(n, use_bias=False, param_dtype=self.param_dtype, name=name)
    gate = dense(c.intermediate_size, "gate_proj")(x)
    up = dense(c.intermediate_size, "up_proj")(x)
    act = jax.nn.gelu(gate, approximate=ACTIVATIONS[c.hidden_activation])
    return dense(c.hidden_size, "down_proj")(act * up)


class DecoderLayer(nn.Module):
  """One layer; the scan's body: ((x, cache), positions, index, window, layer) -> ((x,
  cache), None) (llama.DecoderLayer's carry)."""
  cfg: Gemma3Config
  param_dtype: Any = jnp.float32
  kv_cache: str = "float"

  @nn.compact
  def __call__(self, carry, positions, index, window, layer):
    (x, cache), c, dtype = carry, self.cfg, carry[0].dtype
    norm = lambda name: RMSNorm(c.rms_norm_eps, self.param_dtype, name=name)
    h, cache = Attention(c, self.param_dtype, self.kv_cache, name="self_attn")(
        norm("input_layernorm")(x), positions, window, cache or None, layer, index)
    x = x + norm("post_attention_layernorm")(h)
    h = MLP(c, self.param_dtype, name="mlp")(norm("pre_feedforward_layernorm")(x))
    return ((x + norm("post_feedforward_layernorm")(h)).astype(dtype), cache or {}), None  # the carry keeps its dtype


class Gemma3ForCausalLM(nn.Module):
  """input_ids (B, T) int -> logits (B, T, vocab) in f32; the call of
  llama.LlamaForCausalLM (decode, logits_to_keep), so llama.py's init_cache, prefill,
  decode_step and decode_loop run it. Params: embed_tokens, layers (every leaf stacked on
  a leading axis of num_layers), norm, lm_head (untied only). lengths, kv_cache: as
  llama.LlamaForCausalLM's."""
  cfg: Gemma3Config
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
    # HF: embed * torch.tensor(hidden ** 0.5).to(weight dtype) (sqrt(3072) is 55.5 in bf16)
    x = x * jnp.asarray(np.float32(c.hidden_size ** 0.5), x.dtype)
    layers = scanned_layers(DecoderLayer, c, c.num_layers, in_axes=(nn.broadcast, nn.broadcast, 0, 0),
                            param_dtype=self.param_dtype, kv_cache=self.kv_cache)
    x = run_layers(self, layers, x, (jnp.asarray(c.layer_windows),), decode=decode, kv_cache=self.kv_cache,
                   lengths=lengths, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=self.param_dtype)
    x = RMSNorm(c.rms_norm_eps, self.param_dtype, name="norm")(kept_positions(x, logits_to_keep, lengths))
    if c.tie_word_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(c.vocab_size, use_bias=False, param_dtype=self.param_dtype, name="lm_head")(x)
    logits = logits.astype(jnp.float32)
    if c.final_logit_softcapping is not None:
      cap = c.final_logit_softcapping
      logits = jnp.tanh(logits / cap) * cap
    return logits


# ------------------------------------------------------------------ HF weights <-> params

_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
# Gemma3ForConditionalGeneration's names of the language model: transformers >= 4.52
# (model.language_model.*, lm_head.*) and the checkpoints saved before (language_model.model.*,
# language_model.lm_head.*); its vision tower and projector are not part of the text model.
_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
             ("language_model.lm_head.", "lm_head."))
_VISION = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def _text_names(weights: dict) -> dict:
  out, multimodal = {}, False
  for k, v in weights.items():
    for old, new in _PREFIXES:
      if k.startswith(old):
        k, multimodal = new + k[len(old):], True
        break
    out[k] = v
  if multimodal:
    out = {k: v for k, v in out.items() if not k.startswith(_VISION)}
  return out


def params_from_hf(weights: dict, cfg: Gemma3Config, dtype=jnp.float32) -> dict:
  """HF state dict (name -> array) of Gemma3ForCausalLM (or the language model of
  Gemma3ForConditionalGeneration: model.language_model.* / language_model.model.*, its
  vision tensors dropped) -> Gemma3ForCausalLM variables in `dtype`, the layers stacked.
  HF's norm weights w are the `scale` of x * (1 + scale) as they are. Every tensor must be
  used: missing names and leftovers raise ModelConfigError."""
  src = TensorSource(_text_names(weights), dtype, "Gemma 3 weights")
  norm = lambda name: {"scale": src.pop(f"{name}.weight")}
  layers = []
  for i in range(cfg.num_layers):
    pre = f"model.layers.{i}"
    attn = {n: src.linear(f"{pre}.self_attn.{n}", cfg.attention_bias) for n in _ATTN}
    attn.update(q_norm=norm(f"{pre}.self_attn.q_norm"), k_norm=norm(f"{pre}.self_attn.k_norm"))
    layers.append({**{n: norm(f"{pre}.{n}") for n in _NORMS}, "self_attn": attn,
                   "mlp": {n: src.linear(f"{pre}.mlp.{n}", False) for n in _MLP}})
  p = {"embed_tokens": {"embedding": src.pop("model.embed_tokens.weight")}, "layers": stack_layers(layers),
       "norm": norm("model.norm")}
  if not cfg.tie_word_embeddings:
    p["lm_head"] = src.linear("lm_head", False)
  src.finish("lm_head.weight")  # the tied copy, when a checkpoint stores it
  return {"params": p}


def params_to_hf(params: dict, cfg: Gemma3Config, dtype=np.float32) -> dict[str, np.ndarray]:
  """The inverse of params_from_hf: Gemma3ForCausalLM names, torch (out, in) layout."""
  p = params["params"] if "params" in params else params
  arr = lambda a: np.asarray(jnp.asarray(a, jnp.float32)).astype(dtype)
  out = {"model.embed_tokens.weight": arr(p["embed_tokens"]["embedding"]), "model.norm.weight": arr(p["norm"]["scale"])}
  for i, lp in enumerate(unstack_layers(p["layers"], cfg.num_layers)):
    pre = f"model.layers.{i}"
    for n in _NORMS:
      out[f"{pre}.{n}.weight"] = arr(lp[n]["scale"])
    for grp, names in (("self_attn", _ATTN), ("mlp", _MLP)):
      for n in names:
        out[f"{pre}.{grp}.{n}.weight"] = np.ascontiguousarray(arr(lp[grp][n]["kernel"]).T)
        if "bias" in lp[grp][n]:
          out[f"{pre}.{grp}.{n}.bias"] = arr(lp[grp][n]["bias"])
    for n in ("q_norm", "k_norm"):
      out[f"{pre}.self_attn.{n}.weight"] = arr(lp["self_attn"][n]["scale"])
  if not cfg.tie_word_embeddings:
    out["lm_head.weight"] = np.ascontiguousarray(arr(p["lm_head"]["kernel"]).T)
  return out


# ------------------------------------------------------------------ loading

def load_gemma3(model_dir, dtype="float32") -> CausalLM:
  """Load a Gemma 3 checkpoint directory (Gemma3ForCausalLM, or the text model of a
  Gemma3ForConditionalGeneration one); params in `dtype` (float32 or bfloat16)."""
  d = Path(model_dir)
  if not d.is_dir():
    raise FileNotFoundError(f"load_gemma3: model_dir {str(d)!r} is not a directory")
  if not (d / "config.json").exists():
    raise FileNotFoundError(f"load_gemma3: model_dir {str(d)!r} has no config.json")
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.float32, jnp.bfloat16):
    raise ModelArgumentError(f"load_gemma3: dtype must be float32 or bfloat16, got {dtype}")
  hf = json.loads((d / "config.json").read_text())
  cfg = Gemma3Config.from_hf(hf)
  params = params_from_hf(read_checkpoint_weights(d), cfg, dtype)
  text = hf.get("text_config") or {}
  bos, eos = hf.get("bos_token_id", text.get("bos_token_id")), hf.get("eos_token_id", text.get("eos_token_id"))
  tok = None
  if (d / "tokenizer.json").exists():
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
  # Gemma expects <bos> first (transformers' tokenizer adds it): encode prepends bos_token_id
  return CausalLM(Gemma3ForCausalLM(cfg, param_dtype=dtype), params, tok, cfg, bos_token_id=bos,
                  eos_token_id=eos[0] if isinstance(eos, list) else eos)
