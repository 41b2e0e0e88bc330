"""Small transformer blocks for the tests, in linen and nnx with identical math.

GPTBlock (pre-LN: ln_1 feeds only q/k/v, ln_2 only fc1 -> both foldable) and BERTBlock
(post-LN: the LayerNorm output is also the next residual -> not foldable). Outlier
channels like real LLMs' are injected through the LayerNorm scales.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

D = 64


def attention(q, k, v, heads=4):
  b, t, d = q.shape
  split = lambda x: x.reshape(b, t, heads, d // heads).transpose(0, 2, 1, 3)
  w = jax.nn.softmax(split(q) @ split(k).swapaxes(-1, -2) / np.sqrt(d // heads), axis=-1)
  return (w @ split(v)).transpose(0, 2, 1, 3).reshape(b, t, d)


class GPTBlock(nn.Module):
  d: int = D

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln_1")(x)
    a = attention(nn.Dense(self.d, name="q")(h), nn.Dense(self.d, name="k")(h), nn.Dense(self.d, name="v")(h))
    x = x + nn.Dense(self.d, name="o")(a)
    h = nn.LayerNorm(name="ln_2")(x)
    return x + nn.Dense(self.d, name="fc2")(nn.gelu(nn.Dense(4 * self.d, name="fc1")(h)))


class TinyGPT(nn.Module):
  """Two pre-LN blocks, a final LayerNorm and an output head."""
  d: int = D
  vocab: int = 96

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = GPTBlock(self.d, name=f"block_{i}")(x)
    return nn.Dense(self.vocab, name="head")(nn.LayerNorm(name="ln_f")(x))


class BERTBlock(nn.Module):
  d: int = D

  @nn.compact
  def __call__(self, x):
    a = attention(nn.Dense(self.d, name="q")(x), nn.Dense(self.d, name="k")(x), nn.Dense(self.d, name="v")(x))
    x = nn.LayerNorm(name="ln_attn")(x + nn.Dense(self.d, name="o")(a))
    return nn.LayerNorm(name="ln_ffn")(x + nn.Dense(self.d, name="fc2")(nn.gelu(nn.Dense(4 * self.d, name="fc1")(x))))


class TinyBERT(nn.Module):
  d: int = D

  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm(name="ln_emb")(x)
    for i in range(2):
      x = BERTBlock(self.d, name=f"layer_{i}")(x)
    return x


# ---- nnx twins

class NNXGPTBlock(nnx.Module):
  def __init__(self, d, rngs):
    self.ln_1, self.ln_2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
    self.q, self.k, self.v, self.o = (nnx.Linear(d, d, rngs=rngs) for _ in range(4))
    self.fc1, self.fc2 = nnx.Linear(d, 4 * d, rngs=rngs), nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x):
    h = self.ln_1(x)
    x = x + self.o(attention(self.q(h), self.k(h), self.v(h)))
    return x + self.fc2(nnx.gelu(self.fc1(self.ln_2(x))))


class NNXTinyGPT(nnx.Module):
  def __init__(self, d=D, vocab=96, rngs=None):
    rngs = rngs or nnx.Rngs(0)
    self.block_0, self.block_1 = NNXGPTBlock(d, rngs), NNXGPTBlock(d, rngs)
    self.ln_f = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, vocab, rngs=rngs)

  def __call__(self, x):
    return self.head(self.ln_f(self.block_1(self.block_0(x))))


def load_linen_into_nnx(nnx_model, linen_params):
  """Copy a TinyGPT's linen params into an NNXTinyGPT (same paths)."""
  state = nnx.state(nnx_model, nnx.Param)
  pure = nnx.to_pure_dict(state)

  def fill(dst, src):
    for k in dst:
      if isinstance(dst[k], dict):
        fill(dst[k], src[k])
      else:
        assert dst[k].shape == src[k].shape, (k, dst[k].shape, src[k].shape)
        dst[k] = src[k]
  fill(pure, linen_params["params"])
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(nnx_model, state)
  return nnx_model


GPT_READERS = {f"block_{i}/{ln}": [f"block_{i}/{d}" for d in ds]
               for i in range(2) for ln, ds in (("ln_1", "qkv"), ("ln_2", ["fc1"]))}
GPT_READERS["ln_f"] = ["head"]
BERT_READERS = {"ln_emb": ["layer_0/q", "layer_0/k", "layer_0/v"], "layer_0/ln_attn": ["layer_0/fc1"],
                "layer_0/ln_ffn": ["layer_1/q", "layer_1/k", "layer_1/v"], "layer_1/ln_attn": ["layer_1/fc1"],
                "layer_1/ln_ffn": []}


def with_outlier_channels(params, readers, channels=(3, 17, 40), factor=100.0):
  """Outlier channels as trained LLMs have them: channel j of each LayerNorm's output is
  `factor` times larger (scale and bias), and the Dense layers reading it have row j
  divided by `factor`, so the layers' outputs are unchanged but their inputs carry
  100x channels. `readers`: {layernorm path: [Dense paths reading it]}."""
  idx = np.array(channels)
  p = jax.tree_util.tree_map(lambda v: v, params["params"])  # a copy of the dict structure

  def node(path):
    n = p
    for part in path.split("/"):
      n = n[part]
    return n
  for ln, dense in readers.items():
    n = node(ln)
    for k in ("scale", "bias"):
      n[k] = jnp.asarray(n[k]).at[idx].multiply(factor)
    for d in dense:
      node(d)["kernel"] = jnp.asarray(node(d)["kernel"]).at[idx].divide(factor)
  return {"params": p}


def batches(n, b=4, t=16, d=D, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32) for _ in range(n)]


def _eight_bit_gemms(fn, args, per_call: bool) -> int:
  def count(jaxpr):
    n = 0
    for e in jaxpr.eqns:
      dtypes = [str(v.aval.dtype) for v in e.invars]
      if e.primitive.name == "dot_general" and all(d in ("int8", "float8_e4m3fn") for d in dtypes):
        n += 1
      elif e.primitive.name == "ffi_call" and len(dtypes) >= 3 and dtypes[:2] == ["int8", "int32"] and all(
          d == "int8" for d in dtypes[2:]):
        n += 1 if per_call else len(dtypes) - 2
      for p in e.params.values():
        for s in (p if isinstance(p, (tuple, list)) else (p,)):
          if hasattr(s, "eqns"):
            n += count(s)
          elif hasattr(s, "jaxpr") and hasattr(s.jaxpr, "eqns"):
            n += count(s.jaxpr)
    return n
  return count(jax.make_jaxpr(fn)(*args).jaxpr)


def int8_matmuls(fn, *args) -> int:
  """How many 8-bit GEMMs the traced program runs: dot_generals with int8/fp8 operands,
  and the native CPU GEMM's custom calls (x int8, the layer index, then the weights: one
  GEMM per weight; not marked_rows' scan of one), nested jaxprs included."""
  return _eight_bit_gemms(fn, args, per_call=False)


def int8_gemm_calls(fn, *args) -> int:
  """How many 8-bit GEMM calls: as int8_matmuls, but a native call with several weights
  (a group reading one x) counts once."""
  return _eight_bit_gemms(fn, args, per_call=True)
