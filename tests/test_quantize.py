"""Fused quantize_rows kernel: interpret mode bit-exact vs the reference; CUDA lowering."""

import functools
import re

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pallas_kernels as pk
from pallas_kernels.quantize import round_half_even
from tests.kernel_utils import lower_for_cuda, pairwise

DTYPES = [jnp.int8, jnp.float8_e4m3fn]
BLOCKS = [None, pk.QuantizeBlocks(block_m=4, block_k=32), pk.QuantizeBlocks(block_m=1, block_k=128)]


def _same(a, b):
  np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))


# Pairwise over (dtype, shape, blocks, mode): every two-way interaction, 16 cases instead of 96.
@pytest.mark.parametrize("dtype,mk,blocks,mode", pairwise(
    DTYPES, [(1, 64), (7, 100), (33, 500), (128, 384)], BLOCKS, ["dynamic", "dynamic+smooth", "static", "static+smooth"]))
def test_matches_reference_bit_exact(dtype, mk, blocks, mode, rng):
  m, k = mk
  x = rng.standard_normal((m, k)).astype(np.float32) * 4
  x[:, 3] *= 60  # an outlier channel
  if m > 2:
    x[2] = 0.0  # an all-zero row gets scale 1 and exact zeros
  inv_s = jnp.asarray(rng.uniform(0.05, 2, k), jnp.float32) if "smooth" in mode else None
  scale = jnp.float32(0.07) if mode.startswith("static") else None
  xq, sx = pk.quantize_rows(jnp.asarray(x), inv_s, scale=scale, dtype=dtype, blocks=blocks, interpret=True)
  rq, rs = pk.quantize_rows_ref(jnp.asarray(x), inv_s, scale=scale, dtype=dtype)
  assert xq.dtype == dtype and sx.shape == (m,)
  _same(xq, rq)
  np.testing.assert_array_equal(np.asarray(sx), np.asarray(rs))
  if m > 2 and scale is None:
    assert float(sx[2]) == 1.0 and not np.any(np.asarray(xq[2].astype(jnp.float32)))


def test_bf16_input(rng):
  x = jnp.asarray(rng.standard_normal((9, 70)), jnp.bfloat16)
  xq, sx = pk.quantize_rows(x, interpret=True)
  rq, rs = pk.quantize_rows_ref(x)
  _same(xq, rq)
  np.testing.assert_array_equal(np.asarray(sx), np.asarray(rs))


@settings(max_examples=200, deadline=None)
@given(st.floats(-200, 200, allow_nan=False, width=32) | st.sampled_from([0.5, 1.5, 2.5, -0.5, -3.5, 126.5, -126.5]))
def test_round_half_even_matches_lax_round(v):
  y = jnp.asarray([v, v + 0.5, v - 0.5], jnp.float32)
  np.testing.assert_array_equal(np.asarray(round_half_even(y)), np.asarray(jnp.round(y)))


def test_bad_inputs():
  with pytest.raises(ValueError, match="must be \\(M, K\\)"):
    pk.quantize_rows(jnp.ones((2, 3, 4)), interpret=True)
  with pytest.raises(TypeError, match="floating point"):
    pk.quantize_rows(jnp.ones((2, 3), jnp.int32), interpret=True)
  with pytest.raises(ValueError, match="inv_smooth must be \\(3,\\)"):
    pk.quantize_rows(jnp.ones((2, 3)), jnp.ones(4), interpret=True)
  with pytest.raises(ValueError, match="scalar"):
    pk.quantize_rows(jnp.ones((2, 3)), scale=jnp.ones(3), interpret=True)
  with pytest.raises(TypeError, match="int8 or float8_e4m3fn"):
    pk.quantize_rows(jnp.ones((2, 3)), dtype=jnp.int16, interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    pk.quantize_rows(jnp.ones((2, 3)), blocks=pk.QuantizeBlocks(block_k=100), interpret=True)


@pytest.mark.parametrize("dtype,ir_type", [(jnp.int8, "i8"), (jnp.float8_e4m3fn, "f8E4M3FN")])
@pytest.mark.parametrize("smooth,static", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("mk", [(1, 4096), (200, 500), (2048, 11008)])
def test_lowers_for_cuda(dtype, ir_type, smooth, static, mk, capfd):
  m, k = mk
  args = [jnp.zeros((m, k), jnp.bfloat16), jnp.zeros((k,), jnp.float32) if smooth else None,
          jnp.zeros((), jnp.float32) if static else None]
  f = lambda x, s, sc: pk.quantize_rows(x, s, scale=sc, dtype=dtype, debug=True)
  hlo = lower_for_cuda(f, *args)
  assert "__gpu$xla.gpu.triton" in hlo
  ir = capfd.readouterr().out
  assert re.search(rf"tt\.store .*tensor<\d+x\d+x!tt\.ptr<{ir_type}>>", ir), "no 8-bit store in the Triton IR"
