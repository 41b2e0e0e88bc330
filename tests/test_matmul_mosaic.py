"""Hopper (Mosaic GPU, wgmma) GEMM: real CUDA lowering on the CPU, and numerics on a GPU.

Interpret mode cannot run this kernel (wgmma on transpose_ref operands), so on the CPU we
check that it lowers for every shape class and that the lowered module issues a real
8-bit wgmma; numerics are asserted by the `gpu` tests against the reference.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.matmul_mosaic import MOSAIC_DECODE_BLOCKS, MOSAIC_PREFILL_BLOCKS
from pallas_kernels.reference import quantize_rows_ref
from tests.conftest import HAS_GPU
from tests.kernel_utils import lower_for_cuda

WGMMA = {jnp.int8: r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k32\.s32\.s8\.s8",
         jnp.float8_e4m3fn: r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k32\.f32\.e4m3\.e4m3"}


def _structs(m, n, k, dtype, bias=True):
  return [jnp.zeros((m, k), dtype), jnp.zeros((n, k), dtype), jnp.zeros((m,), jnp.float32),
          jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32) if bias else None]


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float8_e4m3fn], ids=["int8", "fp8"])
@pytest.mark.parametrize("mnk", [(1, 4096, 4096), (16, 4096, 11008), (200, 304, 512),
                                 (2048, 4096, 4096), (8192, 11008, 4096)])
def test_lowers_to_8bit_wgmma(dtype, mnk):
  m, n, k = mnk
  f = functools.partial(pk.scaled_matmul, out_dtype=jnp.bfloat16, backend="mosaic")
  hlo = lower_for_cuda(f, *_structs(m, n, k, dtype))
  assert "custom_call @mosaic_gpu_v2" in hlo
  tile_n = pk.matmul_mosaic.default_mosaic_blocks(m, n, k).tile_n
  found = re.findall(WGMMA[dtype], hlo)
  assert found, "no 8-bit wgmma in the lowered Mosaic GPU module"
  assert {int(x) for x in found} == {tile_n}


@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("blocks", [None, MOSAIC_DECODE_BLOCKS, MOSAIC_PREFILL_BLOCKS,
                                    pk.MosaicBlocks(tile_m=64, tile_n=256, tile_k=128, max_concurrent_steps=2)])
def test_block_configs_and_epilogues_lower(out_dtype, bias, blocks):
  if blocks is not None and blocks.smem_bytes(out_dtype) > pk.matmul_mosaic.SMEM_LIMIT_BYTES - 8192:
    with pytest.raises(ValueError, match="shared memory"):
      pk.int8_matmul(*_structs(256, 512, 384, jnp.int8, bias), out_dtype=out_dtype, backend="mosaic",
                     blocks=blocks)
    return
  f = functools.partial(pk.int8_matmul, out_dtype=out_dtype, backend="mosaic", blocks=blocks)
  hlo = lower_for_cuda(f, *_structs(256, 512, 384, jnp.int8, bias))
  # The Mosaic GPU call on the i8 operands (bias or not) with this out_dtype, and an
  # int8 wgmma (s32 accumulator) as wide as the config's tile_n.
  ir_out = {jnp.float32: "f32", jnp.bfloat16: "bf16", jnp.float16: "f16"}[out_dtype]
  operands = "tensor<256x384xi8>, tensor<512x384xi8>, tensor<256xf32>, tensor<512xf32>"
  operands += ", tensor<512xf32>" if bias else ""
  assert re.search(rf"custom_call @mosaic_gpu_v2\(.*: \({operands}\) -> tensor<256x512x{ir_out}>\n", hlo)
  tile_n = (blocks or pk.matmul_mosaic.default_mosaic_blocks(256, 512, 384, out_dtype)).tile_n
  assert {int(x) for x in re.findall(WGMMA[jnp.int8], hlo)} == {tile_n}


def test_bad_inputs():
  x, w, sx, sw, b = _structs(64, 128, 200, jnp.int8)
  with pytest.raises(ValueError, match="K=200 must be a multiple of 16"):
    pk.int8_matmul(x[:, :200], w[:, :200], sx, sw, backend="mosaic")
  x, w, sx, sw, b = _structs(64, 100, 256, jnp.int8)
  with pytest.raises(ValueError, match="N=100 rows of bfloat16 are not 16-byte aligned"):
    pk.int8_matmul(x, w, sx, sw, backend="mosaic")
  x, w, sx, sw, b = _structs(64, 128, 256, jnp.int8)
  with pytest.raises(ValueError, match="tile_m must be a positive multiple of 64"):
    pk.int8_matmul(x, w, sx, sw, backend="mosaic", blocks=pk.MosaicBlocks(tile_m=32))
  with pytest.raises(ValueError, match="tile_k must be a positive multiple of 128"):
    pk.int8_matmul(x, w, sx, sw, backend="mosaic", blocks=pk.MosaicBlocks(tile_k=64))
  with pytest.raises(TypeError, match="must be MosaicBlocks"):
    pk.int8_matmul(x, w, sx, sw, backend="mosaic", blocks=pk.MatmulBlocks())
  with pytest.raises(NotImplementedError, match="interpret mode"):
    pk.int8_matmul(x, w, sx, sw, backend="mosaic", interpret=True)
  with pytest.raises(ValueError, match="always applies the epilogue"):
    pk.int8_matmul(x, w, backend="mosaic")


def _is_hopper():
  return HAS_GPU and any(h in jax.devices()[0].device_kind for h in ("H100", "H200", "H800", "GH200"))


@pytest.mark.gpu
@pytest.mark.skipif(not _is_hopper(), reason="wgmma needs a Hopper GPU")
@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float8_e4m3fn])
@pytest.mark.parametrize("mnk", [(1, 256, 512), (200, 304, 512), (256, 512, 1024)])
def test_on_hopper_matches_reference(dtype, mnk, rng):
  m, n, k = mnk
  xq, sx = quantize_rows_ref(jnp.asarray(rng.standard_normal((m, k)), jnp.float32), dtype=dtype)
  wq, sw = quantize_rows_ref(jnp.asarray(rng.standard_normal((n, k)), jnp.float32), dtype=dtype)
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
  y = pk.scaled_matmul(xq, wq, sx, sw, bias, out_dtype=jnp.float32, backend="mosaic")
  ref = pk.scaled_matmul_ref(xq, wq, sx, sw, bias, out_dtype=jnp.float32)
  tol = 2**-22 if dtype == jnp.int8 else 1e-5
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=tol, atol=tol * float(jnp.abs(ref).max()))
