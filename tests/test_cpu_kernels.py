"""cpu_kernels.s8_gemm (AVX512-VNNI or AVX2) against XLA's int8 dot: bit-exact, ragged
shapes, a layer of a stacked weight read in place; its marked-row flags against
reference.marked_rows_ref; cpu_kernels.quantize_rows against reference.quantize_rows_ref,
bit for bit. The AVX2 paths run on a VNNI CPU too (ACTQUANT_CPU_NO_VNNI, a fresh process)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cpu_kernels
from pallas_kernels import reference as ref
from pallas_kernels.errors import KernelArgumentError, KernelTypeError

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason=f"s8_gemm: {cpu_kernels.unavailable_reason()}")

gemm = jax.jit(cpu_kernels.s8_gemm)
expect = jax.jit(ref.accumulate_ref)


def _ints(rng, shape):
  return jnp.asarray(rng.integers(-127, 128, shape), jnp.int8)


# M: 1..6-row micro-tiles, a second 240-row block, both paths (packed from 48 rows);
# K: under, at and over one 64-byte step, masked tails, 1-3 byte groups; N: ragged
# 4-column tiles, ragged 64-column panels, a second block.
@needs_kernel
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 64, 4), (2, 65, 5), (3, 127, 3), (4, 128, 8), (5, 200, 9),
                                   (6, 63, 2), (7, 130, 13), (241, 300, 70), (17, 384, 1541), (1, 4096, 4096),
                                   (33, 1000, 129), (48, 5, 3), (53, 66, 65), (128, 301, 97),
                                   (300, 130, 200), (487, 1027, 130)])
def test_matches_xla_int8_dot(m, k, n, rng):
  x, w = _ints(rng, (m, k)), _ints(rng, (n, k))
  acc, marked = gemm(x, w)
  np.testing.assert_array_equal(np.asarray(acc), np.asarray(expect(x, w)))
  np.testing.assert_array_equal(np.asarray(marked), np.zeros(m, np.float32))


# Both paths (decode: few rows; packed: many), the mark in a full 64-byte step, in the
# masked tail, first and last byte; N = 0 still flags.
@needs_kernel
@pytest.mark.parametrize("m,k,n", [(5, 130, 9), (300, 130, 70), (200, 1000, 3), (7, 64, 0)])
def test_flags_rows_holding_the_nonfinite_mark(m, k, n, rng):
  x = np.array(_ints(rng, (m, k)))
  marks = {1: 0, 3: k - 1, m - 1: min(70, k - 1)}
  for row, col in marks.items():
    x[row, col] = ref.NONFINITE_MARK
  acc, marked = gemm(jnp.asarray(x), _ints(rng, (n, k)))
  want = np.where(np.isin(np.arange(m), list(marks)), np.nan, 0.0).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(marked), want)
  np.testing.assert_array_equal(np.asarray(marked), np.asarray(ref.marked_rows_ref(jnp.asarray(x))))
  np.testing.assert_array_equal(np.asarray(jax.jit(cpu_kernels.marked_rows)(jnp.asarray(x))), want)


@needs_kernel
@pytest.mark.parametrize("k", [4096, cpu_kernels.MAX_K])
def test_extremes_do_not_overflow(k):
  # The u8 offset (VNNI) makes (x + 128) * w up to 255 * 128 per product; at K = MAX_K the
  # intermediate is within 0.4% of 2^31. AVX2's |w| * (x with w's sign) pairs reach
  # 2 * 128 * 127, just under int16's saturation; a weight of -128 included.
  for xv, wv in [(127, 127), (-127, 127), (127, -127), (-127, -127), (127, -128), (-127, -128)]:
    x, w = jnp.full((3, k), xv, jnp.int8), jnp.full((5, k), wv, jnp.int8)
    got = np.asarray(gemm(x, w)[0])
    assert (got == xv * wv * k).all(), (xv, wv, got[0, 0])


@needs_kernel
def test_empty_and_batched(rng):
  assert gemm(jnp.zeros((0, 8), jnp.int8), jnp.zeros((4, 8), jnp.int8))[0].shape == (0, 4)
  x, w = _ints(rng, (3, 2, 40)), _ints(rng, (6, 40))
  got = jax.vmap(cpu_kernels.s8_gemm, in_axes=(0, None))(x, w)[0]
  np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.vmap(ref.accumulate_ref, in_axes=(0, None))(x, w)))


# A stack of L weights (a scan's): layer l read in place equals the 2-D call on w[l], on
# both paths (few rows, packed), with the layer traced; out of range is an error.
@needs_kernel
@pytest.mark.parametrize("m,k,n", [(1, 100, 36), (2, 64, 5), (130, 70, 33)])
def test_stacked_weight_layer_in_place(m, k, n, rng):
  x, w = _ints(rng, (m, k)), _ints(rng, (3, n, k))
  stacked = jax.jit(cpu_kernels.s8_gemm)
  for layer in range(3):
    got = stacked(x, w, jnp.int32(layer))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(expect(x, w[layer])))
  with pytest.raises(ValueError, match="INVALID_ARGUMENT: actquant s8_gemm: layer out of range"):
    jax.block_until_ready(stacked(x, w, jnp.int32(3)))
  with pytest.raises(KernelArgumentError, match="needs layer="):
    cpu_kernels.s8_gemm(x, w)
  with pytest.raises(KernelTypeError, match="layer must be an integer"):
    cpu_kernels.s8_gemm(x, w, 1.5)
  with pytest.raises(KernelArgumentError, match="layer must be a scalar"):
    cpu_kernels.s8_gemm(x, w, jnp.zeros((2,), jnp.int32))


# One x, several weights in one call: decode rows (their column chunks in one parallel
# loop, ragged N, an empty weight) and prefill rows (one member packed, one not: N*K small),
# flat and stacked; each product is XLA's int8 dot, and the marks are the one x's.
@needs_kernel
@pytest.mark.parametrize("m,ns,k", [(1, (576, 192, 192), 576), (2, (5, 0, 70), 33), (60, (4, 1541), 300),
                                    (241, (3, 130, 64), 129)])
@pytest.mark.parametrize("stacked", [False, True])
def test_group_of_weights_in_one_call(m, ns, k, stacked, rng):
  x = np.array(_ints(rng, (m, k)))
  if m > 1:
    x[m // 2, k // 3] = ref.NONFINITE_MARK  # (a marked row's sums are not defined: its output is NaN)
  x = jnp.asarray(x)
  ws = [_ints(rng, ((3,) if stacked else ()) + (n, k)) for n in ns]
  layer = jnp.int32(2) if stacked else None
  accs, marked = jax.jit(cpu_kernels.s8_gemm_group)(x, ws, layer)
  assert len(accs) == len(ns)
  rows = np.arange(m) != (m // 2 if m > 1 else -1)
  for acc, w in zip(accs, ws):
    np.testing.assert_array_equal(np.asarray(acc)[rows], np.asarray(expect(x, w[2] if stacked else w))[rows])
  np.testing.assert_array_equal(np.asarray(marked), np.asarray(ref.marked_rows_ref(x)))
  with pytest.raises(KernelArgumentError, match="at least one weight"):
    cpu_kernels.s8_gemm_group(x, [])
  with pytest.raises(KernelArgumentError, match="needs layer=|a 2-D one none"):
    cpu_kernels.s8_gemm_group(x, [ws[0], ws[0][0] if stacked else ws[0][None]], layer)


@needs_kernel
@pytest.mark.skipif(cpu_kernels.int8_isa() != "avx512-vnni", reason="AVX2 is already this CPU's path")
def test_avx2_paths_on_a_vnni_cpu():
  # The choice is made as the library loads: a fresh process with ACTQUANT_CPU_NO_VNNI.
  env = dict(os.environ, ACTQUANT_CPU_NO_VNNI="1")
  check = "import cpu_kernels; assert cpu_kernels.int8_isa() == 'avx2', cpu_kernels.int8_isa()"
  r = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", __file__,
                      "-k", "matches or flags or extremes or stacked or quantize or group"], env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0 and " passed" in r.stdout and "failed" not in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


quantize = jax.jit(cpu_kernels.quantize_rows)
quantize_ref = jax.jit(lambda x, inv: ref.quantize_rows_ref(x, inv))


# K: one 16-lane step, masked tails, MiniLM's widths; M: one row, a row block's edge
# (16384 / K rows per block), several blocks. Values spread over 1e-3..1e3 per row, and
# rows whose scale is clamped (all zero, subnormal) or huge.
@needs_kernel
@pytest.mark.parametrize("m,k", [(1, 1), (2, 16), (3, 17), (5, 33), (43, 384), (11, 1536), (40, 1000), (1, 70000)])
@pytest.mark.parametrize("smooth", [False, True])
def test_quantize_rows_matches_reference(m, k, smooth, rng):
  x = rng.standard_normal((m, k)).astype(np.float32) * np.exp(rng.uniform(-7, 7, (m, 1))).astype(np.float32)
  if m >= 3:
    x[1] = 0.0
    x[2] = 1e-40  # subnormal: scale 1
  if m >= 5:
    x[4, k // 2] = 3e38
  inv = jnp.asarray(np.exp(rng.uniform(-3, 3, k)).astype(np.float32)) if smooth else None
  xq, sx = quantize(jnp.asarray(x), inv)
  xq_ref, sx_ref = quantize_ref(jnp.asarray(x), inv)
  np.testing.assert_array_equal(np.asarray(sx), np.asarray(sx_ref))
  np.testing.assert_array_equal(np.asarray(xq), np.asarray(xq_ref))


# Static: the calibrated scale for a row within it (an all-zero row too), the row's own
# beyond it (reference.static_row_scale), on the AVX-512 and AVX2 passes alike; rotated
# rows take the scale after the rotation.
@needs_kernel
@pytest.mark.parametrize("m,k", [(5, 24), (43, 384), (11, 1536)])
def test_quantize_rows_static_scale_matches_reference(m, k, rng):
  from actquant_jax import rotation
  x = rng.standard_normal((m, k)).astype(np.float32) * np.exp(rng.uniform(-3, 3, (m, 1))).astype(np.float32)
  x[1] = 0.0
  inv = jnp.asarray(np.exp(rng.uniform(-1, 1, k)).astype(np.float32))
  amax = np.abs(x * np.asarray(inv)).max(axis=1) / 127
  scale = jnp.float32(np.median(amax))  # about half the rows beyond it
  xq, sx = jax.jit(cpu_kernels.quantize_rows)(jnp.asarray(x), inv, None, scale)
  xq_ref, sx_ref = jax.jit(lambda x, inv, s: ref.quantize_rows_ref(x, inv, scale=s))(jnp.asarray(x), inv, scale)
  np.testing.assert_array_equal(np.asarray(sx), np.asarray(sx_ref))
  np.testing.assert_array_equal(np.asarray(xq), np.asarray(xq_ref))
  assert (np.asarray(sx) == scale).sum() >= m // 3 and (np.asarray(sx) > scale).sum() >= m // 3
  signs, hm, _ = rotation.parts(k)
  xq, sx = jax.jit(cpu_kernels.quantize_rows)(jnp.asarray(x), inv, (jnp.asarray(signs), jnp.asarray(hm)), scale)
  y = (x.astype(np.float64) * np.asarray(inv)) @ rotation.matrix(k)
  want = np.maximum(np.float64(scale), np.abs(y).max(axis=1) / 127)
  np.testing.assert_allclose(np.asarray(sx), want, rtol=1e-5)
  assert np.abs(np.asarray(xq).astype(np.int64) - y / want[:, None]).max() <= 0.5 + 1e-3


# A NaN or Inf anywhere (first lane, masked tail, last element) makes its row's scale NaN
# (as the reference's) and marks the whole row; the other rows are untouched.
@needs_kernel
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantize_rows_signals_nonfinite_rows(bad, rng):
  m, k = 6, 37
  x = rng.standard_normal((m, k)).astype(np.float32)
  for row, col in {0: 0, 2: 33, 5: k - 1}.items():
    x[row, col] = bad
  xq, sx = quantize(jnp.asarray(x), None)
  xq_ref, sx_ref = quantize_ref(jnp.asarray(x), None)
  rows = np.isin(np.arange(m), [0, 2, 5])
  assert np.isnan(np.asarray(sx)[rows]).all() and np.isnan(np.asarray(sx_ref)[rows]).all()
  assert (np.asarray(xq)[rows] == ref.NONFINITE_MARK).all()
  np.testing.assert_array_equal(np.asarray(sx)[~rows], np.asarray(sx_ref)[~rows])
  np.testing.assert_array_equal(np.asarray(xq)[~rows], np.asarray(xq_ref)[~rows])
  np.testing.assert_array_equal(np.asarray(ref.marked_rows_ref(xq)), np.where(rows, np.nan, 0).astype(np.float32))


# The rotation inside the pass against a float64 numpy oracle (x * inv) @ R: K with m = 1
# (pure Sylvester), p = 1 (pure Paley), both, and SmolLM2's 576 (72 x 8) and 1536 (48 x 32);
# several row blocks; a NaN row still signalled. p = 8 with 2+ rows (96, 576): on AVX-512
# CPUs rows are rotated in pairs (RotateTwoRows8), an odd last row alone. Summed in another order than XLA's
# einsum: the scale to f32 rounding, each element within one step of round(y / sx).
@needs_kernel
@pytest.mark.parametrize("m,k", [(1, 2), (3, 12), (2, 64), (5, 96), (1, 576), (37, 576), (37, 1536)])
@pytest.mark.parametrize("smooth", [False, True])
def test_quantize_rows_rotated_matches_a_numpy_oracle(m, k, smooth, rng):
  from actquant_jax import rotation
  x = rng.standard_normal((m, k)).astype(np.float32) * np.exp(rng.uniform(-3, 3, (m, 1))).astype(np.float32)
  x[:, rng.integers(0, k, 2)] *= 100  # outlier channels: spread over all K by R
  inv = np.exp(rng.uniform(-1, 1, k)).astype(np.float32) if smooth else None
  if m >= 3:
    x[1, k // 2] = np.nan
  signs, hm, _ = rotation.parts(k)
  xq, sx = jax.jit(cpu_kernels.quantize_rows)(jnp.asarray(x), None if inv is None else jnp.asarray(inv),
                                              (jnp.asarray(signs), jnp.asarray(hm)))
  xq, sx = np.asarray(xq).astype(np.int64), np.asarray(sx)
  y = (x.astype(np.float64) * (1.0 if inv is None else inv)) @ rotation.matrix(k)
  good = np.isfinite(y).all(axis=1)
  want_sx = np.abs(y[good]).max(axis=1) / 127
  np.testing.assert_allclose(sx[good], want_sx, rtol=1e-5)
  assert np.abs(xq[good] - y[good] / want_sx[:, None]).max() <= 0.5 + 1e-3
  assert np.isnan(sx[~good]).all() and (xq[~good] == ref.NONFINITE_MARK).all()


@needs_kernel
def test_quantize_rows_empty_and_batched(rng):
  xq, sx = quantize(jnp.zeros((0, 8), jnp.float32), None)
  assert xq.shape == (0, 8) and sx.shape == (0,)
  xq, sx = quantize(jnp.zeros((3, 0), jnp.float32), None)
  np.testing.assert_array_equal(np.asarray(sx), np.ones(3, np.float32))
  x = jnp.asarray(rng.standard_normal((3, 4, 40)).astype(np.float32))
  got = jax.vmap(cpu_kernels.quantize_rows)(x)
  want = jax.vmap(lambda v: ref.quantize_rows_ref(v))(x)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_bad_inputs():
  with pytest.raises(ValueError, match="expected xq \\(M, K\\) and wq \\(N, K\\)"):
    cpu_kernels.s8_gemm(jnp.zeros((2, 8), jnp.int8), jnp.zeros((4, 9), jnp.int8))
  with pytest.raises(TypeError, match="int8 operands"):
    cpu_kernels.s8_gemm(jnp.zeros((2, 8), jnp.float32), jnp.zeros((4, 8), jnp.int8))
  with pytest.raises(ValueError, match="marked_rows: expected an int8 \\(M, K\\)"):
    cpu_kernels.marked_rows(jnp.zeros((2, 8), jnp.float32))
  with pytest.raises(ValueError, match="quantize_rows: expected a float32 \\(M, K\\)"):
    cpu_kernels.quantize_rows(jnp.zeros((2, 8), jnp.bfloat16))
  with pytest.raises(ValueError, match="inv_smooth must be float32 \\(8,\\)"):
    cpu_kernels.quantize_rows(jnp.zeros((2, 8), jnp.float32), jnp.ones(9, jnp.float32))
  with pytest.raises(KernelArgumentError, match="rotation must be"):
    cpu_kernels.quantize_rows(jnp.zeros((2, 12), jnp.float32), None, (jnp.ones(12), jnp.ones((5, 5))))
  with pytest.raises(KernelArgumentError, match="rotation must be"):
    cpu_kernels.quantize_rows(jnp.zeros((2, 12), jnp.float32), None, (jnp.ones(12), jnp.ones((4, 4))))  # p = 3
  with pytest.raises(ValueError, match="overflow"):
    cpu_kernels.s8_gemm(jnp.zeros((1, cpu_kernels.MAX_K + 1), jnp.int8), jnp.zeros((1, cpu_kernels.MAX_K + 1), jnp.int8))


def test_without_a_compiler_w8a8_dot_falls_back_to_xla(tmp_path):
  # A machine that cannot build the kernel: available() is False with the reason, and
  # w8a8_dot's "auto" uses XLA's dot.
  import os
  import subprocess
  import sys
  code = ("import jax.numpy as jnp, cpu_kernels, actquant_jax as aq\n"
          "from actquant_jax import ops\n"
          "assert not cpu_kernels.available(), 'built without a compiler?'\n"
          "print(cpu_kernels.unavailable_reason().splitlines()[0])\n"
          "kernel = ops.choose_kernel(aq.quantize_kernel(jnp.ones((8, 3))), m=2)\n"
          "assert (kernel.backend, kernel.quantizer) == ('xla', 'xla'), kernel\n"
          "print(aq.w8a8_dot(jnp.ones((2, 8)), aq.quantize_kernel(jnp.ones((8, 3)))).tolist())\n")
  env = {**os.environ, "CXX": "/bin/false", "ACTQUANT_CACHE_DIR": str(tmp_path), "JAX_PLATFORMS": "cpu",
         "ACTQUANT_IGNORE_PREBUILT": "1"}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "compiling s8_gemm.cc failed" in out.stdout
  assert "[[8.0, 8.0, 8.0], [8.0, 8.0, 8.0]]" in out.stdout


def test_built_at_install_time_needs_no_compiler(tmp_path):
  # `pip install` (make install's editable install too) builds the library with the
  # package: no compiler, no writable cache at run time, and it is the one used.
  import os
  import subprocess
  import sys

  import cpu_kernels
  if cpu_kernels._prebuilt() is None:
    pytest.skip("the package was installed without building cpu_kernels/_s8_gemm (no compiler?)")
  code = ("import warnings; warnings.simplefilter('error')\n"
          "import cpu_kernels\n"
          "assert cpu_kernels.available(), cpu_kernels.unavailable_reason()\n"
          "print(cpu_kernels.library_origin())\n")
  env = {**os.environ, "CXX": "/bin/false", "ACTQUANT_CACHE_DIR": str(tmp_path / "ro"), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  if out.returncode != 0 and "lacks AVX512-VNNI" in out.stderr:
    pytest.skip("the CPU lacks AVX512-VNNI")
  assert out.returncode == 0, out.stderr[-2000:]
  import importlib.metadata
  assert out.stdout.startswith("built at install time"), out.stdout
  assert f"jaxlib {importlib.metadata.version('jaxlib')}" in out.stdout
  assert not (tmp_path / "ro").exists()  # nothing compiled, nothing cached
