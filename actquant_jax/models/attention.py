"""Causal attention with a KV cache, shared by the bundled causal LMs (llama.py, gemma3.py):
softmax attention in parts merged by log-sum-exp, and the KV cache in one of three
formats -- float (the params' dtype), int8 or FP8 e4m3 with a scale per token and KV head
(computed as each token is written: no calibration).

Every sequence of a batch has its own position (the cache's `index` is (B,)): prompts of
different lengths are right-padded, prefilled with their `lengths`, and each sequence then
writes and reads at its own position. A key is seen by a query iff its position is <= the
query's (and > the query's - window on sliding layers) and it was written (< index).

The 8-bit cache is read in 8 bits, never copied to float. A decode step on a CPU goes to
the native kernel (cpu_kernels.decode_attention: int8 or f32 cache, each key and value
widened a row at a time in L1, only the keys each sequence sees read); elsewhere (GPUs, prompts
over a cache, machines without the library) XLA's int8 dots: the queries against the int8
keys, the probabilities against the int8 values, the float side split into two int8
digits (hi + lo / 254, a scale per row), so the dot is float-accurate to ~2^-15 of the
row's max and the only error is the cache's rounding. KVFormat.choose makes the choice
once, with the layout the reader wants (XLA's f32 dot and the native kernel: keys
(B, kv, hd, S), values (B, kv, S, hd); XLA's int8 dot: keys (B, kv, S, hd), values
(B, kv, hd, S)). FP8 e4m3 is stored in the XLA int8 layout and upcast for the dot (no FP8
dot on CPUs; on GPUs it halves what a step reads).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from actquant_jax import rotation
from actquant_jax.errors import ModelArgumentError
from pallas_kernels import reference as numerics  # the one definition of the quantization formulas

KV_CACHE_FORMATS = ("float", "int8", "fp8")
NEG = float(np.finfo(np.float32).min)  # a masked score (finite: exp(NEG - max) is 0, never NaN)
_SPLIT = 254.0  # the low digit's weight: |x / scale - hi| <= 1/2, so lo = round(that * 254) fits int8


def check_kv_cache(kv_cache, where: str) -> str:
  if kv_cache not in KV_CACHE_FORMATS:
    raise ModelArgumentError(f"{where}: kv_cache must be one of {KV_CACHE_FORMATS}, got {kv_cache!r}")
  return kv_cache


# ------------------------------------------------------------------ quantization

def quantize_kv(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """x (..., hd) -> (xq (..., hd) int8 / e4m3, scale (...,) f32): one scale per vector
  (a token's key or value in one KV head), absmax / qmax; NaN scale for a vector holding
  NaN/Inf (its scores turn NaN, as they would in float)."""
  x32 = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x32), axis=-1) * numerics.scale_factor(None, dtype)
  scale = numerics.dynamic_scale(amax) + numerics.nonfinite_probe(x32, axis=-1)
  xq = numerics.saturate_cast(x32 * numerics.quantize_factor(None, scale)[..., None], dtype)
  return xq, scale


def _rotates(hd: int) -> bool:
  return rotation.factors(hd) is not None


def rotate_kv(x: jax.Array) -> jax.Array:
  """x (..., hd) @ R, R the randomized Hadamard matrix of actquant_jax.rotation (where hd
  has one), in f32: the int8 cache stores rotated keys and values. A few channels of a head
  (Gemma 3's keys after k_norm) are orders above the rest, and a scale per vector set by
  them rounds the others to zero; rotated, every channel carries a share of them (QuaRot's
  KV cache). Scores are unchanged, (q R) . (k R) = q . k; the context is un-rotated."""
  return rotation.rotate_rows(x) if _rotates(x.shape[-1]) else x.astype(jnp.float32)


def unrotate_kv(x: jax.Array) -> jax.Array:
  return rotation.unrotate_rows(x) if _rotates(x.shape[-1]) else x


def split_int8(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """x f32 -> (digits, scale): digits int8 stacked on a new axis 0 (hi, lo) with
  x ~= (hi + lo / 254) * scale, one scale per slice along `axis` (keepdims)."""
  scale = numerics.dynamic_scale(jnp.max(jnp.abs(x), axis=axis, keepdims=True) / 127.0)
  y = x / scale
  hi = jnp.round(y)
  lo = jnp.round((y - hi) * _SPLIT)
  return jnp.stack([hi, lo]).astype(jnp.int8), scale


def _join(acc: jax.Array, axis: int) -> jax.Array:
  """(hi + lo / 254) of an int32 dot of split_int8's digits, stacked along `axis`."""
  hi, lo = jnp.split(acc.astype(jnp.float32), 2, axis=axis)
  return hi + lo / _SPLIT


# ------------------------------------------------------------------ cache formats

def native_decode_available() -> bool:
  """Whether decode steps here read the cache with the native CPU kernel
  (cpu_kernels.decode_attention): on a CPU backend where the library is built, with one
  device (XLA's partitioner cannot split a custom call: on a mesh it would gather the
  whole cache to every device, so sharded programs keep XLA's dots)."""
  if jax.default_backend() != "cpu" or jax.device_count() != 1:
    return False
  import cpu_kernels
  return cpu_kernels.attention_available()


def _in_place(update, cache, x):
  """update(cache, x) -> the new cache, run on the bits of a float type under 32 bits
  (bf16, fp8): XLA CPU upcasts a bf16/fp8 scatter or dynamic-update-slice to f32/f16,
  converting the whole stacked cache there and back every layer (measured: fp8 decode at
  4k x 4, 4 layers, 397 -> 112 ms a step)."""
  if jnp.issubdtype(cache.dtype, jnp.floating) and cache.dtype.itemsize < 4:
    bits = jnp.dtype(f"uint{8 * cache.dtype.itemsize}")
    as_bits = lambda a: jax.lax.bitcast_convert_type(a.astype(cache.dtype), bits)
    return jax.lax.bitcast_convert_type(update(as_bits(cache), as_bits(x)), cache.dtype)
  return update(cache, x.astype(cache.dtype))


def _scatter(cache, index, x):
  """cache.at[index].set(x), positions past the end dropped."""
  return _in_place(lambda c, u: c.at[index].set(u, mode="drop"), cache, x)


def _put_layer(stacked, x, layer):
  """stacked[layer] = x, in place where `stacked` is a loop's carry."""
  return _in_place(lambda c, u: jax.lax.dynamic_update_index_in_dim(c, u, layer, 0), stacked, x)


@dataclasses.dataclass(frozen=True)
class KVFormat:
  """How one layer's keys/values are stored, written and read. kind: one of
  KV_CACHE_FORMATS; dtype: a float cache's dtype; native: decode steps read it with the
  native CPU kernel (int8, or a float32 cache), in the kernel's layout (K-major keys,
  token-major values: the float layout). Chosen once, by choose(), for the cache's
  creation and every read."""
  kind: str
  dtype: jnp.dtype = jnp.float32
  native: bool = False

  @classmethod
  def choose(cls, kind: str, dtype) -> "KVFormat":
    can = kind == "int8" or (kind == "float" and jnp.dtype(dtype) == jnp.float32)
    return cls(kind, jnp.dtype(dtype), native=can and native_decode_available())

  @property
  def storage(self):
    return {"float": self.dtype, "int8": jnp.int8, "fp8": jnp.float8_e4m3fn}[self.kind]

  @property
  def keys_kmajor(self) -> bool:
    """Keys (b, kv, hd, S) and values (b, kv, S, hd) (else keys (b, kv, S, hd), values
    (b, kv, hd, S)): XLA's f32 dot and the native kernel want the contracted axis major,
    XLA's int8 dot wants it minor."""
    return self.kind == "float" or self.native

  def shapes(self, b: int, s: int, kv: int, hd: int) -> dict:
    """name -> (shape, dtype) of the cache variables."""
    major, minor = (b, kv, hd, s), (b, kv, s, hd)
    k, v = (major, minor) if self.keys_kmajor else (minor, major)
    out = {"k": (k, self.storage), "v": (v, self.storage)}
    if self.kind != "float":
      out.update(k_scale=((b, kv, s), jnp.float32), v_scale=((b, kv, s), jnp.float32))
    return out

  def length(self, cache: dict) -> int:
    return cache["k_scale" if "k_scale" in cache else "v"].shape[2]

  def write(self, cache: dict, k: jax.Array, v: jax.Array, pos: jax.Array, layer=None) -> dict:
    """k, v (b, t, kv, hd) written at positions pos (b, t) of each sequence (positions past
    the cache's end are dropped); layer: the arrays have a leading layer axis and this
    layer's slice is written (in place where the arrays are a loop's carry)."""
    bi = jnp.arange(pos.shape[0])[:, None]
    at = () if layer is None else (layer,)
    # (advanced indices split by a slice: the indexed view is laid out (b, t, kv, hd), as k is)
    put_major = lambda c, x: _scatter(c, at + (bi, slice(None), slice(None), pos), x)  # (b, kv, hd, S)
    put_minor = lambda c, x: _scatter(c, at + (bi, slice(None), pos), x)  # (b, kv, S, hd), (b, kv, S)
    put_k, put_v = (put_major, put_minor) if self.keys_kmajor else (put_minor, put_major)
    if self.kind == "float":
      return {"k": put_k(cache["k"], k.astype(self.dtype)), "v": put_v(cache["v"], v.astype(self.dtype))}
    kq, ks = quantize_kv(self._rotate(k), self.storage)  # (b, t, kv, hd), (b, t, kv)
    vq, vs = quantize_kv(self._rotate(v), self.storage)
    return {"k": put_k(cache["k"], kq), "v": put_v(cache["v"], vq),
            "k_scale": put_minor(cache["k_scale"], ks), "v_scale": put_minor(cache["v_scale"], vs)}

  def _rotate(self, x):
    """int8 stores rotated keys/values (rotate_kv); FP8's per-element exponent already
    keeps small channels (measured: rotated, Gemma 3's FP8 KL went 3.9e-3 -> 8.7e-3)."""
    return rotate_kv(x) if self.kind == "int8" else x

  def _unrotate(self, x):
    return unrotate_kv(x) if self.kind == "int8" else x

  def _subscripts(self) -> tuple[str, str]:
    return ("bkds", "bksd") if self.keys_kmajor else ("bksd", "bkds")

  def read(self, cache: dict) -> tuple[jax.Array, jax.Array]:
    """The float keys/values (b, S, kv, hd) the cache stands for (tests, references)."""
    ksub, vsub = self._subscripts()
    k = jnp.einsum(f"{ksub}->bskd", cache["k"]).astype(jnp.float32)
    v = jnp.einsum(f"{vsub}->bskd", cache["v"]).astype(jnp.float32)
    if self.kind == "float":
      return k, v
    return (self._unrotate(k * jnp.moveaxis(cache["k_scale"], 2, 1)[..., None]),
            self._unrotate(v * jnp.moveaxis(cache["v_scale"], 2, 1)[..., None]))

  def scores(self, qg: jax.Array, cache: dict) -> jax.Array:
    """q . k of qg (b, t, kv, g, hd) over every cached key -> (b, kv, t, g, S) f32."""
    ksub = self._subscripts()[0]
    eq = f"btkgd,{ksub}->bktgs"
    if self.kind == "float":  # (in the cache's dtype: XLA CPU has no bf16 x bf16 -> f32 dot thunk)
      return jnp.einsum(eq, qg.astype(self.dtype), cache["k"]).astype(jnp.float32)
    ks = cache["k_scale"][:, :, None, None, :]
    qg = self._rotate(qg)
    if self.kind == "fp8":
      return jnp.einsum(eq, qg, cache["k"].astype(qg.dtype), preferred_element_type=jnp.float32) * ks
    digits, sq = split_int8(qg.astype(jnp.float32), axis=-1)  # (2, b, t, kv, g, hd), (b, t, kv, g, 1)
    digits = jnp.concatenate([digits[0], digits[1]], axis=3)  # (b, t, kv, 2g, hd)
    acc = jnp.einsum(eq, digits, cache["k"], preferred_element_type=jnp.int32)
    return _join(acc, axis=3) * jnp.moveaxis(sq, 1, 2) * ks

  def context(self, e: jax.Array, cache: dict, dtype) -> jax.Array:
    """sum_s e[..., s] v[s] of e (b, kv, t, g, S) f32 -> (b, t, kv, g, hd) f32."""
    vsub = self._subscripts()[1]
    eq = f"bktgs,{vsub}->btkgd"
    if self.kind == "float":
      return jnp.einsum(eq, e.astype(self.dtype), cache["v"]).astype(jnp.float32)
    ev = e * cache["v_scale"][:, :, None, None, :]
    if self.kind == "fp8":
      return jnp.einsum(eq, ev.astype(dtype), cache["v"].astype(dtype), preferred_element_type=jnp.float32)
    digits, se = split_int8(ev, axis=-1)  # (2, b, kv, t, g, S), (b, kv, t, g, 1)
    digits = jnp.concatenate([digits[0], digits[1]], axis=3)  # (b, kv, t, 2g, S)
    acc = jnp.einsum(eq, digits, cache["v"], preferred_element_type=jnp.int32)
    return self._unrotate(_join(acc, axis=3) * jnp.moveaxis(se, 1, 2))

  def decode(self, qg: jax.Array, cache: dict, pos: jax.Array, window, *, scale: float,
             softcap: float | None, layer=None) -> jax.Array:
    """The native kernel's decode step: qg (b, 1, kv, g, hd) at positions pos (b,) over
    the cache (layer: the arrays' leading layer axis, read in place) -> the normalized
    context (b, 1, kv, g, hd) f32."""
    import cpu_kernels
    scaled = self.kind != "float"
    ctx = cpu_kernels.decode_attention(
        self._rotate(qg[:, 0]).astype(jnp.float32), cache["k"], cache["v"], cache["k_scale"] if scaled else None,
        cache["v_scale"] if scaled else None, pos, window, scale=scale, softcap=softcap, layer=layer)
    return self._unrotate(ctx)[:, None]


# ------------------------------------------------------------------ attention in parts

def window_mask(allowed, k_pos, q_pos, window):
  """allowed & (key within `window` of the query); k_pos (..., S), q_pos (..., t) ->
  (..., t, S). window None: no window; a traced window: one per layer."""
  if window is None:
    return allowed
  return allowed & (k_pos[..., None, :] > q_pos[..., :, None] - window)


def _mask(allowed):
  """allowed (t, S) or (b, t, S) -> broadcastable to scores (b, kv, t, g, S)."""
  return allowed[:, None, :] if allowed.ndim == 2 else allowed[:, None, :, None, :]


def softmax_part(scores, allowed, scale: float, softcap: float | None = None):
  """Raw scores (b, kv, t, g, S) -> the unnormalized softmax (row max, exp, row sum) over the
  allowed keys, the scores times `scale` and soft-capped tanh(s / cap) * cap first."""
  scores = scores * scale
  if softcap is not None:
    scores = jnp.tanh(scores / softcap) * softcap
  scores = jnp.where(_mask(allowed), scores, NEG)
  m = jax.lax.stop_gradient(jnp.max(scores, axis=-1))
  e = jnp.exp(scores - m[..., None])
  return m, e, jnp.sum(e, axis=-1)


def attend_keys(qg, keys, values, allowed, *, scale: float, softcap: float | None = None):
  """Attention of qg (b, t, kv, g, hd) over float keys/values (b, s, kv, hd) where allowed
  ((t, s) or (b, t, s)), left unnormalized: (row max, row sum (b, kv, t, g), context (b, t,
  kv, g, hd) f32); merge() combines parts and normalizes. Scores in the dot's own output
  order (b, kv, t, g, s): a (b, kv, g, t, s) order cost a transposed copy of the largest
  tensor here (a third of the non-matmul time of a 512-token CPU prefill, measured)."""
  scores = jnp.einsum("btkgd,bskd->bktgs", qg, keys.astype(qg.dtype)).astype(jnp.float32)
  m, e, l = softmax_part(scores, allowed, scale, softcap)
  ctx = jnp.einsum("bktgs,bskd->btkgd", e.astype(qg.dtype), values.astype(qg.dtype),
                   preferred_element_type=jnp.float32)
  return m, l, ctx


def attend_cache(qg, fmt: KVFormat, cache: dict, allowed, *, scale: float, softcap: float | None = None):
  """attend_keys over the cached keys/values, read in the cache's own format."""
  m, e, l = softmax_part(fmt.scores(qg, cache), allowed, scale, softcap)
  return m, l, fmt.context(e, cache, qg.dtype)


BLOCK_Q = 256  # queries per causal block: each sees only the keys up to its last position
FULL_WINDOW = 1 << 30  # a traced per-layer window this long is a full-attention layer


def causal_blocks(qg, k, v, attend: Callable, window, *, max_window: int | None = None, mixed: bool = False):
  """Attention parts of t queries at positions 0..t-1 over their own keys k, v (b, t, kv,
  hd), causal, in blocks of BLOCK_Q queries: a block reads only the keys up to its last
  query (half the work of the full square at length, and score tiles that stay in
  cache), and on a sliding-window layer only its window's. window: this layer's (None,
  an int, or traced per layer); max_window: the static window of the sliding layers;
  mixed: sliding and full layers share this (traced) call, so a lax.cond on the window
  picks the window's keys or all of them. attend(q, k, v, allowed) -> a part."""
  t = qg.shape[1]
  parts = []
  for start in range(0, t, BLOCK_Q):
    stop = min(start + BLOCK_Q, t)
    q_pos = np.arange(start, stop, dtype=np.int32)

    def part(lo, q=qg[:, start:stop], stop=stop, q_pos=q_pos):
      k_pos = np.arange(lo, stop, dtype=np.int32)
      allowed = window_mask(jnp.asarray(k_pos[None, :] <= q_pos[:, None]), k_pos, q_pos, window)
      return attend(q, k[:, lo:stop], v[:, lo:stop], allowed)
    lo = 0 if max_window is None else max(0, start - max_window + 1)
    if lo == 0 or not mixed:
      parts.append(part(lo))
    else:
      parts.append(jax.lax.cond(window < FULL_WINDOW, lambda lo=lo, part=part: part(lo), lambda part=part: part(0)))
  if len(parts) == 1:
    return parts[0]
  return tuple(jnp.concatenate([p[i] for p in parts], axis=1 if i == 2 else 2) for i in range(3))


def merge(parts):
  """The normalized context (b, t, kv, g, hd) f32 from attention parts over disjoint key
  sets (the log-sum-exp merge)."""
  m = parts[0][0]
  for p in parts[1:]:
    m = jnp.maximum(m, p[0])
  num = den = 0.0
  for pm, pl, pctx in parts:
    w = jnp.exp(pm - m)
    den = den + pl * w
    num = num + pctx * jnp.moveaxis(w, 1, 2)[..., None]
  return num / jnp.moveaxis(den, 1, 2)[..., None]


# ------------------------------------------------------------------ the decode-mode call

def cache_variables(mdl: nn.Module, kv_cache: str, layers: int, b: int, t: int, kv: int, hd: int, dtype):
  """A model's decode cache, in its "cache" collection: every layer's keys/values stacked
  on a leading layer axis (L, ...) in the kv_cache format, and the position of each
  sequence, index (b,). The layers' scan carries the stacked arrays, so each step writes
  its tokens in place (scanning them as per-layer slices copies the whole cache every
  step: ~1 s at 4k tokens x 8 sequences, measured). At init the arrays are as long as
  the call (init_cache sets the length). -> (name -> variable, the index variable,
  whether the cache existed before this call)."""
  initialized = mdl.has_variable("cache", "index")
  shapes = KVFormat.choose(kv_cache, dtype).shapes(b, t, kv, hd)
  cvars = {n: mdl.variable("cache", n, jnp.zeros, (layers,) + s, d) for n, (s, d) in shapes.items()}
  index = mdl.variable("cache", "index", lambda: jnp.zeros((b,), jnp.int32))
  return cvars, index, initialized


def cached_attention(q, k, v, cache: dict, layer, index, *, rope: Callable, causal: Callable, kv_cache: str,
                     scale: float, softcap: float | None, window):
  """A decode-mode attention call of one layer through the stacked cache.

  q (b, t, h, hd), k, v (b, t, kv, hd) before RoPE; cache: the stacked arrays of
  cache_variables (the scan's carry); layer: this layer's index in them; index (b,): each
  sequence's position. rope(x, positions (b, t)) rotates; causal(qg, k, v) is the model's
  attention of the t new queries over their own keys (causal blocks). The t tokens go at
  each sequence's index (right padding past a prompt's length is written, never seen,
  and overwritten next: the caller advances the index by the real lengths).
  -> (context (b, t, h, hd) f32, the updated cache arrays).
  """
  b, t, h, hd = q.shape
  kv = k.shape[2]
  qg = lambda x: x.reshape(b, t, kv, h // kv, hd)  # GQA: h/kv query heads per key/value head
  q_pos = index[:, None] + jnp.arange(t, dtype=jnp.int32)  # (b, t)
  q, k = rope(q, q_pos), rope(k, q_pos)
  fmt = KVFormat.choose(kv_cache, cache["k"].dtype)  # a float cache keeps the dtype init_cache gave it
  if t == 1 and fmt.native:  # a decode step, native: reads only the keys each sequence sees, in place
    cache = fmt.write(cache, k, v, q_pos, layer)
    return fmt.decode(qg(q), cache, q_pos[:, 0], window, scale=scale, softcap=softcap,
                      layer=layer).reshape(b, t, h, hd), cache
  # XLA: this layer's slice is taken out, written and put back whole (the scan's pattern,
  # in place on the carry). Scattering into the stacked carry while a slice of it is read
  # made XLA copy the whole stacked cache twice per array and layer (4 layers, 4k x 4:
  # f32 cache 209 -> 128 ms a step, measured). The new tokens' own keys are attended as computed
  # (causal), the cache's for every earlier position (`past` masks the new ones).
  mine = fmt.write({n: a[layer] for n, a in cache.items()}, k, v, q_pos)
  cache = {n: _put_layer(a, mine[n], layer) for n, a in cache.items()}
  k_pos = jnp.arange(fmt.length(mine), dtype=jnp.int32)

  def past(_):
    allowed = window_mask(jnp.broadcast_to(k_pos < index[:, None, None], (b, t, k_pos.size)), k_pos, q_pos, window)
    return attend_cache(qg(q), fmt, mine, allowed, scale=scale, softcap=softcap)
  empty = jax.eval_shape(past, None)
  nothing = lambda _: tuple(jnp.full(e.shape, NEG if i == 0 else 0, e.dtype) for i, e in enumerate(empty))
  ctx = merge([causal(qg(q), k, v), jax.lax.cond(jnp.any(index > 0), past, nothing, None)])
  return ctx.reshape(b, t, h, hd), cache
