"""A weight contraction is quantized whichever operand the weight is: Gemma's fused k/v
`jnp.einsum('BSD,CKDH->CBSKH', x, w)` lowers to `dot_general(w, x)` (the weight's own
leading axis first in the output), and `lax.dot_general(w, x)` is `W @ x^T`. Both run the
same int8 GEMM as the weight written in the normal order (x on the left): the same stats,
the same QuantizedKernel, the same numbers -- in calibration, smoothing, quantize_params
and inference, unrolled, inside an nn.scan, and in nnx."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import actquant_jax as aq
from actquant_jax import _capture
from actquant_jax.calibrate import model_program
from tests import toy_models as tm

D, H, L = 32, 4, 3
init = nn.initializers.lecun_normal()


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def kv_proj(h, w_kv, w_o, lhs: bool):
  """Fused k/v (w_kv (2, H, D, D/H)) then an output projection (w_o (N, K) = (D, D)),
  with the weights on the left of their dot_generals (lhs) or on the right."""
  if lhs:
    kv = jnp.einsum("BSD,CKDH->CBSKH", h, w_kv)  # dot_general(w_kv, h)
  else:
    kv = jnp.einsum("BSD,CKDH->BSCKH", h, w_kv).transpose(2, 0, 1, 3, 4)  # dot_general(h, w_kv)
  z = jnp.tanh(kv[0] * kv[1]).reshape(h.shape)
  if lhs:  # W @ z^T: (N, B, S), moved back
    return jnp.moveaxis(jax.lax.dot_general(w_o, z, (((1,), (2,)), ((), ()))), 0, -1)
  return z @ w_o.T


class Block(nn.Module):
  lhs: bool

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln")(x)
    w_kv = self.param("kv_einsum", init, (2, H, D, D // H))
    w_o = self.param("o", init, (D, D))
    return x + kv_proj(h, w_kv, w_o, self.lhs)


class Net(nn.Module):
  lhs: bool

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = Block(self.lhs, name=f"block_{i}")(x)
    return x


class ScanBody(nn.Module):
  lhs: bool

  @nn.compact
  def __call__(self, x, _):
    return Block(self.lhs, name="block")(x), None


class ScanNet(nn.Module):
  lhs: bool

  @nn.compact
  def __call__(self, x):
    layers = nn.scan(ScanBody, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
    return layers(self.lhs, name="layers")(x, None)[0]


def _weight_sides(model, params, x):
  """{param path: weight_lhs} of every weight contraction of the traced model."""
  program, _ = model_program(model, params, None, x)
  return {s.param: s.weight_lhs for s in _capture.analyze(program).sites.values()}


def _with_outliers(params, path):
  """Outlier channels in the LayerNorms' outputs (their scales), stacked or not."""
  p = jax.tree_util.tree_map(lambda v: v, params)
  for ln in path(p["params"]):
    ln["scale"] = ln["scale"].at[..., np.array([3, 17])].set(30.0)
  return p


def _check_same_as_normal_order(m_lhs, m_rhs, params, cal, x, n_int8):
  assert set(_weight_sides(m_lhs, params, x).values()) == {True}  # what this test is about
  assert set(_weight_sides(m_rhs, params, x).values()) == {False}
  y_float = m_lhs.apply(params, x)
  np.testing.assert_allclose(m_rhs.apply(params, x), y_float, rtol=1e-5, atol=1e-5)
  stats = aq.calibrate(m_lhs, params, cal, progress=False)
  rstats = aq.calibrate(m_rhs, params, cal, progress=False)
  assert set(stats) == set(rstats) and not any(s.reason for s in stats.values())
  for p in stats:  # the same contraction: the same statistics and dataflow facts
    np.testing.assert_allclose(stats[p].absmax, rstats[p].absmax, rtol=1e-6)
    assert (stats[p].contract, stats[p].out, stats[p].producer_kind, stats[p].foldable) == (
        rstats[p].contract, rstats[p].out, rstats[p].producer_kind, rstats[p].foldable)
  q, report = aq.quantize_params_with_report(params, stats, aq.QuantConfig(alpha=0.5, rotate=False))
  rq = aq.quantize_params(params, rstats, aq.QuantConfig(alpha=0.5, rotate=False))
  assert all(r.quantized for r in report.values()), aq.format_report(report)
  line = aq.report_summary(report)
  assert line.startswith(f"quantized {len(report)} of {len(report)} weight matmuls") and "float" not in line
  # the kv einsum's 1/s folds into the LayerNorm, as in the normal order
  assert sorted(r.smoothing for r in report.values()) == ["folded"] * (len(report) // 2) + ["runtime"] * (
      len(report) // 2)
  for a, b in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(rq)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  f, fr = jax.jit(aq.quantized_apply(m_lhs, backend="xla")), jax.jit(aq.quantized_apply(m_rhs, backend="xla"))
  assert tm.int8_matmuls(f, q, x) == n_int8
  y, yr = f(q, x), fr(rq, x)
  np.testing.assert_allclose(y, yr, rtol=1e-5, atol=1e-6)  # the same int8 GEMM, transposed back
  assert _rel(y, y_float) < 0.05
  return stats, report


@pytest.fixture(scope="module")
def data():
  return tm.batches(2, d=D), tm.batches(1, d=D, seed=7)[0]


def test_weight_on_the_left_runs_int8_like_normal_order(data):
  cal, x = data
  m, r = Net(lhs=True), Net(lhs=False)
  params = _with_outliers(m.init(jax.random.key(0), cal[0]), lambda p: [p[f"block_{i}"]["ln"] for i in range(2)])
  stats, report = _check_same_as_normal_order(m, r, params, cal, x, n_int8=4)
  assert stats["block_0/kv_einsum"].contract == (2,) and stats["block_0/kv_einsum"].out == (0, 1, 3)
  assert stats["block_0/o"].contract == (1,) and stats["block_0/o"].out == (0,)


def test_weight_on_the_left_inside_a_scan(data):
  cal, x = data
  m, r = ScanNet(lhs=True), ScanNet(lhs=False)
  params = _with_outliers(m.init(jax.random.key(0), cal[0]), lambda p: [p["layers"]["block"]["ln"]])
  stats, report = _check_same_as_normal_order(m, r, params, cal, x, n_int8=2)
  assert stats["layers/block/kv_einsum"].layers == L and stats["layers/block/kv_einsum"].foldable
  assert report["layers/block/o"].layers == L


class NNXBlock(nnx.Module):
  def __init__(self, lhs: bool, rngs: nnx.Rngs):
    self.ln = nnx.LayerNorm(D, rngs=rngs)
    self.kv_einsum = nnx.Param(init(rngs.params(), (2, H, D, D // H)))
    self.o = nnx.Param(init(rngs.params(), (D, D)))
    self.lhs = lhs

  def __call__(self, x):
    return x + kv_proj(self.ln(x), self.kv_einsum[...], self.o[...], self.lhs)


def test_nnx_weight_on_the_left_runs_int8_like_normal_order(data):
  cal, x = data
  m, r = NNXBlock(True, nnx.Rngs(0)), NNXBlock(False, nnx.Rngs(0))
  for mod in (m, r):
    mod.ln.scale[...] = mod.ln.scale[...].at[np.array([3, 17])].set(30.0)
  np.testing.assert_allclose(r(x), m(x), rtol=1e-5, atol=1e-5)
  stats = aq.calibrate(m, None, cal, progress=False)
  rstats = aq.calibrate(r, None, cal, progress=False)
  assert set(stats) == {"kv_einsum", "o"} and not any(s.reason for s in stats.values())
  for p in stats:
    np.testing.assert_allclose(stats[p].absmax, rstats[p].absmax, rtol=1e-6)
  y_float = m(x)
  q, report = aq.quantize_model_with_report(m, stats, aq.QuantConfig(alpha=0.5, rotate=False), copy=True, backend="xla")
  rq = aq.quantize_model(r, rstats, aq.QuantConfig(alpha=0.5, rotate=False), copy=True, backend="xla")
  assert all(r_.quantized for r_ in report.values()) and report["kv_einsum"].smoothing == "folded"
  assert tm.int8_matmuls(lambda v: q(v), x) == 2
  np.testing.assert_allclose(q(x), rq(x), rtol=1e-5, atol=1e-6)
  assert _rel(q(x), y_float) < 0.05


def test_weight_on_the_left_is_no_dense_producer():
  """dot_general(W, x) with W (K, N): its output is (N, M), so what reads it contracts
  over x's rows, not W's output columns -- 1/s cannot fold into W (it stays a run-time
  vector), and the quantized model stays right."""
  class Chain(nn.Module):
    @nn.compact
    def __call__(self, x):  # x (M, K)
      w1 = self.param("w1", init, (D, D))  # (K, N)
      y = jax.lax.dot_general(w1, x, (((0,), (1,)), ((), ())))  # (N, M)
      return y @ self.param("w2", init, (x.shape[0], D))  # contracts M
  rng = np.random.default_rng(0)
  cal = [jnp.asarray(rng.standard_normal((16, D)), jnp.float32) for _ in range(3)]
  m = Chain()
  params = m.init(jax.random.key(0), cal[0])
  stats = aq.calibrate(m, params, cal, progress=False)
  assert stats["w2"].producer_kind == "op" and not stats["w2"].foldable
  q, report = aq.quantize_params_with_report(params, stats, aq.QuantConfig(alpha=0.5, rotate=False))
  assert report["w2"].smoothing == "runtime"
  assert _rel(aq.quantized_apply(m, backend="xla")(q, cal[0]), m.apply(params, cal[0])) < 0.05
