import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import actquant_jax as aq
import cpu_kernels
from tests import toy_models as tm
from tests.kernel_utils import count_quantize_passes


@pytest.fixture(scope="module")
def setup():
  m = tm.TinyGPT()
  cal = tm.batches(2)
  params = tm.with_outlier_channels(m.init(jax.random.key(0), cal[0]), tm.GPT_READERS)
  return m, params, cal, aq.calibrate(m, params, cal, progress=False)


def test_quantized_apply_routes_every_quantized_dense(setup):
  m, params, cal, stats = setup
  qparams = aq.quantize_params(params, stats, aq.QuantConfig(alpha=0.5, rules=(aq.LayerRule("head", skip=True),), rotate=False))
  x = tm.batches(1, seed=2)[0]
  for backend in ("xla", "auto"):
    f = aq.quantized_apply(m, backend=backend)
    assert tm.int8_matmuls(f, qparams, x) == 12  # every Dense but the float-kept head
  assert tm.int8_matmuls(aq.quantized_apply(m), params, x) == 0  # float params: the model's own math
  # Check one layer by hand: block_1/fc2's output equals w8a8_dot on its input.
  f = aq.quantized_apply(m, backend="xla")
  y = f(qparams, x)
  fc2_in, fc2_out = aq.quantized_apply(m, backend="xla", method=_fc2_in_out)(qparams, x)
  node = qparams["params"]["block_1"]["fc2"]
  expect = aq.w8a8_dot(fc2_in, node["kernel"], node["bias"], backend="xla")
  np.testing.assert_allclose(np.asarray(fc2_out), np.asarray(expect), rtol=1e-6, atol=1e-6)
  # jit gives the same numbers
  np.testing.assert_allclose(np.asarray(jax.jit(f)(qparams, x)), np.asarray(y), rtol=1e-6, atol=1e-6)


def _fc2_in_out(mod, v):
  captured = []
  def grab(next_fun, args, kwargs, ctx):
    out = next_fun(*args, **kwargs)
    if ctx.method_name == "__call__" and "/".join(ctx.module.path) == "block_1/fc2":
      captured.extend([args[0], out])
    return out
  with nn.intercept_methods(grab):
    mod(v)
  return tuple(captured)


def test_float_params_run_unchanged(setup):
  m, params, cal, _ = setup
  x = cal[0]
  np.testing.assert_array_equal(np.asarray(aq.quantized_apply(m)(params, x)), np.asarray(m.apply(params, x)))


def test_interpret_kernels_match_xla_path(setup):
  m, params, cal, stats = setup
  qparams = aq.quantize_params(params, stats, aq.QuantConfig(act_mode="static", alpha=0.5, rotate=False))
  x = cal[0][:1, :8]
  y_xla = aq.quantized_apply(m, backend="xla")(qparams, x)
  y_pl = aq.quantized_apply(m, interpret=True)(qparams, x)
  np.testing.assert_allclose(np.asarray(y_pl), np.asarray(y_xla), rtol=1e-4, atol=1e-4)


def test_linen_and_nnx_give_the_same_quantized_outputs(setup):
  m, params, cal, stats = setup
  nm = tm.load_linen_into_nnx(tm.NNXTinyGPT(), params)
  x = tm.batches(1, seed=3)[0]
  np.testing.assert_array_equal(np.asarray(nm(x)), np.asarray(m.apply(params, x)))
  nstats = aq.calibrate(nm, None, cal, progress=False)
  for p in stats:
    a, b = stats[p], nstats[p]
    assert (a.group, a.producer, a.producer_kind, a.exclusive) == (b.group, b.producer, b.producer_kind, b.exclusive)
    np.testing.assert_array_equal(np.asarray(a.absmax), np.asarray(b.absmax))
  for cfg in (aq.QuantConfig(act_mode="static", alpha=0.5, rotate=False), aq.QuantConfig(alpha="auto", rotate=False),
              aq.QuantConfig(qtype="float8_e4m3fn", rules=(aq.LayerRule("head", skip=True),), alpha=0.5, rotate=False)):
    yl = jax.jit(aq.quantized_apply(m))(aq.quantize_params(params, stats, cfg), x)
    qn = aq.quantize_model(nm, nstats, cfg, copy=True)
    yn = nnx.jit(lambda mod, v: mod(v))(qn, x)
    np.testing.assert_array_equal(np.asarray(yn), np.asarray(yl))
  # copy=True left the original float model alone
  assert type(nm.block_0.q) is nnx.Linear
  np.testing.assert_array_equal(np.asarray(nm(x)), np.asarray(m.apply(params, x)))


def test_nnx_in_place_and_report(setup):
  m, params, cal, stats = setup
  nm = tm.load_linen_into_nnx(tm.NNXTinyGPT(), params)
  nstats = aq.calibrate(nm, None, cal, progress=False)
  ln_scale_before = np.asarray(nm.block_0.ln_1.scale.get_value())
  out, report = aq.quantize_model_with_report(nm, nstats,
                                              aq.QuantConfig(alpha=0.5, rules=(aq.LayerRule("head", skip=True),), rotate=False))
  assert out is nm
  assert isinstance(nm.block_0.q.kernel.get_value(), aq.QuantizedKernel)
  assert not isinstance(nm.head.kernel.get_value(), aq.QuantizedKernel)  # kept in float by the rule
  assert tm.int8_matmuls(lambda v: nm(v), cal[0]) == 12
  assert not np.allclose(np.asarray(nm.block_0.ln_1.scale.get_value()), ln_scale_before)  # 1/s folded
  assert report["block_0/q"].smoothing == "folded" and not report["head"].quantized


def test_errors():
  with pytest.raises(TypeError, match="linen Module"):
    aq.quantized_apply(tm.NNXTinyGPT())
  with pytest.raises(TypeError, match="nnx Module"):
    aq.quantize_model(tm.TinyGPT(), {}, aq.QuantConfig(alpha=0.5, rotate=False))


def test_layers_smoothed_together_share_one_quantize_pass():
  # Post-LN BERT with runtime smoothing: q/k/v read one LayerNorm output and were smoothed
  # together (one act_group), so one quantize pass serves all three (8 for the model
  # instead of 12), bit-identical to quantizing per layer. Recalibrating does not
  # recompile. A member edited by hand alone gives NaN, never the group's quantization.
  import dataclasses
  m = tm.TinyBERT()
  cal = tm.batches(2)
  params = tm.with_outlier_channels(m.init(jax.random.key(0), cal[0]), tm.BERT_READERS)
  stats = aq.calibrate(m, params, cal, progress=False)
  x = tm.batches(1, seed=3)[0]
  f = aq.quantized_apply(m)
  is_qk = lambda n: isinstance(n, aq.QuantizedKernel)
  for mode in ("dynamic", "static"):
    cfg = aq.QuantConfig(act_mode=mode, alpha=0.5, rotate=False)
    qparams, report = aq.quantize_params_with_report(params, stats, cfg)
    assert {r.smoothing for r in report.values()} == {"runtime"}
    kernel = lambda qp, p: qp["params"][p.split("/")[0]][p.split("/")[1]]["kernel"]
    assert len({kernel(qparams, f"layer_0/{n}").act_group for n in "qkv"}) == 1
    assert kernel(qparams, "layer_0/q").act_group and not kernel(qparams, "layer_0/o").act_group
    unshared = jax.tree.map(lambda q: dataclasses.replace(q, act_group="") if is_qk(q) else q, qparams, is_leaf=is_qk)
    passes = lambda qp: count_quantize_passes(f, qp, x)
    assert (passes(qparams), passes(unshared)) == (8, 12)
    # On the native CPU GEMM the group's three products are one call too (12 GEMMs in 8 calls).
    gemms = lambda qp: (tm.int8_matmuls(f, qp, x), tm.int8_gemm_calls(f, qp, x))
    # (where the native GEMM is the one chosen for these rows: on AMX CPUs XLA's takes M > 2)
    problem = aq.backends.problem_for(k=x.shape[-1], m=x.shape[0] * x.shape[1], act=mode)
    native = aq.backends.choose("auto", problem).backend == "cpu"
    assert native == (cpu_kernels.available() and not aq.backends.cpu_has_amx())
    assert (gemms(qparams), gemms(unshared)) == (((12, 8 if native else 12), (12, 12)))
    jf = jax.jit(f)
    y = np.asarray(jf(qparams, x))
    np.testing.assert_array_equal(y, np.asarray(jax.jit(f)(unshared, x)))

    stats2 = aq.calibrate(m, params, tm.batches(2, seed=7), progress=False)
    compiled = jf._cache_size()
    y2 = jf(aq.quantize_params(params, stats2, cfg), x)
    assert jf._cache_size() == compiled and not np.array_equal(np.asarray(y2), y)  # new values, same program

    k = kernel(qparams, "layer_0/k")
    for edited, finite in [(dataclasses.replace(k, inv_smooth=k.inv_smooth * 2), False),
                           (dataclasses.replace(k, inv_smooth=k.inv_smooth * 2, act_group=""), True)]:
      layer = {**qparams["params"]["layer_0"], "k": {**qparams["params"]["layer_0"]["k"], "kernel": edited}}
      out = np.asarray(jax.jit(f)({"params": {**qparams["params"], "layer_0": layer}}, x))
      assert np.isfinite(out).all() == finite


def test_native_cpu_gemm_matches_xla_path_end_to_end(setup):
  # The whole model on the AVX512-VNNI GEMM equals it on XLA's int8 dot: same int32
  # accumulators; only the f32 epilogue's fusion may differ (FMA contraction).
  import cpu_kernels
  if not cpu_kernels.available():
    pytest.skip(cpu_kernels.unavailable_reason())
  m, params, cal, stats = setup
  x = tm.batches(1, seed=5)[0]
  for cfg in (aq.QuantConfig(alpha=0.5, rotate=False), aq.QuantConfig(act_mode="static", alpha="auto", rotate=False)):
    qparams = aq.quantize_params(params, stats, cfg)
    ys = [jax.jit(aq.quantized_apply(m, backend=b))(qparams, x) for b in ("cpu", "xla")]
    np.testing.assert_allclose(np.asarray(ys[0]), np.asarray(ys[1]), rtol=1e-5, atol=1e-5)
