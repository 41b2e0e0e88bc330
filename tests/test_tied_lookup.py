"""A tied embedding (the lookup and the head `x @ E.T` read one table): quantized, its
int8 table serves the lookup too -- row v is values[v] * scale[v], the head's
per-output-channel scale -- and no float copy of the table is kept."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import actquant_jax as aq
from actquant_jax.errors import QuantizationError
from actquant_jax.models import llama as L
from tests import toy_models as tm

V, D = 96, 32


class Tied(nn.Module):
  """Returns (logits, the lookup's rows): `lookup` picks how the table is read."""

  lookup: str = "embed"
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(V, D, dtype=self.dtype, name="embed")
    if self.lookup == "embed":
      x = embed(ids)
    elif self.lookup == "take":
      x = jnp.take(embed.embedding, ids, axis=0)
    else:  # E[ids]: a gather that promises in-bounds indices
      x = embed.embedding[ids]
    h = nn.LayerNorm(name="ln_f")(nn.Dense(D, name="mlp")(x))
    return embed.attend(h), x


def _ids(seed, b=4, t=16):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, V)


def _quantized(m, config=aq.QuantConfig(alpha=0.5, rotate=False)):
  params = m.init(jax.random.key(0), _ids(0))
  stats = aq.calibrate(m, params, [_ids(0), _ids(1)], forward=lambda v, x: m.apply(v, x)[0], progress=False)
  q, report = aq.quantize_params_with_report(params, stats, config)
  return params, q, report


def _table_rows(qk, ids, dtype):
  """What the lookup must give: rows of the dequantized weight (QuantizedKernel.dequantize
  is (K, N): its transpose is the (vocab, hidden) table)."""
  return np.asarray(jnp.take(qk.dequantize().T, ids, axis=0).astype(dtype))


@pytest.mark.parametrize("lookup,dtype", [("embed", jnp.float32), ("embed", jnp.bfloat16), ("take", jnp.float32),
                                          ("index", jnp.float32)])
def test_lookup_reads_the_int8_rows_bitwise(lookup, dtype):
  m = Tied(lookup, dtype)
  params, q, report = _quantized(m)
  qk = q["params"]["embed"]["embedding"]
  assert isinstance(qk, aq.QuantizedKernel) and qk.kept is None and qk.values.dtype == jnp.int8
  assert qk.scale.shape == (V,)  # one scale per vocab row: the head's output channels
  r = report["embed/embedding"]
  assert r.quantized and r.alpha is None and r.smoothing == "none" and "lookup" in r.note
  f = jax.jit(aq.quantized_apply(m, backend="xla"))
  ids = _ids(5)
  logits, rows = f(q, ids)
  assert rows.dtype == jnp.dtype(dtype)
  np.testing.assert_array_equal(np.asarray(rows), _table_rows(qk, ids, dtype))
  ref_logits, _ = m.apply(params, ids)
  assert float(jnp.linalg.norm(logits - ref_logits) / jnp.linalg.norm(ref_logits)) < 0.05
  # the head still runs in int8, and nothing float of (V, D) is in the program's inputs
  assert tm.int8_matmuls(lambda qq, x: aq.quantized_apply(m, backend="xla")(qq, x)[0], q, ids) == 2


def test_out_of_range_ids_fill_as_the_float_table_does():
  m = Tied("embed")
  params, q, _ = _quantized(m)
  ids = jnp.array([[0, V - 1, V, V + 7, -1, -V - 3]])  # nn.Embed: jnp.take's "fill" mode (NaN)
  _, rows = aq.quantized_apply(m, backend="xla")(q, ids)
  _, ref = m.apply(params, ids)
  np.testing.assert_array_equal(np.isnan(np.asarray(rows)), np.isnan(np.asarray(ref)))
  np.testing.assert_array_equal(np.asarray(rows), _table_rows(q["params"]["embed"]["embedding"], ids, jnp.float32))


def test_runtime_inverse_smoothing_is_in_the_rows():
  # quantize_params does not smooth a looked-up weight; a hand-made vector (like the
  # matmul's) is applied to the rows, as QuantizedKernel.dequantize applies it.
  m = Tied("embed")
  params, q, _ = _quantized(m)
  qk = q["params"]["embed"]["embedding"]
  inv = jnp.linspace(0.5, 2.0, D, dtype=jnp.float32)
  qk2 = dataclasses.replace(qk, inv_smooth=inv)
  q2 = {"params": {**q["params"], "embed": {"embedding": qk2}}}
  ids = _ids(3)
  _, rows = aq.quantized_apply(m, backend="xla")(q2, ids)
  np.testing.assert_array_equal(np.asarray(rows), _table_rows(qk2, ids, jnp.float32))
  # a table whose 1/s was folded into a producer holds diag(s) E: no lookup can read it
  q3 = {"params": {**q["params"], "embed": {"embedding": dataclasses.replace(qk, folded_into=("ln_f",))}}}
  with pytest.raises(QuantizationError, match="folded into ln_f"):
    aq.quantized_apply(m, backend="xla")(q3, ids)


def test_a_read_the_table_cannot_serve_is_refused_by_name():
  class Norms(nn.Module):  # reads the table whole, not by rows
    @nn.compact
    def __call__(self, ids):
      embed = nn.Embed(V, D, name="embed")
      x = embed(ids) * jnp.max(jnp.abs(embed.embedding))
      return embed.attend(nn.LayerNorm(name="ln_f")(nn.Dense(D, name="mlp")(x)))
  m = Norms()
  params = m.init(jax.random.key(0), _ids(0))
  stats = aq.calibrate(m, params, [_ids(0)], progress=False)
  q = aq.quantize_params(params, stats, aq.QuantConfig(alpha=0.5, rotate=False))
  msg = r"with `abs`.*row lookups only.*LayerRule\('embed/embedding', skip=True\)"
  with pytest.raises(QuantizationError, match=msg):
    aq.quantized_apply(m, backend="xla")(q, _ids(1))
  q = aq.quantize_params(params, stats, aq.QuantConfig(rules=(aq.LayerRule("embed/embedding", skip=True),), alpha=0.5, rotate=False))
  y = aq.quantized_apply(m, backend="xla")(q, _ids(1))
  np.testing.assert_allclose(y, m.apply(params, _ids(1)), rtol=0.05, atol=0.05)


def _bytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def test_tied_llama_holds_no_float_table():
  # embedding-dominated: the table is ~90% of the float bytes
  cfg = L.LlamaConfig(vocab_size=4096, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                      intermediate_size=128, max_position=64, tie_word_embeddings=True)
  m = L.LlamaForCausalLM(cfg)
  cal = [jax.random.randint(jax.random.key(i), (2, 16), 0, cfg.vocab_size) for i in range(2)]
  params = jax.jit(m.init)(jax.random.key(0), cal[0])  # (jitted: one compile, not one per eager op)
  stats = aq.calibrate(m, params, cal, progress=False)
  q = aq.quantize_params(params, stats, aq.QuantConfig(alpha=0.5, rotate=False))
  table = (cfg.vocab_size, cfg.hidden_size)
  floats = [x.shape for x in jax.tree_util.tree_leaves(q) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert table not in floats and (table[::-1]) not in floats, floats
  assert [x for x in jax.tree_util.tree_leaves(q) if x.shape == table and x.dtype == jnp.int8]
  ratio = _bytes(q) / _bytes(params)
  assert ratio <= 0.3, ratio
  ids = jax.random.randint(jax.random.key(9), (2, 16), 0, cfg.vocab_size)
  y = jax.jit(aq.quantized_apply(m, backend="xla"))(q, ids)
  ref = jax.jit(m.apply)(params, ids)
  assert float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref)) < 0.05
  # top-1 mostly agrees (random weights: small logit gaps)
  assert float(jnp.mean(jnp.argmax(y, -1) == jnp.argmax(ref, -1))) > 0.8


def test_nnx_tied_embedding():
  class NTied(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(V, D, rngs=rngs)
      self.mlp = nnx.Linear(D, D, rngs=rngs)
      self.ln = nnx.LayerNorm(D, rngs=rngs)

    def __call__(self, ids):
      x = self.embed(ids)
      return self.embed.attend(self.ln(self.mlp(x))), x
  m = NTied(nnx.Rngs(0))
  ref = m(_ids(4))
  stats = aq.calibrate(m, None, [_ids(0), _ids(1)], forward=lambda mod, x: mod(x)[0], progress=False)
  qm = aq.quantize_model(m, stats, aq.QuantConfig(alpha=0.5, rotate=False), copy=True, backend="xla")
  qk = qm.embed.embedding.get_value()
  assert isinstance(qk, aq.QuantizedKernel) and qk.kept is None
  logits, rows = qm(_ids(4))
  np.testing.assert_array_equal(np.asarray(rows), _table_rows(qk, _ids(4), jnp.float32))
  assert float(jnp.linalg.norm(logits - ref[0]) / jnp.linalg.norm(ref[0])) < 0.05


@pytest.mark.parametrize("lookup", ["embed", "index"])
def test_rotated_table_serves_the_lookup(lookup):
  # QuantConfig(rotate=True): the head's table holds E R (int8); the lookup gathers its
  # rows and rotates them back (rows R^T): the dequantized weight's rows.
  m = Tied(lookup)
  params = m.init(jax.random.key(0), _ids(0))
  stats = aq.calibrate(m, params, [_ids(0), _ids(1)], forward=lambda v, x: m.apply(v, x)[0], progress=False)
  q = aq.quantize_params(params, stats, aq.QuantConfig(alpha=None, rotate=True))
  qk = q["params"]["embed"]["embedding"]
  assert qk.rotated
  logits, rows = jax.jit(aq.quantized_apply(m, backend="xla"))(q, _ids(5))
  np.testing.assert_allclose(np.asarray(rows), _table_rows(qk, _ids(5), jnp.float32), rtol=1e-5, atol=1e-6)
  _, ref_rows = m.apply(params, _ids(5))
  assert float(jnp.linalg.norm(rows - ref_rows) / jnp.linalg.norm(ref_rows)) < 0.02
  ref_logits, _ = m.apply(params, _ids(5))
  assert float(jnp.linalg.norm(logits - ref_logits) / jnp.linalg.norm(ref_logits)) < 0.05
