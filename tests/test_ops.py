"""w8a8_dot (XLA path) against an independent numpy reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import actquant_jax as aq
from actquant_jax import ops


def np_quantize_rows(x, inv_smooth=None, static_scale=None, qmax=127.0):
  # reference.py's definition, written again in numpy: sx = max|x| * (|inv| * f32(1/qmax))
  # (static: at least the static scale),
  # xq = rint(clip(x * (inv * (1/sx)))).
  x = x.astype(np.float32)
  inv = np.ones(x.shape[1], np.float32) if inv_smooth is None else inv_smooth.astype(np.float32)
  c = np.abs(inv) * np.float32(1 / qmax) if inv_smooth is not None else np.float32(1 / qmax)
  amax = (np.abs(x) * c).max(axis=1)
  if static_scale is None:
    sx = np.where(amax > 0, amax, np.float32(1)).astype(np.float32)
  else:  # static: that scale, a row beyond it its own
    sx = np.maximum(np.float32(static_scale), amax).astype(np.float32)
  f = (np.float32(1) / sx)[:, None] if inv_smooth is None else inv[None, :] * (np.float32(1) / sx)[:, None]
  q = np.clip(x * f, -qmax, qmax)
  return np.rint(q).astype(np.int8), sx  # np.rint rounds half to even


def np_w8a8(x2d, qk, bias=None):
  xq, sx = np_quantize_rows(x2d, None if qk.inv_smooth is None else np.asarray(qk.inv_smooth),
                            None if qk.act_scale is None else np.float32(qk.act_scale))
  acc = xq.astype(np.int64) @ np.asarray(qk.values).astype(np.int64).T
  y = acc.astype(np.float32) * np.asarray(qk.scale)[None, :] * sx[:, None]
  if bias is not None:
    y = y + np.asarray(bias, np.float32)
  return xq, sx, acc, y


@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("smooth", [False, True])
def test_int8_matches_numpy(mode, smooth, rng):
  m, k, n = 37, 96, 40
  x = rng.standard_normal((m, k)).astype(np.float32) * 3
  w = rng.standard_normal((k, n)).astype(np.float32)
  b = rng.standard_normal(n).astype(np.float32)
  inv_s = rng.uniform(0.2, 5.0, k).astype(np.float32) if smooth else None
  qk = aq.quantize_kernel(jnp.asarray(w), act_scale=0.05 if mode == "static" else None, inv_smooth=inv_s)
  xq_np, sx_np, acc_np, y_np = np_w8a8(x, qk, b)

  xq, sx = aq.quantize_activations(jnp.asarray(x), qk)
  np.testing.assert_array_equal(np.asarray(xq), xq_np)
  np.testing.assert_array_equal(np.asarray(sx), sx_np)
  acc = ops.choose_kernel(qk, backend="xla").accumulate(xq, qk.values)[0]
  np.testing.assert_array_equal(np.asarray(acc), acc_np)
  y = jax.jit(aq.w8a8_dot)(jnp.asarray(x), qk, jnp.asarray(b))
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y), y_np, rtol=2e-6, atol=1e-5)


def test_int32_accumulation_bit_exact_k4096_extremes(rng):
  # Values at +-127 over K = 4096: |acc| up to 4096 * 127^2 = 66M, exact in int32 only.
  m, k, n = 16, 4096, 64
  xq = rng.choice(np.array([-127, 127, 126, -1, 0], np.int8), size=(m, k))
  xq[0] = 127
  wq = rng.choice(np.array([-127, 127, 5], np.int8), size=(n, k))
  wq[0] = 127
  sx = rng.uniform(0.01, 1, m).astype(np.float32)
  sw = rng.uniform(0.01, 1, n).astype(np.float32)
  acc_np = xq.astype(np.int64) @ wq.astype(np.int64).T
  assert acc_np[0, 0] == k * 127 * 127
  import cpu_kernels
  for backend in ("xla", "cpu") if cpu_kernels.available() else ("xla",):
    kernel = ops.choose_kernel(aq.QuantizedKernel(jnp.asarray(wq), jnp.asarray(sw)), backend=backend)
    acc = jax.jit(lambda a, b: kernel.accumulate(a, b)[0])(jnp.asarray(xq), jnp.asarray(wq))
    np.testing.assert_array_equal(np.asarray(acc), acc_np)
  # And end to end through w8a8_dot: rows whose absmax is 127 * s quantize back to xq.
  x = xq.astype(np.float32) * sx[:, None]
  x[:, 0] = 127 * sx  # pin each row's absmax so sx is reproduced exactly
  xq[:, 0] = 127
  qk = aq.QuantizedKernel(jnp.asarray(wq), jnp.asarray(sw))
  y = jax.jit(aq.w8a8_dot)(jnp.asarray(x), qk)
  _, sx_np, acc_np, y_np = np_w8a8(x, qk)
  np.testing.assert_array_equal(acc_np, xq.astype(np.int64) @ wq.astype(np.int64).T)
  np.testing.assert_allclose(np.asarray(y), y_np, rtol=2e-6)


@pytest.mark.parametrize("lead", [(), (3,), (2, 5), (2, 1, 3)])
def test_batch_dims(lead, rng):
  k, n = 24, 10
  x = rng.standard_normal((*lead, k)).astype(np.float32)
  w = rng.standard_normal((k, n)).astype(np.float32)
  qk = aq.quantize_kernel(jnp.asarray(w))
  y = aq.w8a8_dot(jnp.asarray(x), qk)
  assert y.shape == (*lead, n)
  _, _, _, y_np = np_w8a8(x.reshape(-1, k), qk)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, n), y_np, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("act_scale", [None, 0.02])
def test_fp8(act_scale, rng):
  m, k, n = 20, 64, 24
  x = rng.standard_normal((m, k)).astype(np.float32)
  w = rng.standard_normal((k, n)).astype(np.float32)
  qk = aq.quantize_kernel(jnp.asarray(w), "float8_e4m3fn", act_scale=act_scale)
  assert qk.values.dtype == jnp.float8_e4m3fn
  y = jax.jit(functools.partial(aq.w8a8_dot, out_dtype=jnp.bfloat16))(jnp.asarray(x), qk)
  assert y.dtype == jnp.bfloat16
  # numpy reference on the exactly-representable fp8 values
  x32 = x if act_scale is None else x
  sx = (np.abs(x32).max(1) * np.float32(1 / 448)).astype(np.float32)
  sx = sx if act_scale is None else np.maximum(np.float32(act_scale), sx)
  xq = jnp.asarray(np.clip(x32 * (np.float32(1) / sx)[:, None], -448, 448)).astype(jnp.float8_e4m3fn)
  acc = np.asarray(xq.astype(jnp.float32), np.float64) @ np.asarray(qk.values.astype(jnp.float32), np.float64).T
  y_np = (acc.astype(np.float32) * sx[:, None] * np.asarray(qk.scale)[None]).astype(np.float32)
  np.testing.assert_allclose(np.asarray(y, np.float32), y_np, rtol=1e-2, atol=1e-2)
  # and close to the float product
  rel = np.linalg.norm(np.asarray(y, np.float32) - x @ w) / np.linalg.norm(x @ w)
  assert rel < 0.06


def test_accuracy_vs_float(rng):
  x = rng.standard_normal((64, 256)).astype(np.float32)
  w = rng.standard_normal((256, 128)).astype(np.float32) / 16
  y = aq.w8a8_dot(jnp.asarray(x), aq.quantize_kernel(jnp.asarray(w)))
  rel = np.linalg.norm(np.asarray(y) - x @ w) / np.linalg.norm(x @ w)
  assert rel < 0.02


def test_zero_and_bf16_inputs():
  qk = aq.quantize_kernel(jnp.ones((8, 4)))
  y = aq.w8a8_dot(jnp.zeros((3, 8), jnp.bfloat16), qk, jnp.arange(4.0))
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.tile(np.arange(4.0), (3, 1)))


def test_bad_inputs():
  qk = aq.quantize_kernel(jnp.ones((8, 4)))
  with pytest.raises(ValueError, match="layer3: input of shape \\(2, 7\\).*expected last dim 8"):
    aq.w8a8_dot(jnp.ones((2, 7)), qk, name="layer3")
  with pytest.raises(TypeError, match="floating point"):
    aq.w8a8_dot(jnp.ones((2, 8), jnp.int32), qk)
  with pytest.raises(ValueError, match="bias must have shape \\(4,\\)"):
    aq.w8a8_dot(jnp.ones((2, 8)), qk, jnp.ones(5))
  with pytest.raises(TypeError, match="expected a QuantizedKernel"):
    aq.w8a8_dot(jnp.ones((2, 8)), jnp.ones((8, 4)))
  with pytest.raises(ValueError, match="backend"):
    aq.w8a8_dot(jnp.ones((2, 8)), qk, backend="cuda")
  with pytest.raises(ValueError, match="interpret"):
    aq.w8a8_dot(jnp.ones((2, 8)), qk, backend="xla", interpret=True)


def _runs_native_gemm(qtype: str, k: int) -> bool:
  qk = aq.quantize_kernel(jnp.ones((k, 8)), qtype)
  return "actquant_s8_gemm" in str(jax.jit(aq.w8a8_dot).lower(jnp.ones((2, k)), qk).as_text())


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU rule of backend='auto'")
def test_auto_backend_on_cpu_runs_the_native_gemm_where_it_can():
  # What auto lowers to, not the rule recomputed: the native kernel's custom call is in
  # the module for int8 with K <= MAX_K, and absent for fp8 and beyond MAX_K.
  import cpu_kernels
  assert _runs_native_gemm("int8", 256) == cpu_kernels.available()
  assert not _runs_native_gemm("float8_e4m3fn", 256)
  assert not _runs_native_gemm("int8", cpu_kernels.MAX_K + 1)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU quantize pass")
@pytest.mark.parametrize("backend", ["auto", "xla", "cpu"])
def test_int8_on_cpu_quantizes_in_one_native_pass(backend):
  # int8, dynamic and static: cpu_kernels.quantize_rows (its numbers:
  # test_cpu_paths_are_bit_identical, test_cpu_kernels); fp8: XLA. backend='xla': XLA only.
  import cpu_kernels
  if not cpu_kernels.available():
    pytest.skip(cpu_kernels.unavailable_reason())
  def native(qtype="int8", act_scale=None):
    qk = aq.quantize_kernel(jnp.ones((64, 8)), qtype, act_scale=act_scale, inv_smooth=jnp.full(64, 0.5))
    f = functools.partial(aq.w8a8_dot, backend=backend)
    return "actquant_quantize_rows" in str(jax.jit(f).lower(jnp.ones((300, 64)), qk).as_text())
  assert native() == native(act_scale=0.05) == (backend != "xla")
  if backend != "cpu":
    assert not native("float8_e4m3fn")


def test_backend_errors_name_the_fix():
  with pytest.raises(aq.BackendError, match="int8 kernel"):
    ops.choose_kernel(aq.quantize_kernel(jnp.ones((8, 4)), "float8_e4m3fn"), backend="cpu")
  with pytest.raises(aq.BackendError, match="interpret"):
    ops.choose_kernel(aq.quantize_kernel(jnp.ones((8, 4))), backend="cpu", interpret=True)
  assert ops.choose_kernel(aq.quantize_kernel(jnp.ones((8, 4))), interpret=True).backend == "triton"


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the error is for machines without a GPU")
@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_pallas_backend_without_gpu_says_interpret(backend):
  # Before: Pallas's own "Only interpret mode is supported on CPU backend".
  qk = aq.quantize_kernel(jnp.ones((32, 16)))
  with pytest.raises(aq.BackendUnavailableError, match="interpret=True"):
    aq.w8a8_dot(jnp.ones((2, 32)), qk, backend=backend)


@pytest.mark.parametrize("qtype", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("act_scale,smooth", [(None, False), (None, True), (0.05, True)])
def test_pallas_interpret_matches_xla_path(qtype, act_scale, smooth, rng):
  x = rng.standard_normal((3, 11, 96)).astype(np.float32)
  w = rng.standard_normal((96, 40)).astype(np.float32)
  b = jnp.asarray(rng.standard_normal(40), jnp.float32)
  inv_s = jnp.asarray(rng.uniform(0.2, 3, 96), jnp.float32) if smooth else None
  qk = aq.quantize_kernel(jnp.asarray(w), qtype, act_scale=act_scale, inv_smooth=inv_s)
  y_xla = aq.w8a8_dot(jnp.asarray(x), qk, b, backend="xla")
  y_pl = aq.w8a8_dot(jnp.asarray(x), qk, b, interpret=True)
  assert y_pl.shape == y_xla.shape == (3, 11, 40)
  np.testing.assert_allclose(np.asarray(y_pl), np.asarray(y_xla), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["xla", "cpu"])
@pytest.mark.parametrize("m,n", [(1, 48), (300, 2048)], ids=["one-row", "many-rows"])
@pytest.mark.parametrize("act_scale", [None, 0.04])
def test_cpu_paths_are_bit_identical(backend, m, n, act_scale, rng):
  # XLA path: M == 1 is padded to two rows (ops._xla_w8a8). Native path: cpu_kernels.
  # Both give exactly the spec's numbers (the numpy oracle, not reference.py: the XLA path
  # calls reference.py itself); the native kernel also the jitted reference's, FMA and all.
  import cpu_kernels
  if backend == "cpu" and not cpu_kernels.available():
    pytest.skip(cpu_kernels.unavailable_reason())
  from pallas_kernels import reference as ref
  from tests import numpy_oracle as oracle
  k = 64
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
  qk = aq.quantize_kernel(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), act_scale=act_scale,
                          inv_smooth=jnp.asarray(rng.uniform(0.5, 2, k), jnp.float32))
  b = jnp.asarray(rng.standard_normal(n), jnp.float32)
  y = np.asarray(jax.jit(functools.partial(aq.w8a8_dot, backend=backend))(x, qk, b))
  o = oracle.w8a8(np.asarray(x), qk.values, qk.scale, act_scale=act_scale, inv_smooth=np.asarray(qk.inv_smooth),
                  bias=np.asarray(b))
  # Each element is the two-rounding epilogue or its FMA contraction (u * sx + b rounded
  # once), the only freedom the compiler has; no tolerance.
  same = (y == o["y"]) | (y == o["y_fma"])
  assert same.all(), (y[~same][:4], o["y"][~same][:4])
  if backend == "cpu":
    @jax.jit  # jitted like w8a8_dot, so both epilogues get the same FMA contraction
    def reference(x, qk, b):
      xq, sx = ref.quantize_rows_ref(x, qk.inv_smooth, scale=qk.act_scale)
      return ref.scaled_matmul_ref(xq, qk.values, sx, qk.scale, b, jnp.float32)
    np.testing.assert_array_equal(y, np.asarray(reference(x, qk, b)))


def test_negative_inv_smooth_absmax(rng):
  # The XLA path takes the row absmax as max(|x| * |inv|): equal to |x * inv| for any sign.
  k = 48
  x = rng.standard_normal((9, k)).astype(np.float32)
  inv = (rng.uniform(0.5, 2, k) * rng.choice([-1, 1], k)).astype(np.float32)
  qk = aq.quantize_kernel(jnp.asarray(rng.standard_normal((k, 16)), jnp.float32), inv_smooth=inv)
  xq, sx = aq.quantize_activations(jnp.asarray(x), qk)
  xq_np, sx_np = np_quantize_rows(x, inv)
  np.testing.assert_array_equal(np.asarray(xq), xq_np)
  np.testing.assert_array_equal(np.asarray(sx), sx_np)
