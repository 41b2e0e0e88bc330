"""Every way to write a weight matmul is one capture: Dense, DenseGeneral (head axes),
Einsum, a raw param with jnp.einsum, transposed layouts (HF FlaxConv1D, `x @ W.T`), tied
embedding heads, remat, nnx containers and shared modules -- each runs in int8 (counted
in the traced program) with the error of the same model written with nn.Dense."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import actquant_jax as aq
from tests import toy_models as tm

D, F, H = 32, 64, 4
OUTLIERS = (3, 17)


class Proj(nn.Module):
  """x (B, T, K) -> (B, T, features), written `kind`'s way; `to_dense` maps its params
  to the nn.Dense kernel of the same function."""

  kind: str
  features: int

  @nn.compact
  def __call__(self, x):
    k, f = x.shape[-1], self.features
    init = nn.initializers.lecun_normal()
    if self.kind == "dense":
      return nn.Dense(f, use_bias=False, name="m")(x)
    if self.kind == "dense_general":  # head axes out: kernel (K, H, F/H)
      y = nn.DenseGeneral((H, f // H), use_bias=False, name="m")(x)
      return y.reshape(*y.shape[:-2], f)
    if self.kind == "dense_general_in":  # head axes in: kernel (H, K/H, F) over axis=(-2, -1)
      xh = x.reshape(*x.shape[:-1], H, k // H)
      return nn.DenseGeneral(f, axis=(-2, -1), use_bias=False, name="m")(xh)
    if self.kind == "einsum":
      return nn.Einsum((k, f), "btk,kf->btf", use_bias=False, name="m")(x)
    if self.kind == "raw":
      return jnp.einsum("btk,kf->btf", x, self.param("w", init, (k, f)))
    if self.kind == "conv1d":  # HF FlaxConv1D: kernel (F, K), used transposed
      w = self.param("kernel", init, (f, k))
      return jax.lax.dot_general(x, jnp.asarray(w.transpose(), x.dtype), (((x.ndim - 1,), (0,)), ((), ())))
    if self.kind == "matmul_t":  # x @ W.T with W (F, K)
      return x @ self.param("w", init, (f, k)).T
    if self.kind == "custom_einsum":  # (F, K) weight contracted on its last axis
      return jnp.einsum("...k,fk->...f", x, self.param("w", init, (f, k)))
    raise ValueError(self.kind)


def to_dense(kind, p):
  w = next(iter(p.values()))
  if kind in ("conv1d", "matmul_t", "custom_einsum"):
    return w.T
  return w.reshape(-1, w.shape[-1]) if kind == "dense_general_in" else w.reshape(w.shape[0], -1)


class Block(nn.Module):
  kind: str

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln")(x)
    return x + Proj(self.kind, D, name="down")(nn.gelu(Proj(self.kind, F, name="up")(h)))


class Net(nn.Module):
  kind: str
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    block = nn.remat(Block) if self.remat else Block
    for i in range(2):
      x = block(self.kind, name=f"block_{i}")(x)
    return x


def _outliers(params):
  """Outlier channels in each LayerNorm's output, as trained LLMs have them."""
  p = jax.tree_util.tree_map(lambda v: v, params)
  for b in ("block_0", "block_1"):
    ln = p["params"][b]["ln"]
    ln["scale"] = ln["scale"].at[np.array(OUTLIERS)].set(30.0)
  return p


def _dense_params(kind, params):
  out = jax.tree_util.tree_map(lambda v: v, params)
  for b in ("block_0", "block_1"):
    for proj in ("up", "down"):
      src = params["params"][b][proj]
      src = src["m"] if "m" in src else src
      out["params"][b][proj] = {"m": {"kernel": to_dense(kind, src)}}
  return out


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _quantized_error(model, params, cal, x, config=aq.QuantConfig(alpha=0.5, rotate=False)):
  stats = aq.calibrate(model, params, cal, progress=False)
  qparams, report = aq.quantize_params_with_report(params, stats, config)
  f = aq.quantized_apply(model, backend="xla")
  return _rel(f(qparams, x), model.apply(params, x)), tm.int8_matmuls(f, qparams, x), report


KINDS = ["dense_general", "dense_general_in", "einsum", "raw", "conv1d", "matmul_t", "custom_einsum"]


@pytest.fixture(scope="module")
def dense_reference():
  cal, x = tm.batches(2, d=D), tm.batches(1, d=D, seed=7)[0]
  return cal, x


@pytest.mark.parametrize("kind", KINDS)
def test_every_spelling_runs_int8_with_dense_error(kind, dense_reference):
  cal, x = dense_reference
  m = Net(kind)
  params = _outliers(m.init(jax.random.key(0), cal[0]))
  err, n_int8, report = _quantized_error(m, params, cal, x)
  assert n_int8 == 4 and sum(r.quantized for r in report.values()) == 4
  # 1/s folded into the LayerNorms (proven from the dataflow) for the up projections;
  # a reshape between the norm and the matmul (head axes in) keeps it a run-time vector.
  folded = 0 if kind == "dense_general_in" else 2
  assert sorted(r.smoothing for r in report.values()) == ["folded"] * folded + ["runtime"] * (4 - folded)
  d = Net("dense")
  d_err, d_int8, _ = _quantized_error(d, _dense_params(kind, params), cal, x)
  np.testing.assert_allclose(d.apply(_dense_params(kind, params), x), m.apply(params, x), rtol=1e-4, atol=1e-4)
  assert d_int8 == 4
  assert err <= d_err * 1.05 + 1e-6, (err, d_err)
  assert err < 0.05


def test_remat_calibrates_and_runs_int8(dense_reference):
  cal, x = dense_reference
  plain, rem = Net("dense"), Net("dense", remat=True)
  params = _outliers(plain.init(jax.random.key(0), cal[0]))
  s_plain = aq.calibrate(plain, params, cal, progress=False)
  s_rem = aq.calibrate(rem, params, cal, progress=False)  # no tracer escapes the remat
  assert set(s_plain) == set(s_rem)
  for p in s_plain:
    np.testing.assert_allclose(np.asarray(s_rem[p].absmax), np.asarray(s_plain[p].absmax), rtol=1e-6)
    assert s_rem[p].foldable == s_plain[p].foldable
  q = aq.quantize_params(params, s_rem, aq.QuantConfig(alpha=0.5, rotate=False))
  f = jax.jit(aq.quantized_apply(rem, backend="xla"))
  assert tm.int8_matmuls(f, q, x) == 4
  np.testing.assert_allclose(f(q, x), aq.quantized_apply(plain, backend="xla")(q, x), rtol=1e-5, atol=1e-5)


class TiedLM(nn.Module):
  tied: bool = True

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(96, D, name="embed")
    x = embed(ids)
    x = Block("dense", name="block_0")(x)
    h = nn.LayerNorm(name="ln_f")(x)
    return embed.attend(h) if self.tied else nn.Dense(96, use_bias=False, name="head")(h)


def test_tied_embedding_head_runs_int8():
  m = TiedLM()
  ids = [jax.random.randint(jax.random.key(i), (4, 16), 0, 96) for i in range(2)]
  params = m.init(jax.random.key(0), ids[0])
  stats = aq.calibrate(m, params, ids, progress=False)
  assert stats["embed/embedding"].keep_float and stats["embed/embedding"].contract == (1,)
  q, report = aq.quantize_params_with_report(params, stats, aq.QuantConfig(alpha=0.5, rotate=False))
  qk = q["params"]["embed"]["embedding"]
  assert isinstance(qk, aq.QuantizedKernel) and qk.kept is None  # the lookup reads the int8 table
  # (so the table holds E itself: not smoothed, and the report says why)
  assert report["embed/embedding"].smoothing == "none" and "lookup" in report["embed/embedding"].note
  f = aq.quantized_apply(m, backend="xla")
  assert tm.int8_matmuls(f, q, ids[1]) == 3
  assert _rel(f(q, ids[1]), m.apply(params, ids[1])) < 0.03
  # the same model with an untied Dense head holding E.T
  u = TiedLM(tied=False)
  up = jax.tree_util.tree_map(lambda v: v, params)
  up["params"]["head"] = {"kernel": params["params"]["embed"]["embedding"].T}
  np.testing.assert_allclose(u.apply(up, ids[1]), m.apply(params, ids[1]), rtol=1e-5, atol=1e-5)
  # ... run with the tied head's int8 weight, and as its float embedding the int8 table's
  # rows: the tied model computes exactly that (the lookup reads dequantized rows)
  head = dataclasses.replace(qk, contract=(0,), out=(1,), param_shape=(D, 96), dataflow="")
  uq = {"params": {**q["params"], "embed": {"embedding": qk.dequantize().T}, "head": {"kernel": head}}}
  np.testing.assert_allclose(aq.quantized_apply(u, backend="xla")(uq, ids[1]), f(q, ids[1]), rtol=1e-6, atol=1e-6)
  assert "quantized 3 of 3 weight matmuls" in aq.report_summary(report)


class SharedProj(nn.Module):
  """ALBERT-style: one Dense called from two blocks, each with its own LayerNorm."""

  shared: bool = True

  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(D, name="proj") if self.shared else None
    for i in range(2):
      h = nn.LayerNorm(name=f"ln_{i}")(x)
      layer = dense if self.shared else nn.Dense(D, name=f"proj_{i}")
      x = x + nn.gelu(layer(h))
    return x


def test_shared_module_folds_into_every_call_site():
  cal, x = tm.batches(3, d=D), tm.batches(1, d=D, seed=9)[0]
  m = SharedProj()
  params = m.init(jax.random.key(0), cal[0])
  for i in range(2):
    ln = params["params"][f"ln_{i}"]
    ln["scale"] = ln["scale"].at[np.array(OUTLIERS)].set(30.0 * (i + 1))
  stats = aq.calibrate(m, params, cal, progress=False)
  assert set(stats) == {"proj"} and set(stats["proj"].producers) == {"ln_0", "ln_1"}
  assert int(stats["proj"].tokens) == 2 * 3 * 4 * 16  # statistics over both calls
  q, report = aq.quantize_params_with_report(params, stats, aq.QuantConfig(alpha=0.5, rotate=False))
  assert report["proj"].smoothing == "folded"
  err = _rel(aq.quantized_apply(m, backend="xla")(q, x), m.apply(params, x))
  # the unshared model with the same weights
  u = SharedProj(shared=False)
  up = {"params": {**{k: v for k, v in params["params"].items() if k != "proj"},
                   "proj_0": params["params"]["proj"], "proj_1": params["params"]["proj"]}}
  uq = aq.quantize_params(up, aq.calibrate(u, up, cal, progress=False), aq.QuantConfig(alpha=0.5, rotate=False))
  u_err = _rel(aq.quantized_apply(u, backend="xla")(uq, x), u.apply(up, x))
  assert err <= 2 * u_err + 1e-4, (err, u_err)
  assert err < 0.05


def test_no_weight_matmul_lists_what_it_saw():
  class AttnOnly(nn.Module):
    @nn.compact
    def __call__(self, x):
      return jnp.einsum("btd,bsd->bts", x, x)
  x = tm.batches(1, d=D)[0]
  m = AttnOnly()
  with pytest.raises(ValueError, match="no weight matmul.*Saw: no matmul with a parameter"):
    aq.calibrate(m, m.init(jax.random.key(0), x), [x], progress=False)


# ---------------------------------------------------------------- nnx

class NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.ln = nnx.LayerNorm(D, rngs=rngs)
    self.up = nnx.LinearGeneral(D, (H, F // H), rngs=rngs, use_bias=False)
    self.down = nnx.Einsum("btf,fd->btd", (F, D), rngs=rngs)

  def __call__(self, x):
    y = self.up(self.ln(x))
    return x + self.down(nnx.gelu(y.reshape(*y.shape[:-2], F)))


class NNXNet(nnx.Module):
  def __init__(self, rngs, container="list", remat=False):
    blocks = [NNXBlock(rngs) for _ in range(2)]
    if container == "list":
      self.layers = nnx.List(blocks)
    elif container == "sequential":
      self.layers = nnx.Sequential(*blocks)
    else:
      self.layers = nnx.Dict({f"b{i}": b for i, b in enumerate(blocks)})
    self.container, self.remat = container, remat
    self.head = nnx.Linear(D, 96, rngs=rngs)
    self.alias = self.head  # one module referenced from two attributes (a tie)

  def __call__(self, x):
    if self.container == "sequential":
      x = self.layers(x)
    else:
      for b in (self.layers if self.container == "list" else self.layers.values()):
        x = nnx.remat(lambda blk, v: blk(v))(b, x) if self.remat else b(x)
    return self.alias(x) + self.head(x)


@pytest.mark.parametrize("container", ["list", "sequential", "dict", "list+remat"])
def test_nnx_containers_and_aliases(container):
  cal, x = tm.batches(2, d=D), tm.batches(1, d=D, seed=4)[0]
  container, _, remat = container.partition("+")
  m = NNXNet(nnx.Rngs(0), container, remat=bool(remat))
  y_float = m(x)
  stats = aq.calibrate(m, None, cal, progress=False)
  assert len([s for s in stats.values() if not s.reason]) == 5  # 2 x (up, down) + the aliased head once
  q, report = aq.quantize_model_with_report(m, stats, aq.QuantConfig(alpha=0.5, rotate=False), copy=True)
  assert q.alias is q.head and isinstance(q.head.kernel.get_value(), aq.QuantizedKernel)
  assert tm.int8_matmuls(lambda v: q(v), x) == 2 * 2 + 2  # the head is called twice
  err = _rel(q(x), y_float)
  assert err < 0.05, err
  # Under jit XLA CPU contracts the epilogue multiply-add into an FMA, so a value may land
  # one int8 step apart in a later layer: equal within quantization noise, not in bits.
  assert _rel(nnx.jit(lambda mod, v: mod(v))(q, x), q(x)) < 1e-3
  assert not isinstance(m.head.kernel.get_value(), aq.QuantizedKernel)  # copy=True left m alone


# ---------------------------------------------------------------- generation

class Decoder(nn.Module):
  """One attention block with a KV cache (decode=True appends one step)."""

  @nn.compact
  def __call__(self, x, decode: bool = False):
    h = nn.LayerNorm(name="ln")(x)
    q, k, v = (nn.Dense(D, name=n)(h) for n in "qkv")
    if decode:
      ck = self.variable("cache", "cached_k", jnp.zeros, (x.shape[0], 8, D))
      cv = self.variable("cache", "cached_v", jnp.zeros, (x.shape[0], 8, D))
      i = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
      ck.value = jax.lax.dynamic_update_slice(ck.value, k, (0, i.value, 0))
      cv.value = jax.lax.dynamic_update_slice(cv.value, v, (0, i.value, 0))
      mask = jnp.arange(8)[None, None, :] <= i.value
      i.value = i.value + 1
      k, v = ck.value, cv.value
    else:
      mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))[None]
    a = jnp.where(mask, jnp.einsum("bqd,bkd->bqk", q, k) / np.sqrt(D), -1e9)
    return x + nn.Dense(D, name="o")(jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(a), v))


def test_kv_cache_decoding_runs_int8():
  m = Decoder()
  cal = tm.batches(2, t=8, d=D)
  params = m.init(jax.random.key(0), cal[0])
  q = aq.quantize_params(params, aq.calibrate(m, params, cal, progress=False), aq.QuantConfig(alpha=0.5, rotate=False))
  x = tm.batches(1, t=8, d=D, seed=5)[0]
  cache = jax.tree.map(jnp.zeros_like, m.init(jax.random.key(0), x[:, :1], decode=True)["cache"])
  f = aq.quantized_apply(m, backend="xla")
  step = jax.jit(lambda v, t: f(v, t, decode=True, mutable=["cache"]))
  assert tm.int8_matmuls(lambda qp, c, t: aq.quantized_apply(m, backend="xla")(
      {**qp, "cache": c}, t, decode=True, mutable=["cache"]), q, cache, x[:, :1]) == 4
  outs = []
  for t in range(8):
    y, upd = step({**q, "cache": cache}, x[:, t:t + 1])
    cache = upd["cache"]
    outs.append(y)
  full = aq.quantized_apply(m, backend="xla")(q, x)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-4, atol=1e-4)  # same int8 math
  assert _rel(full, m.apply(params, x)) < 0.05


# ---------------------------------------------------------------- stats that know their model

class PrePost(nn.Module):
  post: bool

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      ln = nn.LayerNorm(name=f"ln_{i}")
      if self.post:
        x = ln(x + nn.Dense(D, name=f"fc_{i}")(x))
      else:
        x = x + nn.Dense(D, name=f"fc_{i}")(ln(x))
    return x


def test_stats_of_another_structure_raise():
  cal = tm.batches(2, d=D)
  pre, post = PrePost(False), PrePost(True)
  params = pre.init(jax.random.key(0), cal[0])  # the same param tree for both
  pre_stats = aq.calibrate(pre, params, cal, progress=False)
  post_stats = aq.calibrate(post, params, cal, progress=False)
  assert pre_stats["fc_1"].fingerprint != post_stats["fc_1"].fingerprint
  with pytest.raises(ValueError, match="fingerprints"):
    aq.quantize_params(params, {**pre_stats, "fc_1": post_stats["fc_1"]}, aq.QuantConfig(alpha=0.5, rotate=False))
  # pre-LN stats fold 1/s into ln_0 / ln_1; the post-LN model also reads them elsewhere
  q = aq.quantize_params(params, pre_stats, aq.QuantConfig(alpha=0.5, rotate=False))
  with pytest.raises(ValueError, match=r"layer fc_\d: its smoothing was folded into ln_\d.*different model"):
    aq.quantized_apply(post)(q, cal[0])
  aq.quantized_apply(pre)(q, cal[0])  # its own model runs
  # post-LN stats (run-time vectors, calibrated where LN outputs are also the residual)
  # on the pre-LN model of the same sizes and param tree
  with pytest.raises(ValueError, match=r"layer fc_\d: its input here .* is not what its stats were calibrated on"):
    aq.quantized_apply(pre)(aq.quantize_params(params, post_stats, aq.QuantConfig(alpha=0.5, rotate=False)), cal[0])
  aq.quantized_apply(post)(aq.quantize_params(params, post_stats, aq.QuantConfig(alpha=0.5, rotate=False)), cal[0])


# ---------------------------------------------------------------- stats files and batches

def test_stats_file_errors(tmp_path):
  m = PrePost(False)
  cal = tm.batches(1, d=D)
  stats = aq.calibrate(m, m.init(jax.random.key(0), cal[0]), cal, progress=False)
  aq.save_stats(stats, str(tmp_path / "x"))  # numpy writes x.npz
  back = aq.load_stats(str(tmp_path / "x"))
  assert set(back) == set(stats) and back["fc_0"].fingerprint == stats["fc_0"].fingerprint
  good = (tmp_path / "x.npz").read_bytes()
  (tmp_path / "cut.npz").write_bytes(good[: len(good) // 2])
  (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
  np.save(tmp_path / "arr.npy", np.ones(3))
  for bad in ("cut.npz", "junk.npz", "arr.npy"):
    with pytest.raises(aq.StatsFileError, match="load_stats"):
      aq.load_stats(tmp_path / bad)


def test_zero_row_batch_is_named():
  m = PrePost(False)
  x = tm.batches(1, d=D)[0]
  params = m.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"batch 2 has 0 rows"):
    aq.calibrate(m, params, [x, x[:0]], progress=False)


def test_unsupported_layout_is_float_with_a_reason():
  class PerHead(nn.Module):
    @nn.compact
    def __call__(self, x):  # x (H, T, D): a weight per head (batch axis 0)
      y = nn.DenseGeneral(D, axis=-1, batch_dims=(0,), name="per_head")(x)
      return nn.Dense(D, name="fc")(y)
  x = jax.random.normal(jax.random.key(0), (H, 16, D))
  m = PerHead()
  params = m.init(jax.random.key(0), x)
  stats = aq.calibrate(m, params, [x], progress=False)
  assert "batch axes" in stats["per_head"].reason
  q, report = aq.quantize_params_with_report(params, stats, aq.QuantConfig(alpha=0.5, rotate=False))
  assert not isinstance(q["params"]["per_head"]["kernel"], aq.QuantizedKernel)
  line = aq.report_summary(report)
  assert line.startswith("quantized 1 of 2 weight matmuls") and "per_head" in line and "batch axes" in line
  f = aq.quantized_apply(m, backend="xla")
  assert tm.int8_matmuls(f, q, x) == 1
  assert _rel(f(q, x), m.apply(params, x)) < 0.05


def test_checkpoint_keeps_any_layout(tmp_path):
  # DenseGeneral head axes (kernel (K, H, F/H)) and a tied head (the float table kept)
  # round-trip with their contraction fields, against the float params as `like`.
  ids = [jax.random.randint(jax.random.key(i), (4, 16), 0, 96) for i in range(2)]

  class Mixed(nn.Module):
    @nn.compact
    def __call__(self, ids):
      embed = nn.Embed(96, D, name="embed")
      x = Net("dense_general", name="net")(embed(ids))
      return embed.attend(nn.LayerNorm(name="ln_f")(x))
  m = Mixed()
  params = m.init(jax.random.key(0), ids[0])
  stats = aq.calibrate(m, params, ids, progress=False)
  q = aq.quantize_params(params, stats, aq.QuantConfig(alpha=0.5, rotate=False))
  aq.save_checkpoint(tmp_path / "ck", q, stats=stats)
  back, back_stats = aq.restore_checkpoint(tmp_path / "ck", like=params)
  up = back["params"]["net"]["block_0"]["up"]["m"]["kernel"]
  assert (up.contract, up.out, up.float_shape) == ((0,), (1, 2), (D, H, F // H))
  assert back["params"]["embed"]["embedding"].kept is None  # the lookup reads the int8 table
  assert back_stats["embed/embedding"].keep_float
  f = aq.quantized_apply(m, backend="xla")
  np.testing.assert_array_equal(f(back, ids[1]), f(q, ids[1]))
