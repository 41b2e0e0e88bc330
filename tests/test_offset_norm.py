"""Norms that scale by 1 + g (Gemma's RMSNorm: `normed * (1 + scale)`, `(scale + 1)`, the
f32 upcast `(normed.astype(f32) * (1.0 + scale.astype(f32))).astype(dtype)`, HF's
`(1 + weight) * normed`) are recognized from the dataflow and absorb 1/s exactly up to
float rounding: g' = (1 + g) / s - 1 (smooth.fold_inverse says how far the model's own
1 + g' can be from (1 + g) / s, and this file checks that bound on the activation that
reaches the matmul)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import actquant_jax as aq
from actquant_jax import smooth
from actquant_jax._dataflow import kind_offsets, producer_kind
from tests import toy_models as tm

D, F, H, L = 32, 64, 4, 2
U = 2.0 ** -24  # float32 unit roundoff
OUTLIERS = np.array([3, 17, 30])


class GemmaRMSNorm(nn.Module):
  """RMSNorm scaling by 1 + g, written `form`'s way (g initialized to 0: the scale is 1)."""

  form: str = "1+g"
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    name = "weight" if self.form == "hf" else "scale"
    g = self.param(name, nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
    if self.form == "1+g":
      return (normed * (1 + g)).astype(x.dtype)
    if self.form == "g+1":
      return (normed * (g + 1)).astype(x.dtype)
    if self.form == "expand":  # the gemma library: the scale broadcast first, then 1 +
      return (normed * (1 + jnp.expand_dims(g, tuple(range(x.ndim - 1))))).astype(x.dtype)
    if self.form == "f32":  # the upcast pattern, back to the activations' dtype
      return (normed.astype(jnp.float32) * (1.0 + g.astype(jnp.float32))).astype(x.dtype)
    if self.form == "hf":  # transformers' FlaxGemmaRMSNorm
      return (1 + g) * jnp.asarray(normed, x.dtype)
    raise ValueError(self.form)


class GemmaBlock(nn.Module):
  """Pre-norm block: (1 + g) RMSNorm -> q/k/v -> attention -> o; (1 + g) RMSNorm -> gated MLP."""

  form: str = "1+g"
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda n, f: nn.Dense(f, use_bias=False, name=n, param_dtype=self.param_dtype)
    h = GemmaRMSNorm(self.form, self.param_dtype, name="input_norm")(x)
    q, k, v = (dense(n, D)(h) for n in "qkv")
    x = x + dense("o", D)(tm.attention(q, k, v, heads=H))
    h = GemmaRMSNorm(self.form, self.param_dtype, name="mlp_norm")(x)
    return x + dense("down", D)(nn.gelu(dense("gate", F)(h)) * dense("up", F)(h))


class Net(nn.Module):
  form: str = "1+g"
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(L):
      x = GemmaBlock(self.form, self.param_dtype, name=f"block_{i}")(x)
    return x


NORM_READERS = {"input_norm": ("q", "k", "v"), "mlp_norm": ("gate", "up")}


def _params(model, x, seed=0):
  """Random (1 + g) scales in [0.5, 3], outlier channels in the norms' outputs (1 + g = 40
  on OUTLIERS) with the readers' rows there divided by 40 (the layers' outputs as without
  them, their inputs with 40x channels: as trained LLMs have them)."""
  params = model.init(jax.random.key(seed), x)
  rng = np.random.default_rng(seed)
  p = jax.tree_util.tree_map(lambda v: v, params)
  for i in range(L):
    blk = p["params"][f"block_{i}"]
    for norm, readers in NORM_READERS.items():
      n = blk[norm]
      name = next(iter(n))
      g = rng.uniform(-0.5, 2.0, D)
      g[OUTLIERS] = 39.0
      n[name] = jnp.asarray(g, n[name].dtype)
      for r in readers:
        blk[r]["kernel"] = blk[r]["kernel"].at[OUTLIERS].divide(40.0)
  return p


@pytest.fixture(scope="module")
def data():
  return tm.batches(2, d=D), tm.batches(1, d=D, seed=3)[0]


@pytest.mark.parametrize("form", ["1+g", "g+1", "expand", "f32", "hf"])
def test_gemma_norms_fold_into_qkv_and_mlp(form, data):
  cal, x = data
  m = Net(form)
  params = _params(m, cal[0])
  stats = aq.calibrate(m, params, cal, progress=False)
  name = "weight" if form == "hf" else "scale"
  for i in range(L):
    for norm, readers in NORM_READERS.items():
      for r in readers:
        s = stats[f"block_{i}/{r}"]
        assert (s.producer, s.producer_kind, s.fold_params) == (f"block_{i}/{norm}", f"rmsnorm(1+{name})", (name,))
        assert s.foldable, (r, s)
  q, report = aq.quantize_params_with_report(params, stats, aq.QuantConfig(alpha=0.5, rotate=False))
  folded = sorted(p for p, r in report.items() if r.smoothing == "folded")
  assert set(folded) == {f"block_{i}/{r}" for i in range(L) for r in ("q", "k", "v", "gate", "up")}
  assert "10 smoothing vectors folded" in aq.report_summary(report)
  f = jax.jit(aq.quantized_apply(m, backend="xla"))
  assert tm.int8_matmuls(f, q, x) == 7 * L
  err = _rel(f(q, x), m.apply(params, x))
  # the same model with the 1/s kept at run time (nothing folded): the fold changes rounding only
  rt = aq.quantize_params(params, {p: _not_foldable(s) for p, s in stats.items()}, aq.QuantConfig(alpha=0.5, rotate=False))
  rt_err = _rel(f(rt, x), m.apply(params, x))
  assert err < 0.05 and abs(err - rt_err) < 0.1 * rt_err + 1e-4, (err, rt_err)


def _not_foldable(s):
  return dataclasses.replace(s, exclusive=False)


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _q_input(model, params, x, layer="block_0/q"):
  """The activation reaching `layer`'s matmul (f64 numpy)."""
  seen = []

  def grab(next_fun, args, kwargs, ctx):
    if ctx.method_name == "__call__" and "/".join(ctx.module.path) == layer:
      seen.append(np.asarray(args[0], np.float64))
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(grab):
    model.apply(params, x)
  return seen[0]


def test_folded_input_is_the_unfolded_one_over_s(data):
  """x_fold = fl(h * fl(1 + g')), x = fl(h * fl(1 + g)): |x_fold - x * inv| <= 4u |x * inv|
  (the roundings of (1 + g) * inv, of both products and of x * inv; u = 2^-24) + 2^-25 |h|
  (the one rounding of t - 1 for t = (1 + g) * inv < 0.5; none for t >= 0.5: see
  smooth.fold_inverse). Checked on the activation reaching block_0/q's matmul in the
  model, and on every folded norm applied to one input (downstream of the first block the
  smoothed model's inputs differ by the matmuls' own rounding). A fold computed as for a
  plain scale (g / s) would be off by ~h / s."""
  cal, x = data
  m = Net("1+g")
  params = _params(m, cal[0])
  stats = aq.calibrate(m, params, cal, progress=False)
  # o and down unsmoothed: their 1/s would be a run-time vector, which the float smoothed
  # model does not apply; with only folds, it computes the same function up to rounding
  config = aq.QuantConfig(alpha=0.5, rules=(aq.LayerRule(r"/(o|down)$", alpha=None),), rotate=False)
  smoothed, plans = aq.smooth_params(params, stats, config)
  assert {p for p, pl in plans.items() if pl.s is not None and not pl.folded} == set()

  def check(x_unfolded, x_folded, c, inv):
    ref = x_unfolded * inv.astype(np.float64)
    h = np.abs(x_unfolded) / c.astype(np.float64)
    bound = 4.01 * U * np.abs(ref) + 1.01 * 2.0 ** -25 * h
    assert np.all(np.abs(x_folded - ref) <= bound), np.max(np.abs(x_folded - ref) / bound)
    assert np.max(np.abs(x_folded - ref)) > 0  # (the bound is about real roundings)

  regimes = set()
  for i in range(L):
    for norm, readers in NORM_READERS.items():
      plan = plans[f"block_{i}/{readers[0]}"]
      assert plan.folded
      inv = np.float32(1) / np.asarray(plan.s, np.float32)  # f32 throughout, as the model and the fold
      old, new = params["params"][f"block_{i}"][norm], smoothed["params"][f"block_{i}"][norm]
      c = np.float32(1) + np.asarray(old["scale"], np.float32)
      t = c * inv
      regimes |= {bool(r) for r in t < 0.5}
      one_plus = np.float32(1) + np.asarray(new["scale"], np.float32)
      np.testing.assert_array_equal(one_plus[t >= 0.5], t[t >= 0.5])  # exact there
      assert np.max(np.abs(one_plus.astype(np.float64) - t)) <= 2.0 ** -25
      norm_fn = lambda p: np.asarray(GemmaRMSNorm().apply({"params": p}, x), np.float64)
      check(norm_fn(old), norm_fn(new), c, inv)
      if (i, norm) == (0, "input_norm"):  # in the model: what reaches the matmul
        check(_q_input(m, params, x), _q_input(m, smoothed, x), c, inv)
  assert regimes == {True, False}  # both regimes of the bound were exercised


def test_bfloat16_scale_is_recognized_but_kept_at_run_time(data):
  """In bf16 the fold would lose t's precision (see smooth.fold_inverse): 1/s stays a
  run-time vector, and the model is still right."""
  cal, x = data
  m = Net("f32", jnp.bfloat16)
  params = _params(m, cal[0])
  stats = aq.calibrate(m, params, cal, progress=False)
  s = stats["block_0/q"]
  assert s.producer_kind == "rmsnorm(1+scale)" and s.foldable
  q, report = aq.quantize_params_with_report(params, stats, aq.QuantConfig(alpha=0.5, rotate=False))
  assert {r.smoothing for r in report.values()} == {"runtime"}
  np.testing.assert_array_equal(q["params"]["block_0"]["input_norm"]["scale"],
                                params["params"]["block_0"]["input_norm"]["scale"])
  y = aq.quantized_apply(m, backend="xla")(q, x).astype(jnp.float32)
  assert _rel(y, m.apply(params, x).astype(jnp.float32)) < 0.05


class ScanBody(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return GemmaBlock(name="block")(x), None


class ScanNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.scan(ScanBody, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)(
        name="layers")(x, None)[0]


def test_stacked_gemma_norms_fold_per_layer_like_unrolled(data):
  cal, x = data
  u, m = Net("1+g"), ScanNet()
  uparams = _params(u, cal[0])
  stack = lambda *a: jnp.stack(a)
  params = {"params": {"layers": {"block": jax.tree_util.tree_map(
      stack, *[uparams["params"][f"block_{i}"] for i in range(L)])}}}
  stats = aq.calibrate(m, params, cal, progress=False)
  assert stats["layers/block/q"].producer_kind == "rmsnorm(1+scale)" and stats["layers/block/q"].foldable
  config = aq.QuantConfig(alpha=0.5, rotate=False)
  q, report = aq.quantize_params_with_report(params, stats, config)
  uq = aq.quantize_params(uparams, aq.calibrate(u, uparams, cal, progress=False), config)
  assert sum(r.smoothing == "folded" for r in report.values()) == 5
  for i in range(L):
    for norm in NORM_READERS:
      np.testing.assert_allclose(q["params"]["layers"]["block"][norm]["scale"][i],
                                 uq["params"][f"block_{i}"][norm]["scale"], rtol=1e-6, atol=1e-7)
  y = jax.jit(aq.quantized_apply(m, backend="xla"))(q, x)
  yu = jax.jit(aq.quantized_apply(u, backend="xla"))(uq, x)
  assert _rel(y, yu) < 1e-3 and _rel(y, m.apply(params, x)) < 0.05


def test_fold_inverse_and_kinds_of_offset_scales():
  assert producer_kind("rmsnorm", {"scale": 1.0}) == "rmsnorm(1+scale)"
  assert producer_kind("layernorm", {"scale": 0.0}) == "layernorm"
  assert kind_offsets("layernorm(1+w)") == ("layernorm", {"w": 1.0})
  assert kind_offsets("dense") == ("dense", {})
  s = np.array([1.0, 4.0, 1e3, 0.25], np.float32)
  g = jnp.array([0.0, 1.0, 2.0, -0.5], jnp.float32)
  b = jnp.array([1.0, 1.0, 1.0, 1.0], jnp.float32)
  out = smooth.fold_inverse("layernorm(1+scale)", {"scale": g, "bias": b}, s)
  np.testing.assert_allclose(1 + out["scale"], (1 + g) / s, rtol=2 * U, atol=2.0 ** -25)
  np.testing.assert_allclose(out["bias"], b / s, rtol=2 * U)
  # one name at a time (a layer stack folds each param on its own): the same numbers
  assert np.array_equal(smooth.fold_inverse("layernorm(1+scale)", {"bias": b}, s, ("bias",))["bias"], out["bias"])
  assert smooth.can_fold("rmsnorm(1+scale)", {"scale": g})
  assert not smooth.can_fold("rmsnorm(1+scale)", {"scale": g.astype(jnp.bfloat16)})
  assert not smooth.can_fold("rmsnorm(1+scale)", {"weight": g})
