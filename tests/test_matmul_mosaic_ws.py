"""Warp-specialized persistent Hopper GEMM (pallas_kernels/matmul_mosaic_ws.py).

Interpret mode cannot run it: on the CPU it is lowered for CUDA (here) and compiled to
SASS by `make gpu-check` (setmaxnreg, TMA, IGMMA/QGMMA, no spills); numerics are the
`gpu` tests against the reference.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.reference import quantize_rows_ref
from tests.kernel_utils import lower_for_cuda
from tests.test_matmul_mosaic import WGMMA, _is_hopper


def _structs(m, n, k, dtype):
  return [jnp.zeros((m, k), dtype), jnp.zeros((n, k), dtype), jnp.zeros((m,), jnp.float32),
          jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32)]


@pytest.mark.parametrize("dtype,out_dtype", [(jnp.int8, jnp.bfloat16), (jnp.float8_e4m3fn, jnp.float32)],
                         ids=["int8-bf16", "fp8-f32"])
def test_lowers_to_a_warp_specialized_8bit_wgmma(dtype, out_dtype):
  f = lambda x, w, sx, sw, b: pk.scaled_matmul(x, w, sx, sw, b, out_dtype=out_dtype, backend="mosaic",
                                               blocks=pk.WS_BLOCKS)
  hlo = lower_for_cuda(f, *_structs(256, 384, 512, dtype))
  assert "custom_call @mosaic_gpu_v2" in hlo
  import re
  assert {int(x) for x in re.findall(WGMMA[dtype], hlo)} == {pk.WS_BLOCKS.tile_n}


def test_shape_errors():
  x, w, sx, sw, b = _structs(200, 384, 512, jnp.int8)
  with pytest.raises(ValueError, match="M % 128 == N % 128 == K % 128 == 0, got M=200"):
    pk.int8_matmul(x, w, sx, sw, b, backend="mosaic", blocks=pk.WS_BLOCKS)
  with pytest.raises(ValueError, match="tile_m must be a multiple of 64"):
    pk.WsBlocks(tile_m=32).check()


@pytest.mark.gpu
@pytest.mark.skipif(not _is_hopper(), reason="wgmma needs a Hopper GPU")
@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float8_e4m3fn])
@pytest.mark.parametrize("mnk", [(128, 128, 128), (256, 512, 1024), (4096, 4096, 4096)])
@pytest.mark.parametrize("bias", [False, True])
def test_on_hopper_matches_reference(dtype, mnk, bias, rng):
  m, n, k = mnk
  xq, sx = quantize_rows_ref(jnp.asarray(rng.standard_normal((m, k)), jnp.float32), dtype=dtype)
  wq, sw = quantize_rows_ref(jnp.asarray(rng.standard_normal((n, k)), jnp.float32), dtype=dtype)
  b = jnp.asarray(rng.standard_normal(n), jnp.float32) if bias else None
  y = pk.scaled_matmul(xq, wq, sx, sw, b, out_dtype=jnp.float32, backend="mosaic", blocks=pk.WS_BLOCKS)
  ref = pk.scaled_matmul_ref(xq, wq, sx, sw, b, out_dtype=jnp.float32)
  tol = 2**-22 if dtype == jnp.int8 else 1e-5
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=tol, atol=tol * float(jnp.abs(ref).max()))
