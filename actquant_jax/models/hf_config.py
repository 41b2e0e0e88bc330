"""Reading a Hugging Face config.json dict the same way for every bundled model, from
transformers 4.x and 5.x alike.

transformers 5 writes RoPE as `rope_parameters` ({rope_theta, rope_type, factor, ...},
or one such dict per layer type for models with local and global layers) and `dtype`;
4.x wrote top-level `rope_theta`, `rope_scaling` ({type | rope_type, factor, ...}) and
`torch_dtype`. Any field a model does not implement and that may change its math raises
ModelConfigError naming it: a silently ignored field is a silently wrong model.
"""

from __future__ import annotations

from actquant_jax.errors import ModelConfigError

# PretrainedConfig's own fields (generation defaults, labels, bookkeeping) and the
# training-only ones: none of them changes a forward pass.
GENERIC_FIELDS = frozenset({
    "_name_or_path", "add_cross_attention", "architectures", "bad_words_ids", "begin_suppress_tokens",
    "bos_token_id", "chunk_size_feed_forward", "cross_attention_hidden_size", "decoder_start_token_id",
    "diversity_penalty", "do_sample", "dtype", "torch_dtype", "early_stopping", "encoder_no_repeat_ngram_size",
    "eos_token_id", "exponential_decay_length_penalty", "finetuning_task", "forced_bos_token_id",
    "forced_eos_token_id", "id2label", "is_decoder", "is_encoder_decoder", "label2id", "length_penalty",
    "max_length", "min_length", "model_type", "no_repeat_ngram_size", "num_beam_groups", "num_beams",
    "num_return_sequences", "output_attentions", "output_hidden_states", "output_scores", "pad_token_id",
    "prefix", "problem_type", "pruned_heads", "remove_invalid_values", "repetition_penalty", "return_dict",
    "return_dict_in_generate", "sep_token_id", "suppress_tokens", "task_specific_params", "temperature",
    "tf_legacy_loss", "tie_encoder_decoder", "tokenizer_class", "top_k", "top_p", "torchscript",
    "transformers_version", "typical_p", "use_bfloat16", "use_cache", "initializer_range", "attention_dropout",
    "max_position_embeddings", "pretraining_tp", "output_router_logits", "is_llama_config", "vocab_size",
})

ROPE_TYPES = ("default", "linear", "llama3")
# The keys of one RoPE parameter dict that a supported rope_type reads.
_ROPE_KEYS = {"default": set(), "linear": {"factor"},
              "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}}


def check_fields(cfg: dict, implemented: set, where: str) -> None:
  """ModelConfigError for a field neither generic nor in `implemented`."""
  unknown = sorted(set(cfg) - GENERIC_FIELDS - set(implemented))
  if unknown:
    raise ModelConfigError(
        f"{where}: field(s) {unknown} are not implemented by this model code and may change its math; "
        f"refusing to load rather than ignore them (if a field is known to be harmless, drop it from the config)")


def _one_rope(d: dict, where: str, default_theta: float | None) -> tuple[float, tuple]:
  d = dict(d)
  theta = d.pop("rope_theta", default_theta)
  if theta is None:
    raise ModelConfigError(f"{where}: no rope_theta")
  kind = d.pop("rope_type", d.pop("type", "default"))
  if kind not in ROPE_TYPES:
    raise ModelConfigError(f"{where}: unsupported rope type {kind!r} (supported: {ROPE_TYPES})")
  if kind == "default":
    d.pop("factor", None)  # some 5.x configs write factor 1.0 beside the default type
  extra = set(d) - _ROPE_KEYS[kind] - {"partial_rotary_factor"}
  if extra:
    raise ModelConfigError(f"{where}: rope fields {sorted(extra)} are not implemented for rope type {kind!r}")
  if d.pop("partial_rotary_factor", 1.0) != 1.0:
    raise ModelConfigError(f"{where}: partial_rotary_factor != 1 is not implemented")
  missing = _ROPE_KEYS[kind] - set(d)
  if missing:
    raise ModelConfigError(f"{where}: rope type {kind!r} needs {sorted(missing)}")
  scaling = {} if kind == "default" else {"rope_type": kind, **d}
  return float(theta), tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in scaling.items()))


def rope_from_hf(cfg: dict, where: str, layer_type: str | None = None,
                 default_theta: float | None = 10000.0) -> tuple[float, tuple]:
  """(theta, scaling as sorted (key, value) pairs; () for plain RoPE) of a config.json.

  layer_type: for models whose 5.x config keys `rope_parameters` by layer type
  ("full_attention", "sliding_attention")."""
  params = cfg.get("rope_parameters")
  if params is not None:
    if layer_type is not None and layer_type in params:
      params = params[layer_type]
    elif any(isinstance(v, dict) for v in params.values()):
      raise ModelConfigError(f"{where}: rope_parameters per layer type {sorted(params)} where one set was expected")
    return _one_rope(params, f"{where} rope_parameters", cfg.get("rope_theta", default_theta))
  scaling = dict(cfg.get("rope_scaling") or {})
  return _one_rope({**scaling, "rope_theta": cfg.get("rope_theta", default_theta)}, f"{where} rope_scaling",
                   default_theta)
