"""Issue 12: inputs that used to give silent wrong answers. Each either gives the right
numbers or raises the library's named error."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import actquant_jax as aq
import cpu_kernels
from actquant_jax import ops
from pallas_kernels import reference as ref
from tests.kernel_utils import pairwise

CPU_NATIVE = pytest.mark.skipif(not cpu_kernels.available(), reason="no native CPU GEMM here")
BACKENDS = [pytest.param("xla", id="xla"), pytest.param("cpu", id="cpu", marks=CPU_NATIVE),
            pytest.param("interpret", id="triton-interpret")]


def run(x, qk, bias=None, *, backend):
  if backend == "interpret":
    return aq.w8a8_dot(x, qk, bias, interpret=True)
  return jax.jit(functools.partial(aq.w8a8_dot, backend=backend))(x, qk, bias)


def np_epilogue(xq, wq, sx, sw):
  acc = np.asarray(xq, np.int64) @ np.asarray(wq, np.int64).T  # exact
  return acc.astype(np.float32) * np.asarray(sw)[None, :] * np.asarray(sx)[:, None]


# -- 1. K beyond the int32 bound (2^31 / 127^2 = 133,144) ----------------------------

@pytest.mark.parametrize("backend", ["xla", "auto"])
def test_k_above_int32_bound_all_ones_is_exact(backend):
  k = 140_000  # before: -126,288 (int32 wrapped)
  qk = aq.quantize_kernel(jnp.ones((k, 3)))
  y = jax.jit(functools.partial(aq.w8a8_dot, backend=backend))(jnp.ones((2, k)), qk)
  np.testing.assert_allclose(np.asarray(y), k, rtol=1e-6)
  xq = np.full((2, k), 127, np.int8)
  sx = np.full(2, np.float32(1 / 127), np.float32)  # the row scale of all-ones rows
  np.testing.assert_array_equal(np.asarray(y), np_epilogue(xq, qk.values, sx, qk.scale))


@pytest.mark.parametrize("k", [ref.K_CHUNK - 1, ref.K_CHUNK + 1, 3 * ref.K_CHUNK + 7])
def test_chunked_accumulator_is_the_exact_sum_rounded_once(k, rng):
  # Extremes (+-127 and -128) everywhere: every chunk's int32 is at its bound.
  xq = rng.choice(np.array([127, -127, -128, 126], np.int8), size=(3, k))
  wq = rng.choice(np.array([127, -128, 1], np.int8), size=(5, k))
  xq[0], wq[0] = -128, -128
  acc = jax.jit(ref.accumulate_exact_ref)(jnp.asarray(xq), jnp.asarray(wq))
  exact = xq.astype(np.int64) @ wq.astype(np.int64).T
  assert exact[0, 0] == k * 128 * 128
  np.testing.assert_array_equal(np.asarray(acc, np.float32), exact.astype(np.float32))  # RNE of the exact sum


def test_k_above_bound_interpret_matches_xla(rng):
  k = ref.K_CHUNK + 100
  x = jnp.asarray(rng.standard_normal((2, k)), jnp.float32)
  qk = aq.quantize_kernel(jnp.asarray(rng.standard_normal((k, 16)), jnp.float32))
  np.testing.assert_array_equal(np.asarray(run(x, qk, backend="interpret")), np.asarray(run(x, qk, backend="xla")))


def test_k_beyond_max_k_is_a_named_error():
  # (a problem statement: no array of that size is built)
  from actquant_jax import backends
  with pytest.raises(aq.BackendUnavailableError, match="exact"):
    backends.choose("xla", backends.problem_for(k=ref.MAX_K + 1))
  with pytest.raises(aq.BackendUnavailableError, match="exact"):
    backends.choose("auto", backends.problem_for(k=ref.MAX_K + 1))


# -- 2. NaN / Inf in a token --------------------------------------------------------

@pytest.mark.parametrize("backend,act_scale,smooth", [
    pytest.param(*case[:2], case[2], id=f"{case[0]}-{'static' if case[1] else 'dynamic'}-{'smoothed' if case[2] else 'plain'}",
                 marks=CPU_NATIVE if case[0] == "cpu" else ())
    for case in pairwise(["xla", "cpu", "interpret"], [None, 0.05], [False, True])])
def test_nonfinite_token_gives_nonfinite_row(backend, act_scale, smooth, rng):
  k, n = 64, 24
  x = rng.standard_normal((5, k)).astype(np.float32)
  clean = x.copy()
  x[1, 3] = np.nan
  x[3, 60] = np.inf
  x[4, 0] = -np.inf
  inv = jnp.asarray(rng.uniform(0.5, 2, k), jnp.float32) if smooth else None
  qk = aq.quantize_kernel(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), act_scale=act_scale,
                          inv_smooth=inv)
  b = jnp.asarray(rng.standard_normal(n), jnp.float32)
  y = np.asarray(run(jnp.asarray(x), qk, b, backend=backend))
  assert not np.isfinite(y[[1, 3, 4]]).any()  # before (int8): finite rows, NaN cast to 0
  y_clean = np.asarray(run(jnp.asarray(clean), qk, b, backend=backend))
  np.testing.assert_array_equal(y[[0, 2]], y_clean[[0, 2]])  # the other tokens are untouched


@pytest.mark.parametrize("backend", ["xla", pytest.param("cpu", marks=CPU_NATIVE)])
@pytest.mark.parametrize("act_scale", [None, 0.05], ids=["dynamic", "static"])
def test_nonfinite_token_at_any_column_of_a_large_input(act_scale, backend):
  # XLA CPU's fused (YNNPACK) float max drops NaN wherever it sits in the row: the scale
  # must not depend on it (reference.nonfinite_probe). 256 rows: the native GEMM's packed
  # path, which flags marked rows (reference.NONFINITE_MARK) while it sums them.
  qk = aq.quantize_kernel(jnp.ones((1024, 64)), act_scale=act_scale, inv_smooth=jnp.full(1024, 0.5))
  f = jax.jit(functools.partial(aq.w8a8_dot, backend=backend))
  for col in (0, 17, 500, 1023):
    x = np.ones((256, 1024), np.float32)
    x[3, col], x[5, col], x[9, col] = np.nan, np.inf, -np.inf
    y = np.asarray(f(jnp.asarray(x), qk))
    assert not np.isfinite(y[[3, 5, 9]]).any() and np.isfinite(np.delete(y, [3, 5, 9], axis=0)).all()


@pytest.mark.parametrize("backend", ["xla", "auto"])
def test_nonfinite_token_in_a_later_k_chunk(backend):
  # K above K_CHUNK (the accumulator summed over chunks), a NaN in the second chunk only.
  k = ref.K_CHUNK + 300
  qk = aq.quantize_kernel(jnp.ones((k, 8)), act_scale=0.05)
  x = np.ones((3, k), np.float32)
  x[1, ref.K_CHUNK + 7] = np.nan
  y = np.asarray(jax.jit(functools.partial(aq.w8a8_dot, backend=backend))(jnp.asarray(x), qk))
  assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()


@pytest.mark.parametrize("act_scale", [None, 0.05], ids=["dynamic", "static"])
def test_nonfinite_token_quantize_rows_kernel_matches_reference(act_scale, rng):
  from pallas_kernels import quantize_rows
  x = rng.standard_normal((6, 300)).astype(np.float32)
  x[2, 7], x[5, 299] = np.nan, -np.inf
  inv = jnp.asarray(rng.uniform(0.5, 2, 300), jnp.float32)
  got_q, got_s = quantize_rows(jnp.asarray(x), inv, scale=act_scale, interpret=True,
                               blocks=__import__("pallas_kernels").QuantizeBlocks(block_m=4, block_k=128))
  want_q, want_s = ref.quantize_rows_ref(jnp.asarray(x), inv, scale=act_scale)
  np.testing.assert_array_equal(np.asarray(got_s), np.asarray(want_s))
  assert np.isnan(np.asarray(got_s)[[2, 5]]).all()
  ok = [0, 1, 3, 4]
  np.testing.assert_array_equal(np.asarray(got_q)[ok], np.asarray(want_q)[ok])


# -- 3. Overflow near the float max --------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_activation_times_smoothing_stays_finite(backend, rng):
  # |x| * inv_smooth = 6e38 overflows f32 (before: Inf scale -> NaN output); the float
  # model x @ (diag(inv) W) is finite.
  k, n = 32, 8
  x = np.ones((3, k), np.float32)
  x[:, 0] = 3e38
  x[1, 5] = -3e38
  inv = np.full(k, 2.0, np.float32)
  w = rng.standard_normal((k, n)).astype(np.float32) * 1e-30
  qk = aq.quantize_kernel(jnp.asarray(w), inv_smooth=jnp.asarray(inv))
  y = np.asarray(run(jnp.asarray(x), qk, backend=backend), np.float64)
  want = x.astype(np.float64) @ np.asarray(qk.dequantize(), np.float64)
  assert np.isfinite(want).all() and np.isfinite(y).all()
  np.testing.assert_allclose(y, want, rtol=0.05, atol=1e-3 * np.abs(want).max())


def test_scale_whose_reciprocal_would_flush_is_nan_not_zero():
  # sx > 2^126: 1/sx is subnormal (flushed to 0), which would quantize the row to zeros.
  x = jnp.full((1, 4), 3e38, jnp.float32)
  qk = aq.quantize_kernel(jnp.ones((4, 2)), inv_smooth=jnp.full(4, 1e4, jnp.float32))
  assert np.isnan(np.asarray(aq.w8a8_dot(x, qk, backend="xla"))).all()


# -- 9. clear errors -----------------------------------------------------------------

def test_list_bias_names_the_argument():
  qk = aq.quantize_kernel(jnp.ones((8, 4)))
  with pytest.raises(aq.QuantizationTypeError, match=r"layer7: bias .* list: pass jnp.asarray"):
    aq.w8a8_dot(jnp.ones((2, 8)), qk, [0.0, 1.0, 2.0, 3.0], name="layer7")
  with pytest.raises(aq.QuantizationTypeError, match="QuantizedLinear: bias"):
    aq.QuantizedLinear(8, 4, kernel=jnp.ones((8, 4)), bias=[0.0, 1.0, 2.0, 3.0])


def test_kernel_package_errors_are_named_and_keep_their_builtin(monkeypatch):
  # pallas_kernels / cpu_kernels raise aq's named errors (defined in pallas_kernels.errors,
  # the same classes), each still the builtin it replaced. The checks run before any kernel.
  import pallas_kernels as pk
  from pallas_kernels import errors as kernel_errors
  assert aq.KernelArgumentError is kernel_errors.KernelArgumentError
  assert aq.ActquantError is kernel_errors.ActquantError
  xq, wq = jnp.zeros((2, 32), jnp.int8), jnp.zeros((4, 16), jnp.int8)
  with pytest.raises(aq.KernelArgumentError, match=r"int8_matmul: contraction mismatch.*\(N, K\)") as e:
    pk.int8_matmul(xq, wq, interpret=True)
  assert isinstance(e.value, ValueError) and isinstance(e.value, aq.ActquantError)
  with pytest.raises(aq.KernelTypeError, match="quantize_rows: x must be floating point.*astype") as e:
    pk.quantize_rows(jnp.ones((2, 3), jnp.int32), interpret=True)
  assert isinstance(e.value, TypeError) and isinstance(e.value, ValueError)
  with pytest.raises(aq.BackendError, match="backend must be 'triton' or 'mosaic'"):
    pk.int8_matmul(xq, xq, backend="cuda", interpret=True)
  with pytest.raises(aq.KernelArgumentError, match=r"s8_gemm: expected xq \(M, K\)"):
    cpu_kernels.s8_gemm(xq, wq)
  monkeypatch.setattr(cpu_kernels, "_load", lambda: (False, "no VNNI (test)"))
  with pytest.raises(aq.BackendUnavailableError, match="s8_gemm is not available here: no VNNI") as e:
    cpu_kernels.s8_gemm(xq, xq)
  assert isinstance(e.value, RuntimeError)


@pytest.mark.parametrize("act_scale", [None, 0.05], ids=["dynamic", "static"])
def test_row_parallel_sharded_dot_beyond_k_chunk_and_with_nan(act_scale, rng):
  # The K-sharded path psums the exact accumulator's halves (an int32 psum could wrap)
  # and the NaN probe: one device, one K shard, against w8a8_dot.
  from jax.sharding import Mesh
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
  k = ref.K_CHUNK + 50
  x = np.ones((3, k), np.float32)
  x[1, 7] = np.nan
  qk = aq.quantize_kernel(jnp.ones((k, 4)), act_scale=act_scale)
  y = np.asarray(aq.sharded_w8a8_dot(jnp.asarray(x), qk, mesh=mesh, k_axis="model", backend="xla"))
  want = np.asarray(aq.w8a8_dot(jnp.asarray(x), qk, backend="xla"))
  np.testing.assert_array_equal(np.isfinite(y), np.isfinite(want))
  assert not np.isfinite(y[1]).any()
  np.testing.assert_allclose(y[[0, 2]], want[[0, 2]], rtol=1e-6)
  if act_scale is None:
    np.testing.assert_allclose(y[[0, 2]], k, rtol=1e-6)  # all ones: exact K
