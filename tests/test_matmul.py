"""Triton int8/fp8 GEMM: interpret mode vs the reference, and the real CUDA lowering."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.reference import accumulate_ref, quantize_rows_ref
from tests.kernel_utils import lower_for_cuda, pairwise

SMALL_BLOCKS = pk.MatmulBlocks(block_m=16, block_n=32, block_k=32, group_m=2, num_warps=4, num_stages=2)
CONFIGS = [None, SMALL_BLOCKS, pk.MatmulBlocks(block_m=32, block_n=16, block_k=64, group_m=1)]
SHAPES = [(64, 64, 64), (200, 300, 500), (1, 96, 160), (5, 33, 70), (16, 128, 96), (33, 17, 31)]


def _operands(rng, m, n, k, dtype):
  x = jnp.asarray(rng.standard_normal((m, k)) * 2, jnp.float32)
  w = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
  xq, sx = quantize_rows_ref(x, dtype=dtype)
  wq, sw = quantize_rows_ref(w, dtype=dtype)
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
  return xq, wq, sx, sw, bias


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocks", CONFIGS, ids=["default", "small", "tall"])
def test_int8_accumulator_bit_exact(shape, blocks, rng):
  m, n, k = shape
  xq, wq, *_ = _operands(rng, m, n, k, jnp.int8)
  acc = pk.int8_matmul(xq, wq, blocks=blocks, interpret=True)
  assert acc.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(acc), np.asarray(xq, np.int64) @ np.asarray(wq, np.int64).T)


def test_int8_accumulator_extremes_k4096(rng):
  m, n, k = 16, 32, 4096
  xq = jnp.asarray(rng.choice(np.array([-127, 127], np.int8), (m, k)))
  wq = jnp.asarray(rng.choice(np.array([-127, 127], np.int8), (n, k))).at[0].set(xq[0])
  acc = pk.int8_matmul(xq, wq, blocks=pk.DECODE_BLOCKS, interpret=True)
  ref = np.asarray(xq, np.int64) @ np.asarray(wq, np.int64).T
  assert ref[0, 0] == k * 127 * 127
  np.testing.assert_array_equal(np.asarray(acc), ref)


@pytest.mark.parametrize("shape,with_bias,out_dtype", pairwise(SHAPES[:4], [False, True], [jnp.float32, jnp.bfloat16]))
def test_int8_scaled_output(shape, with_bias, out_dtype, rng):
  m, n, k = shape
  xq, wq, sx, sw, bias = _operands(rng, m, n, k, jnp.int8)
  bias = bias if with_bias else None
  y = pk.int8_matmul(xq, wq, sx, sw, bias, out_dtype=out_dtype, blocks=SMALL_BLOCKS, interpret=True)
  ref = pk.int8_matmul_ref(xq, wq, sx, sw, bias, out_dtype=jnp.float32)
  assert y.dtype == out_dtype and y.shape == (m, n)
  # Same int32 accumulator; the f32 epilogue may differ by FMA contraction: <= 2 ulp.
  rtol = 2**-22 if out_dtype == jnp.float32 else 2**-8
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), rtol=rtol, atol=1e-5)


def test_static_per_tensor_is_a_broadcast_scale(rng):
  m, n, k = 24, 40, 64
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
  xq, sx = quantize_rows_ref(x, scale=jnp.float32(0.05))  # every row within it (max |x| ~ 3 < 0.05 * 127)
  wq, sw = quantize_rows_ref(jnp.asarray(rng.standard_normal((n, k)), jnp.float32))
  assert np.all(np.asarray(sx) == np.float32(0.05))
  y = pk.int8_matmul(xq, wq, sx, sw, out_dtype=jnp.float32, blocks=SMALL_BLOCKS, interpret=True)
  ref = pk.int8_matmul_ref(xq, wq, sx, sw, out_dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=2**-22, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocks", CONFIGS[:2], ids=["default", "small"])
def test_fp8(shape, blocks, rng):
  m, n, k = shape
  xq, wq, sx, sw, bias = _operands(rng, m, n, k, jnp.float8_e4m3fn)
  # e4m3 x e4m3 products are exact in f32; only the summation order differs from XLA.
  acc = pk.fp8_matmul(xq, wq, blocks=blocks, interpret=True)
  exact = np.asarray(xq.astype(jnp.float32), np.float64) @ np.asarray(wq.astype(jnp.float32), np.float64).T
  np.testing.assert_allclose(np.asarray(acc), exact, rtol=1e-6, atol=1e-6 * np.abs(exact).max())
  y = pk.fp8_matmul(xq, wq, sx, sw, bias, out_dtype=jnp.float32, blocks=blocks, interpret=True)
  ref = pk.fp8_matmul_ref(xq, wq, sx, sw, bias, out_dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_bad_inputs(rng):
  xq, wq, sx, sw, bias = _operands(rng, 8, 16, 32, jnp.int8)
  with pytest.raises(ValueError, match="contraction mismatch"):
    pk.int8_matmul(xq, wq[:, :16], interpret=True)
  with pytest.raises(TypeError, match="must be int8"):
    pk.int8_matmul(xq.astype(jnp.float32), wq, interpret=True)
  with pytest.raises(TypeError, match="must be float8_e4m3fn"):
    pk.fp8_matmul(xq, wq, interpret=True)
  with pytest.raises(ValueError, match=r"sx must be \(8,\)"):
    pk.int8_matmul(xq, wq, sx[:4], sw, interpret=True)
  with pytest.raises(ValueError, match="sx and sw: pass both"):
    pk.int8_matmul(xq, wq, sx, None, interpret=True)
  with pytest.raises(ValueError, match=r"bias must be \(16,\)"):
    pk.int8_matmul(xq, wq, sx, sw, bias[:3], interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    pk.int8_matmul(xq, wq, blocks=pk.MatmulBlocks(block_m=24), interpret=True)
  with pytest.raises(ValueError, match="block_k must be >= 32"):
    pk.int8_matmul(xq, wq, blocks=pk.MatmulBlocks(block_k=16), interpret=True)
  with pytest.raises(ValueError, match="overflow int32"):
    pk.int8_matmul(jnp.zeros((1, 2**18), jnp.int8), jnp.zeros((1, 2**18), jnp.int8), interpret=True)


def test_default_blocks_by_shape_class():
  assert pk.default_blocks(1, 4096, 4096) == pk.DECODE_BLOCKS
  assert pk.default_blocks(128, 4096, 4096) == pk.MEDIUM_BLOCKS
  assert pk.default_blocks(8192, 4096, 4096) == pk.PREFILL_BLOCKS


# --- the real Triton lowering for CUDA, on this CPU-only machine ---

def _triton_ir(capfd, f, *args):
  hlo = lower_for_cuda(f, *args)
  assert "__gpu$xla.gpu.triton" in hlo
  return capfd.readouterr().out


@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (200, 300, 500), (4096, 4096, 4096)])
def test_int8_lowers_to_i8_tensor_core_dot(m, n, k, capfd):
  xq, wq = jnp.zeros((m, k), jnp.int8), jnp.zeros((n, k), jnp.int8)
  sx, sw, b = jnp.zeros((m,), jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32)
  ir = _triton_ir(capfd, functools.partial(pk.int8_matmul, out_dtype=jnp.bfloat16, debug=True),
                  xq, wq, sx, sw, b)
  dots = re.findall(r"tt\.dot .*: (tensor<\S+>) \* (tensor<\S+>) -> (tensor<\S+>)", ir)
  assert dots, "no tt.dot in the Triton IR"
  for a, b_, c in dots:  # a real 8-bit dot, not an upcast
    assert a.endswith("xi8>") and b_.endswith("xi8>") and c.endswith("xi32>"), (a, b_, c)


def test_fp8_lowers_to_e4m3_dot(capfd):
  m, n, k = 128, 256, 512
  xq, wq = jnp.zeros((m, k), jnp.float8_e4m3fn), jnp.zeros((n, k), jnp.float8_e4m3fn)
  sx, sw = jnp.zeros((m,), jnp.float32), jnp.zeros((n,), jnp.float32)
  ir = _triton_ir(capfd, functools.partial(pk.fp8_matmul, out_dtype=jnp.bfloat16, debug=True),
                  xq, wq, sx, sw)
  dots = re.findall(r"tt\.dot .*: (tensor<\S+>) \* (tensor<\S+>) -> (tensor<\S+>)", ir)
  assert dots
  for a, b_, c in dots:
    assert a.endswith("xf8E4M3FN>") and b_.endswith("xf8E4M3FN>") and c.endswith("xf32>"), (a, b_, c)


@pytest.mark.parametrize("blocks", [pk.DECODE_BLOCKS, pk.MEDIUM_BLOCKS, pk.PREFILL_BLOCKS, SMALL_BLOCKS])
def test_every_block_config_lowers(blocks, capfd):
  # The lowered call is the Triton custom call on the i8 operands, launched with this
  # config's grid / warps / stages, and its IR is a (block_m x block_k) x (block_k x
  # block_n) i8 dot into an i32 accumulator, stored as bf16 tiles.
  m, n, k = 200, 300, 500
  f = functools.partial(pk.int8_matmul, blocks=blocks, debug=True)
  hlo = lower_for_cuda(f, jnp.zeros((m, k), jnp.int8), jnp.zeros((n, k), jnp.int8),
                       jnp.zeros((m,), jnp.float32), jnp.zeros((n,), jnp.float32))
  ir = capfd.readouterr().out
  call = re.search(r"stablehlo\.custom_call @__gpu\$xla\.gpu\.triton\(.*", hlo)
  assert call, "no Triton custom call in the lowered module"
  call = call.group(0)
  assert call.endswith(f": (tensor<{m}x{k}xi8>, tensor<{n}x{k}xi8>, tensor<{m}xf32>, tensor<{n}xf32>) "
                       f"-> tensor<{m}x{n}xbf16>"), call[-200:]
  grid = math.ceil(m / blocks.block_m) * math.ceil(n / blocks.block_n)
  for attr in (f"grid_x = {grid} : i32", f"num_warps = {blocks.num_warps} : i32",
               f"num_stages = {blocks.num_stages} : i32"):
    assert attr in call, attr
  bm, bn, bk = blocks.block_m, blocks.block_n, blocks.block_k
  dots = re.findall(r"tt\.dot .*: (tensor<\S+>) \* (tensor<\S+>) -> (tensor<\S+>)", ir)
  assert dots == [(f"tensor<{bm}x{bk}xi8>", f"tensor<{bk}x{bn}xi8>", f"tensor<{bm}x{bn}xi32>")], dots
  assert re.search(rf"tt\.store .*: tensor<{bm}x{bn}x!tt\.ptr<bf16>>", ir), "no bf16 tile store"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float8_e4m3fn])
def test_on_gpu_matches_reference(dtype, rng):
  xq, wq, sx, sw, bias = _operands(rng, 200, 300, 500, dtype)
  f = pk.int8_matmul if dtype == jnp.int8 else pk.fp8_matmul
  y = f(xq, wq, sx, sw, bias, out_dtype=jnp.float32)
  ref = pk.scaled_matmul_ref(xq, wq, sx, sw, bias, out_dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-4)
  if dtype == jnp.int8:
    np.testing.assert_array_equal(np.asarray(f(xq, wq)), np.asarray(accumulate_ref(xq, wq)))
