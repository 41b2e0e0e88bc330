"""GGUF checkpoints (llama.cpp's format, how most small pretrained LLMs are shared) into the
bundled Flax models: the Llama family (Llama, SmolLM, Mistral, Qwen2) and Gemma 3.

  lm = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")      # -> CausalLM, float32 params
  lm = load_gguf("gemma-3-270m-q4_k_m.gguf", dtype="bfloat16")

Read with our header parser and the `gguf` package (gguf.quants.dequantize for the block formats
Q4_0 .. Q8_0, K-quants, ...): every tensor is dequantized to float32, so the float model is
exactly the GGUF's weights. What llama.cpp's converter changed is undone, so that the
tensors carry transformers' names and meaning and the models' `params_from_hf` take them:
- Llama family: q/k rows were permuted for llama.cpp's interleaved RoPE; un-permuted
  here (HF's rotate-half layout).
- Gemma 3: norm weights are stored as w + 1 (llama.cpp multiplies by them); HF stores w
  (and computes x * (1 + w)), so 1 is subtracted.
The config comes from the GGUF metadata (`{arch}.*` keys) as a transformers config dict;
a metadata key that changes the math and is not implemented raises ModelConfigError.

The tokenizer is rebuilt from the GGUF vocabulary with the `tokenizers` library, as
llama.cpp tokenizes: `tokenizer.ggml.model` "gpt2" is byte-level BPE from the stored
merges, with the pre-tokenizer named by `tokenizer.ggml.pre`; "llama" is SentencePiece
BPE (merges in the order of the merged piece's score, byte fallback). Control tokens are
special tokens; user-defined tokens are matched whole, as SentencePiece does.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any

import numpy as np

from actquant_jax.errors import ModelArgumentError, ModelConfigError

# Tensor names: llama.cpp's -> transformers' (per layer: "blk.{i}." -> "model.layers.{i}.").
_LLAMA_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA3_LAYER = {
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# GGUF architecture -> (transformers model_type, per-layer names)
ARCHS = {"llama": ("llama", _LLAMA_LAYER), "qwen2": ("qwen2", _LLAMA_LAYER), "gemma3": ("gemma3_text", _GEMMA3_LAYER)}

# Metadata keys (after the "{arch}." prefix) read into the config, and those that change
# nothing in a forward pass. Any other key under the prefix raises.
_READ = {"context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
         "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.dimension_count",
         "vocab_size", "attention.key_length", "attention.value_length", "attention.sliding_window",
         "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length"}
_HARMLESS = {"rope.scaling.finetuned", "expert_count", "expert_used_count"}


@dataclasses.dataclass
class GGUFCheckpoint:
  """A GGUF file read into transformers' terms: config (a config.json dict), weights
  (HF names -> float32 arrays), tokenizer (tokenizers.Tokenizer), and the file's token
  settings (bos/eos ids, whether llama.cpp prepends BOS)."""

  arch: str
  config: dict
  weights: dict
  tokenizer: object
  bos_token_id: int | None
  eos_token_id: int | None
  add_bos_token: bool


# GGUF value types (ggml's gguf.h) -> struct formats; 8 = string, 9 = array.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_ELEMENTS = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I8": "<i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}


@dataclasses.dataclass(frozen=True)
class _Tensor:
  name: str
  tensor_type: Any   # gguf.GGMLQuantizationType
  shape: tuple       # ggml's order (fastest axis first), as GGUFReader gives it
  data: np.ndarray   # raw: the element type, or uint8 rows of blocks (gguf.quants.dequantize's input)


def _read_gguf_file(path: Path):
  """(metadata {key: value}, [_Tensor]) of a GGUF v2/v3 file, tensor data memory-mapped.
  Arrays of numbers come back as numpy arrays, of strings as lists. gguf.GGUFReader
  builds a numpy view per array element: 69 s for Gemma 3's 262k-token vocabulary, 1 s here."""
  import gguf

  buf = np.memmap(path, dtype=np.uint8, mode="r")
  mv = memoryview(buf)
  pos = 0

  def take(fmt):
    nonlocal pos
    v = struct.unpack_from(fmt, mv, pos)[0]
    pos += struct.calcsize(fmt)
    return v

  def string():
    nonlocal pos
    n = take("<Q")
    s = bytes(mv[pos:pos + n]).decode("utf-8", errors="replace")
    pos += n
    return s

  def value(vtype):
    nonlocal pos
    if vtype == 8:
      return string()
    if vtype == 9:
      itype, count = take("<I"), take("<Q")
      if itype in _NUMPY:
        a = np.frombuffer(mv, dtype=_NUMPY[itype], count=count, offset=pos).copy()
        pos += a.nbytes
        return a
      return [value(itype) for _ in range(count)]
    if vtype not in _SCALAR:
      raise ModelConfigError(f"{path}: GGUF value type {vtype} is unknown (a damaged or newer file)")
    return take(_SCALAR[vtype])

  try:
    if bytes(mv[:4]) != b"GGUF":
      raise ModelConfigError(f"{path}: not a GGUF file (magic {bytes(mv[:4])!r})")
    pos = 4
    version = take("<I")
    if version not in (2, 3):
      raise ModelConfigError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = take("<Q"), take("<Q")
    meta = {}
    for _ in range(n_kv):
      key = string()
      meta[key] = value(take("<I"))
    infos = []
    for _ in range(n_tensors):
      name = string()
      dims = tuple(take("<Q") for _ in range(take("<I")))
      infos.append((name, take("<I"), dims, take("<Q")))
  except struct.error:
    raise ModelConfigError(f"{path}: truncated GGUF header") from None
  align = int(meta.get("general.alignment", 32))
  start = -(-pos // align) * align
  tensors = []
  for name, raw_type, dims, offset in infos:
    qt = gguf.GGMLQuantizationType(raw_type)
    block, type_size = gguf.GGML_QUANT_SIZES[qt]
    n = int(np.prod(dims))
    shape = tuple(reversed(dims))
    nbytes = n * type_size // block
    at = start + offset
    if at + nbytes > buf.size:
      raise ModelConfigError(f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
    raw = buf[at:at + nbytes]
    if qt.name in _ELEMENTS:  # as GGUFReader: these as their elements, the rest as bytes
      data = raw.view(_ELEMENTS[qt.name]).reshape(shape)
    else:
      data = raw.reshape(gguf.quant_shape_to_byte_shape(shape, qt))
    tensors.append(_Tensor(name, qt, dims, data))
  return meta, tensors


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation: its converter (LlamaModel.permute) reshapes the
  rows to (head, 2, head_dim/2) and swaps the last two, interleaving the rotate-half pairs."""
  return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's permutation (what _unpermute undoes; for tests and writers)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _config(arch: str, meta: dict, tensor_names: set, path) -> dict:
  model_type = ARCHS[arch][0]
  prefix = arch + "."
  keys = {k[len(prefix):] for k in meta if k.startswith(prefix)}
  unknown = sorted(keys - _READ - _HARMLESS)
  if unknown:
    raise ModelConfigError(f"{path}: GGUF metadata {[prefix + k for k in unknown]} not implemented for {arch!r} "
                           f"(it may change the model's math)")
  g = lambda k, default=None: meta.get(prefix + k, default)
  heads = int(g("attention.head_count"))
  hidden = int(g("embedding_length"))
  vocab = int(g("vocab_size") or len(meta["tokenizer.ggml.tokens"]))
  head_dim = int(g("attention.key_length") or g("rope.dimension_count") or hidden // heads)
  if g("attention.value_length") not in (None, head_dim):
    raise ModelConfigError(f"{path}: value_length {g('attention.value_length')} != key_length {head_dim}")
  if arch != "gemma3" and g("rope.dimension_count") not in (None, head_dim):
    raise ModelConfigError(f"{path}: partial RoPE (rope.dimension_count {g('rope.dimension_count')} of head_dim "
                           f"{head_dim}) is not implemented")
  if "rope_freqs.weight" in tensor_names:
    raise ModelConfigError(f"{path}: a rope_freqs tensor (llama3-style RoPE factors) is not implemented")
  cfg = dict(model_type=model_type, vocab_size=vocab, hidden_size=hidden, num_hidden_layers=int(g("block_count")),
             intermediate_size=int(g("feed_forward_length")), num_attention_heads=heads,
             num_key_value_heads=int(g("attention.head_count_kv") or heads), head_dim=head_dim,
             rms_norm_eps=float(g("attention.layer_norm_rms_epsilon")),
             max_position_embeddings=int(g("context_length")),
             tie_word_embeddings="output.weight" not in tensor_names)
  scaling = g("rope.scaling.type")
  rope = {"rope_type": "default"} if scaling in (None, "none") else {"rope_type": scaling,
                                                                     "factor": float(g("rope.scaling.factor"))}
  if rope["rope_type"] not in ("default", "linear"):
    raise ModelConfigError(f"{path}: rope scaling {scaling!r} is not implemented (none, linear)")
  if arch == "gemma3":
    # llama.cpp's gemma3: every 6th layer global (the rest sliding-window, RoPE base 10000),
    # attention scaled by head_dim ** -0.5 (the 27B, by (hidden / heads) ** -0.5).
    n = cfg["num_hidden_layers"]
    cfg.update(hidden_activation="gelu_pytorch_tanh", rope_theta=float(g("rope.freq_base", 1e6)),
               rope_local_base_freq=10000.0, sliding_window=int(g("attention.sliding_window")),
               layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)],
               query_pre_attn_scalar=head_dim if n != 62 else hidden // heads,
               final_logit_softcapping=None, attn_logit_softcapping=None, attention_bias=False,
               rope_scaling=None if rope["rope_type"] == "default" else rope)
  else:
    cfg.update(hidden_act="silu", rope_theta=float(g("rope.freq_base", 10000.0)),
               rope_scaling=None if rope["rope_type"] == "default" else rope)
  return cfg


def read_gguf(path) -> GGUFCheckpoint:
  """Read a GGUF file: config, dequantized float32 weights with HF names, tokenizer."""
  import gguf  # an optional dependency of this module only

  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"read_gguf: {str(path)!r} is not a file")
  meta, tensors = _read_gguf_file(path)
  arch = meta.get("general.architecture")
  if arch not in ARCHS:
    raise ModelConfigError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {sorted(ARCHS)})")
  names = {t.name for t in tensors}
  cfg = _config(arch, meta, names, path)
  layer_names = ARCHS[arch][1]
  weights = {}
  for t in tensors:
    parts = t.name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in layer_names:
      hf = f"model.layers.{parts[1]}.{layer_names[parts[2]]}.{parts[3]}"
    elif len(parts) == 2 and parts[0] in _TOP:
      hf = f"{_TOP[parts[0]]}.{parts[1]}"
    else:
      raise ModelConfigError(f"{path}: tensor {t.name!r} has no place in a {arch!r} model")
    w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    shape = tuple(int(d) for d in reversed(t.shape))
    if w.shape != shape:
      w = w.reshape(shape)
    if arch != "gemma3" and parts[-2:] == ["attn_q", "weight"]:
      w = _unpermute(w, cfg["num_attention_heads"])
    elif arch != "gemma3" and parts[-2:] == ["attn_k", "weight"]:
      w = _unpermute(w, cfg["num_key_value_heads"])
    elif arch == "gemma3" and parts[-2].endswith("norm"):
      w = w - np.float32(1.0)
    weights[hf] = w
  tok = build_tokenizer(meta, path)
  get = lambda k: None if meta.get(k) is None else int(meta[k])
  return GGUFCheckpoint(arch, cfg, weights, tok, get("tokenizer.ggml.bos_token_id"),
                        get("tokenizer.ggml.eos_token_id"), bool(meta.get("tokenizer.ggml.add_bos_token", False)))


# ------------------------------------------------------------------ tokenizer

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by `tokenizer.ggml.pre`.
_GPT2_RE = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
_LLAMA3_RE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
              r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
_QWEN2_RE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
             r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def _byte_level_pre(pre: str, path):
  from tokenizers import Regex, pre_tokenizers as P
  byte_level = P.ByteLevel(add_prefix_space=False, use_regex=False)
  split = lambda rx: P.Split(Regex(rx), behavior="isolated", invert=False)
  table = {
      "default": lambda: P.Sequence([split(_GPT2_RE), byte_level]),
      "gpt2": lambda: P.Sequence([split(_GPT2_RE), byte_level]),
      "smollm": lambda: P.Sequence([P.Digits(individual_digits=True), split(_GPT2_RE), byte_level]),
      "llama-bpe": lambda: P.Sequence([split(_LLAMA3_RE), byte_level]),
      "qwen2": lambda: P.Sequence([split(_QWEN2_RE), byte_level]),
  }
  if pre not in table:
    raise ModelConfigError(f"{path}: tokenizer.ggml.pre {pre!r} is not implemented (supported: {sorted(table)})")
  return table[pre]()


def _spm_merges(tokens: list, scores: np.ndarray) -> list:
  """SentencePiece BPE as merges: every split of a piece into two pieces of the vocabulary,
  ranked by the merged piece's score (then by the parts' ids, as transformers' converter)."""
  ids = {t: i for i, t in enumerate(tokens)}
  found = []
  for t, i in ids.items():
    for k in range(1, len(t)):
      a, b = ids.get(t[:k]), ids.get(t[k:])
      if a is not None and b is not None:
        found.append((-scores[i], a, b))
  found.sort()
  return [(tokens[a], tokens[b]) for _, a, b in found]


def build_tokenizer(meta: dict, path="gguf"):
  """A `tokenizers.Tokenizer` from a GGUF's tokenizer.ggml.* metadata."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

  kind = meta.get("tokenizer.ggml.model")
  tokens = list(meta["tokenizer.ggml.tokens"])
  types = np.asarray(meta.get("tokenizer.ggml.token_type", np.ones(len(tokens), np.int32)))
  unk = meta.get("tokenizer.ggml.unknown_token_id")
  if kind == "gpt2":
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _byte_level_pre(meta.get("tokenizer.ggml.pre", "default"), path)
    tok.decoder = decoders.ByteLevel()
  elif kind == "llama":
    # SentencePiece pieces mark spaces with U+2581; whitespace-only pieces are stored with
    # real spaces in some GGUFs and mapped back.
    tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
    scores = np.asarray(meta["tokenizer.ggml.scores"], np.float64)
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, _spm_merges(tokens, scores),
                               unk_token=None if unk is None else tokens[int(unk)], fuse_unk=True, byte_fallback=True))
    norm = [normalizers.Replace(" ", "\u2581")]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
      norm.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
      dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
  else:
    raise ModelConfigError(f"{path}: tokenizer.ggml.model {kind!r} is not implemented (gpt2, llama)")
  # 3: control tokens (special: matched whole, skipped by decode(skip_special_tokens));
  # 4: user-defined pieces (matched whole, as text).
  tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in np.flatnonzero(types == 3)])
  tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in np.flatnonzero(types == 4)])
  tok.no_padding()
  tok.no_truncation()
  return tok


# ------------------------------------------------------------------ loading

def load_gguf(path, dtype="float32"):
  """A GGUF file as a bundled model: -> models.llama.CausalLM (model, params, tokenizer,
  cfg) for the Llama family or Gemma 3. `encode` follows the file's add_bos_token."""
  import jax.numpy as jnp

  from actquant_jax.models import gemma3, llama

  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.float32, jnp.bfloat16):
    raise ModelArgumentError(f"load_gguf: dtype must be float32 or bfloat16, got {dtype}")
  ck = read_gguf(path)
  if ck.arch == "gemma3":
    cfg = gemma3.Gemma3Config.from_hf(ck.config)
    model, params = gemma3.Gemma3ForCausalLM(cfg, param_dtype=dtype), gemma3.params_from_hf(ck.weights, cfg, dtype)
  else:
    cfg = llama.LlamaConfig.from_hf(ck.config)
    model, params = llama.LlamaForCausalLM(cfg, param_dtype=dtype), llama.params_from_hf(ck.weights, cfg, dtype)
  return llama.CausalLM(model, params, ck.tokenizer, cfg, bos_token_id=ck.bos_token_id if ck.add_bos_token else None,
                        eos_token_id=ck.eos_token_id)
