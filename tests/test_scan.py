"""Scans over layers (`nn.scan`, `nnx.scan`, `jax.lax.scan` over stacked params): per-layer
statistics and smoothing, stacked QuantizedKernels the scan slices, every weight matmul in
int8 (counted in the traced program), and the same output as the model written with
unrolled layers: the scan changes nothing but the program's shape."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import actquant_jax as aq
from tests import toy_models as tm

D, F, L, H = 32, 64, 3, 4
# A different outlier channel per layer: merged statistics would show all three in every layer.
LN1_OUTLIER, LN2_OUTLIER = (3, 11, 20), (7, 15, 28)


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _random_params(shapes, seed=0):
  """Params for a tree of shapes (from eval_shape: no op-by-op init to compile): norm
  scales 1, biases 0, weights N(0, 1/K)."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    if name in ("scale", "g"):
      return jnp.ones(s.shape, s.dtype)
    if name == "bias":
      return jnp.zeros(s.shape, s.dtype)
    std = 1.0 if name == "embedding" else 1.0 / np.sqrt(D)
    return jnp.asarray(rng.standard_normal(s.shape) * std, s.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


# ---------------------------------------------------------------- linen nn.scan

class Block(nn.Module):
  """LayerNorm -> q/k/v -> attention -> o; LayerNorm -> MLP (pre-LN: both norms fold)."""

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln_1")(x)
    q, k, v = (nn.Dense(D, name=n)(h) for n in "qkv")
    x = x + nn.Dense(D, name="o")(tm.attention(q, k, v, heads=H))
    h = nn.LayerNorm(name="ln_2")(x)
    return x + nn.Dense(D, name="fc2")(nn.gelu(nn.Dense(F, name="fc1")(h)))


class ScanBody(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return Block(name="block")(x), None


class ScanNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    layers = nn.scan(nn.remat(ScanBody), variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
    return nn.LayerNorm(name="ln_f")(layers(name="layers")(x, None)[0])


class Unrolled(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(L):
      x = Block(name=f"block_{i}")(x)
    return nn.LayerNorm(name="ln_f")(x)


WEIGHTS = ("q", "k", "v", "o", "fc1", "fc2")


@pytest.fixture(scope="module")
def linen_pair():
  cal, x = tm.batches(2, d=D), tm.batches(1, d=D, seed=7)[0]
  m, u = ScanNet(), Unrolled()
  params = _random_params(jax.eval_shape(m.init, jax.random.key(0), cal[0]))
  blk = params["params"]["layers"]["block"]
  for i in range(L):
    blk["ln_1"]["scale"] = blk["ln_1"]["scale"].at[i, LN1_OUTLIER[i]].set(30.0)
    blk["ln_2"]["scale"] = blk["ln_2"]["scale"].at[i, LN2_OUTLIER[i]].set(30.0)
  uparams = {"params": {"ln_f": params["params"]["ln_f"],
                        **{f"block_{i}": jax.tree_util.tree_map(lambda a: a[i], blk) for i in range(L)}}}
  y_float = jax.jit(m.apply)(params, x)  # (the unrolled model's: equal up to float noise)
  stats = aq.calibrate(m, params, cal, progress=False)
  ustats = aq.calibrate(u, uparams, cal, progress=False)
  return m, params, stats, u, uparams, ustats, x, y_float


def test_linen_scan_has_per_layer_stats(linen_pair):
  m, params, stats, u, uparams, ustats, x, y_float = linen_pair
  assert set(stats) == {f"layers/block/{w}" for w in WEIGHTS}
  for w in WEIGHTS:
    s = stats[f"layers/block/{w}"]
    assert s.layers == L and s.absmax.shape[0] == L and s.samples.shape[0] == L
    assert int(s.tokens) == int(ustats[f"block_0/{w}"].tokens)  # one layer's rows
    for i in range(L):  # layer i's statistic is the unrolled layer i's, not a merge
      u_s = ustats[f"block_{i}/{w}"]
      np.testing.assert_allclose(s.absmax[i], u_s.absmax, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(s.samples[i], u_s.samples, rtol=1e-5, atol=1e-5)
  for w, planted in (("q", LN1_OUTLIER), ("fc1", LN2_OUTLIER)):
    assert tuple(np.argmax(np.asarray(stats[f"layers/block/{w}"].absmax), axis=-1)) == planted
  # the norms are stacked by the same scan: 1/s folds into each layer's norm
  assert stats["layers/block/q"].producer == "layers/block/ln_1" and stats["layers/block/q"].foldable
  assert stats["layers/block/k"].group == stats["layers/block/v"].group == "layers/block/q"
  assert stats["layers/block/fc1"].producer == "layers/block/ln_2" and stats["layers/block/fc1"].foldable
  assert not stats["layers/block/o"].foldable and not stats["layers/block/fc2"].foldable


@pytest.mark.parametrize("act_mode,alpha", [("dynamic", 0.5), ("static", 0.5), ("dynamic", None)])
def test_linen_scan_runs_int8_like_unrolled(linen_pair, act_mode, alpha):
  m, params, stats, u, uparams, ustats, x, y_float = linen_pair
  config = aq.QuantConfig(act_mode=act_mode, alpha=alpha, rotate=False)
  q, report = aq.quantize_params_with_report(params, stats, config)
  uq = aq.quantize_params(uparams, ustats, config)
  for w in WEIGHTS:
    qk = q["params"]["layers"]["block"][w]["kernel"]
    assert isinstance(qk, aq.QuantizedKernel) and qk.values.shape[0] == L and qk.scale.shape[0] == L
    assert (qk.act_scale is None) == (act_mode == "dynamic") and (qk.act_scale is None or qk.act_scale.shape == (L,))
    for i in range(L):  # per-layer smoothing and scales: exactly the unrolled layer's kernel
      one = uq["params"][f"block_{i}"][w]["kernel"]
      np.testing.assert_array_equal(qk.values[i], one.values)
      np.testing.assert_allclose(qk.scale[i], one.scale, rtol=1e-6)
      if one.act_scale is not None:
        np.testing.assert_allclose(qk.act_scale[i], one.act_scale, rtol=1e-6)
      if one.inv_smooth is not None:
        np.testing.assert_allclose(qk.inv_smooth[i], one.inv_smooth, rtol=1e-6)
  folded = 4 if alpha else 0  # q, k, v, fc1 into the stacked norms (per layer)
  assert sorted(r.smoothing for r in report.values()).count("folded") == folded
  assert sum(bool(uq["params"][f"block_{i}"][w]["kernel"].folded_into) for i in range(L) for w in WEIGHTS) == L * folded
  if alpha:
    scale = q["params"]["layers"]["block"]["ln_1"]["scale"]
    for i in range(L):
      np.testing.assert_allclose(scale[i], uq["params"][f"block_{i}"]["ln_1"]["scale"], rtol=1e-6)
  assert aq.report_summary(report).startswith(
      f"quantized 6 of 6 weight matmuls (6 of them stacked weights x {L} scanned layers)")
  assert "(x3)" in aq.format_report(report)

  f, fu = jax.jit(aq.quantized_apply(m, backend="xla")), jax.jit(aq.quantized_apply(u, backend="xla"))
  assert tm.int8_matmuls(f, q, x) == 6  # the scan body's six, run L times
  assert tm.int8_matmuls(fu, uq, x) == 6 * L
  y, yu = f(q, x), fu(uq, x)
  err, u_err = _rel(y, y_float), _rel(yu, y_float)
  assert err <= u_err * 1.05 + 1e-6, (err, u_err)
  assert err < 0.15
  assert _rel(y, yu) < 1e-3  # the same int8 math, up to float noise
  hlo = f.lower(q, x).as_text()
  assert "while" in hlo and hlo.count("i8") > 0  # still a loop (not unrolled), over int8 kernels


def test_stacked_stats_and_qparams_round_trip(linen_pair, tmp_path):
  m, params, stats, u, uparams, ustats, x, y_float = linen_pair
  aq.save_stats(stats, tmp_path / "s.npz")
  back = aq.load_stats(tmp_path / "s.npz")
  assert back["layers/block/q"].layers == L
  np.testing.assert_array_equal(back["layers/block/q"].absmax, stats["layers/block/q"].absmax)
  merged = aq.merge_stats(stats, back, num_samples=64)
  assert merged["layers/block/q"].samples.shape == (L, 64, D)
  assert int(merged["layers/block/q"].tokens) == 2 * int(stats["layers/block/q"].tokens)
  q = aq.quantize_params(params, back, aq.QuantConfig(alpha=0.5, rotate=False))
  aq.save_checkpoint(tmp_path / "ck", q, stats=back)
  q2, _ = aq.restore_checkpoint(tmp_path / "ck", like=params)
  assert jax.tree_util.tree_structure(q2) == jax.tree_util.tree_structure(q)
  for a, b in zip(jax.tree_util.tree_leaves(q2), jax.tree_util.tree_leaves(q)):
    np.testing.assert_array_equal(a, b)
  # sharding rules of the float stack (layer axis, K, N) carry over, the layer axis first
  P = jax.sharding.PartitionSpec
  float_specs = jax.tree_util.tree_map(lambda a: P(*(None,) * (a.ndim - 1), "model"), params)
  specs = aq.quantized_partition_specs(q, float_specs)["params"]["layers"]["block"]["q"]["kernel"]
  assert (specs.values, specs.scale, specs.inv_smooth) == (P(None, "model", None), P(None, "model"), None)


# ---------------------------------------------------------------- jax.lax.scan: consts and xs

def _rms(h):
  return h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6)


class LaxScan(nn.Module):
  """A hand-written lax.scan: stacked per-layer weights and RMSNorm scales as xs, and a
  weight and a norm scale shared by every iteration closed over (scan consts);
  reverse=True."""

  unrolled: bool = False

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.lecun_normal()
    shared = self.param("shared", init, (D, D))
    g_shared = self.param("g_shared", nn.initializers.ones, (D,))
    if self.unrolled:
      layers = [(self.param(f"w_{i}", init, (D, F)), self.param(f"g_{i}", nn.initializers.ones, (D,)),
                 self.param(f"w2_{i}", init, (D, D))) for i in range(L)]
    else:
      stacked = (self.param("w", init, (L, D, F)), self.param("g", nn.initializers.ones, (L, D)),
                 self.param("w2", init, (L, D, D)))

    def body(h, layer):
      w, g, w2 = layer
      h = h + jnp.tanh(_rms(h) * g @ w)[..., :D]
      h = h + jnp.tanh(_rms(h) * g_shared @ w2)  # per-layer 1/s cannot fold into the one g_shared
      return h + 0.5 * (h @ shared), None
    if self.unrolled:
      for layer in reversed(layers):
        x = body(x, layer)[0]
      return x
    return jax.lax.scan(body, x, stacked, reverse=True)[0]


class LaxScanNet(nn.Module):
  unrolled: bool = False

  @nn.compact
  def __call__(self, x):
    return LaxScan(self.unrolled, name="net")(x)


def test_lax_scan_with_shared_and_stacked_weights():
  cal, x = tm.batches(2, d=D), tm.batches(1, d=D, seed=5)[0]
  m, u = LaxScanNet(), LaxScanNet(unrolled=True)
  params = _random_params(jax.eval_shape(m.init, jax.random.key(0), cal[0]))
  p = params["params"]["net"]
  p["g"] = p["g"].at[np.arange(L), np.array(LN1_OUTLIER)].set(30.0)
  p["g_shared"] = p["g_shared"].at[np.array(LN2_OUTLIER)].set(30.0)
  uparams = {"params": {"net": {"shared": p["shared"], "g_shared": p["g_shared"],
                                **{f"{n}_{i}": p[n][i] for i in range(L) for n in ("w", "g", "w2")}}}}
  y_float = jax.jit(m.apply)(params, x)  # (the unrolled model's: equal up to float noise)
  stats = aq.calibrate(m, params, cal, progress=False)
  ustats = aq.calibrate(u, uparams, cal, progress=False)
  assert stats["net/w"].layers == L and stats["net/shared"].layers == 0
  # the shared weight: one statistic over its L calls per forward, as unrolled
  assert int(stats["net/shared"].tokens) == int(ustats["net/shared"].tokens) == L * 2 * 4 * 16
  np.testing.assert_allclose(stats["net/shared"].absmax, ustats["net/shared"].absmax, rtol=1e-5)
  for i in range(L):  # reverse=True: layer i is still xs[i]
    np.testing.assert_allclose(stats["net/w"].absmax[i], ustats[f"net/w_{i}"].absmax, rtol=1e-5)
    assert int(np.argmax(np.asarray(stats["net/w"].absmax[i]))) == LN1_OUTLIER[i]
  assert stats["net/w"].producer == "net" and stats["net/w"].producer_kind == "rmsnorm" and stats["net/w"].foldable
  assert stats["net/w2"].producer_kind == "rmsnorm" and not stats["net/w2"].foldable
  q = aq.quantize_params(params, stats, aq.QuantConfig(alpha=0.5, rotate=False))
  uq = aq.quantize_params(uparams, ustats, aq.QuantConfig(alpha=0.5, rotate=False))
  assert q["params"]["net"]["w"].folded_into == ("net",) and uq["params"]["net"]["w_0"].folded_into == ("net",)
  for w in ("w2", "shared"):  # 1/s at run time
    assert not q["params"]["net"][w].folded_into and q["params"]["net"][w].inv_smooth is not None
  assert q["params"]["net"]["w2"].inv_smooth.shape == (L, D)
  np.testing.assert_array_equal(q["params"]["net"]["g_shared"], p["g_shared"])
  for i in range(L):  # per-layer 1/s folded into each layer's g
    np.testing.assert_allclose(q["params"]["net"]["g"][i], uq["params"]["net"][f"g_{i}"], rtol=1e-6)
  f, fu = jax.jit(aq.quantized_apply(m, backend="xla")), jax.jit(aq.quantized_apply(u, backend="xla"))
  assert tm.int8_matmuls(f, q, x) == 3 and tm.int8_matmuls(fu, uq, x) == 3 * L
  err, u_err = _rel(f(q, x), y_float), _rel(fu(uq, x), y_float)
  assert err <= u_err * 1.05 + 1e-6 and err < 0.05, (err, u_err)


# ---------------------------------------------------------------- nnx: a JAX-native LLM

class LMBlock(nnx.Module):
  """RMSNorm -> nnx.Einsum q/k/v (head axes) -> attention -> nnx.Einsum o; RMSNorm ->
  gated MLP (nnx.Linear)."""

  def __init__(self, rngs):
    self.norm_1, self.norm_2 = nnx.RMSNorm(D, rngs=rngs), nnx.RMSNorm(D, rngs=rngs)
    self.q, self.k, self.v = (nnx.Einsum("btd,dhk->bthk", (D, H, D // H), rngs=rngs) for _ in range(3))
    self.o = nnx.Einsum("bthk,hkd->btd", (H, D // H, D), rngs=rngs)
    self.gate, self.up = nnx.Linear(D, F, use_bias=False, rngs=rngs), nnx.Linear(D, F, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(F, D, use_bias=False, rngs=rngs)

  def __call__(self, x):
    h = self.norm_1(x)
    q, k, v = self.q(h), self.k(h), self.v(h)
    t = x.shape[1]
    a = jnp.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(D // H)
    a = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((t, t), bool)), a, -1e9), axis=-1)
    x = x + self.o(jnp.einsum("bhqs,bshk->bqhk", a, v))
    h = self.norm_2(x)
    return x + self.down(nnx.silu(self.gate(h)) * self.up(h))


class TinyLM(nnx.Module):
  def __init__(self, variant, rngs):
    self.variant = variant
    self.embed = nnx.Embed(96, D, rngs=rngs)
    if variant.startswith("scan"):
      @nnx.split_rngs(splits=L)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(r):
        return LMBlock(r)
      self.layers = make(rngs)
    else:
      self.layers = nnx.List([LMBlock(rngs) for _ in range(L)])
    self.norm = nnx.RMSNorm(D, rngs=rngs)
    self.head = nnx.Linear(D, 96, use_bias=False, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids)
    if self.variant.startswith("scan"):
      call = nnx.remat(lambda blk, h: blk(h)) if self.variant == "scan+remat" else (lambda blk, h: blk(h))

      @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
      def body(blk, h):
        return call(blk, h)
      x = body(self.layers, x)
    else:
      for blk in self.layers:
        x = nnx.remat(lambda b, h: b(h))(blk, x) if self.variant == "list+remat" else blk(x)
    return self.head(self.norm(x))


def _lm(variant, pure):
  """TinyLM `variant` holding the stacked weights `pure` (layer i of each for nnx.List)."""
  m = nnx.eval_shape(lambda: TinyLM(variant, nnx.Rngs(0)))
  if not variant.startswith("scan"):
    pure = {**pure, "layers": {i: jax.tree_util.tree_map(lambda a: a[i], pure["layers"]) for i in range(L)}}
  state = nnx.state(m, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(m, state)
  return m


_call = nnx.jit(lambda mod, t: mod(t))


@pytest.fixture(scope="module")
def lm():
  """The stacked weights (a different outlier channel in each layer's norm_1), the
  calibration and test ids, and the nnx.List model's float and quantized outputs."""
  shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: TinyLM("scan", nnx.Rngs(0))), nnx.Param))
  pure = _random_params(shapes, seed=1)
  scale = pure["layers"]["norm_1"]["scale"]
  pure["layers"]["norm_1"]["scale"] = scale.at[np.arange(L), np.array(LN1_OUTLIER)].set(20.0)
  ids = [jax.random.randint(jax.random.key(i), (2, 16), 0, 96) for i in range(3)]
  m = _lm("list", pure)
  y_float = _call(m, ids[2])
  q = aq.quantize_model(m, aq.calibrate(m, None, ids[:2], progress=False), aq.QuantConfig(alpha=0.5, rotate=False), copy=True)
  assert tm.int8_matmuls(lambda t: q(t), ids[2]) == 7 * L + 1  # q, k, v, o, gate, up, down per block; head
  return pure, ids, y_float, _call(q, ids[2])


@pytest.mark.parametrize("variant", ["scan", "scan+remat"])
def test_nnx_llm_scan_runs_int8_like_list(variant, lm):
  pure, ids, y_float, y_list = lm
  m = _lm(variant, pure)  # the list model's function: the quantized outputs below agree
  stats = aq.calibrate(m, None, ids[:2], progress=False)
  assert stats["layers/q"].layers == L and stats["layers/q"].contract == (0,) and stats["layers/q"].out == (1, 2)
  assert tuple(np.argmax(np.asarray(stats["layers/q"].absmax), axis=-1)) == LN1_OUTLIER
  q = aq.quantize_model(m, stats, aq.QuantConfig(alpha=0.5, rotate=False))
  qk = q.layers.q.kernel.get_value()
  assert isinstance(qk, aq.QuantizedKernel) and qk.values.shape == (L, D, D)
  assert qk.folded_into == ("layers/norm_1",)  # into each layer's norm_1 scale
  assert tm.int8_matmuls(lambda t: q(t), ids[2]) == 7 + 1  # the scan body's seven, and the head
  y = _call(q, ids[2])
  err, list_err = _rel(y, y_float), _rel(y_list, y_float)
  assert err <= list_err * 1.05 + 1e-6, (err, list_err)
  assert err < 0.05
  assert _rel(y, y_list) < 1e-3


# ---------------------------------------------------------------- what stays unsupported

def test_while_loop_is_a_clear_error():
  class WhileNet(nn.Module):
    @nn.compact
    def __call__(self, x, n):
      w = self.param("w", nn.initializers.lecun_normal(), (D, D))
      return jax.lax.fori_loop(0, n, lambda i, h: h + h @ w, x)  # a traced trip count: a while loop
  x = tm.batches(1, d=D)[0]
  m = WhileNet()
  params = _random_params(jax.eval_shape(m.init, jax.random.key(0), x, 2))
  with pytest.raises(aq.CalibrationError, match=r"params w are contracted inside a `while`.*scan"):
    aq.calibrate(m, params, [(x, jnp.int32(2))], progress=False)


def test_nested_scan_over_a_stacked_weight_is_a_clear_error():
  class Inner(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return x + nn.Dense(D, name="fc")(x), None

  class Outer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      inner = nn.scan(Inner, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
      return inner(name="inner")(x, None)[0], None

  class Nested(nn.Module):
    @nn.compact
    def __call__(self, x):
      outer = nn.scan(Outer, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
      return outer(name="outer")(x, None)[0]
  x = tm.batches(1, d=D)[0]
  m = Nested()
  params = _random_params(jax.eval_shape(m.init, jax.random.key(0), x))
  with pytest.raises(aq.CalibrationError, match=r"outer/inner/fc/kernel.*nested"):
    aq.calibrate(m, params, [x], progress=False)


def test_sharded_layer_stack_quantizes_in_place():
  # quantize_params on the scan's stacked params sharded over 12 forced CPU devices (layer
  # axis, K, N; and with the layer axis unsharded): the same numbers as on one device, each
  # stacked QuantizedKernel placed as quantized_partition_specs maps the float rules
  # (the layer axis's spec first).
  from tests.kernel_utils import run_device_worker
  res = run_device_worker("quantize_scan_sharded_worker.py", 12)
  assert set(res) == {f"{lead}-{a}" for lead in ("None", "l") for a in ("0.5-static", "auto-dynamic")}
  for name, v in res.items():
    assert v["stacks"] == 6 and v["equal"] and v["wrong"] == [], (name, v)
