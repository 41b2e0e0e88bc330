"""int8 / fp8 scaled GEMM for Hopper (sm_90a) on the Mosaic GPU backend: TMA loads into
swizzled shared memory, a K pipeline of `wgmma` into a register accumulator (s8 x s8 ->
s32, or e4m3 x e4m3 -> f32), and the outer-dimension epilogue
`(acc * sw[n]) * sx[m] + bias[n]` (reference.scale_acc) on the last K step.

Layout: 8-bit wgmma only accepts K-major operands, so the weight is stored (N, K) (done
once by quantize_params) and handed to wgmma through `transpose_ref`; no data moves.

Shapes: out-of-bounds TMA reads are zero-filled and stores clipped, so ragged M, N and K
need no masks; TMA does need 16-byte-aligned global strides, so K % 16 == 0 and the
output row (N * itemsize) a multiple of 16 bytes -- checked, with a clear error.

Numerics: Pallas interpret mode cannot run `transpose_ref` operands of wgmma (nor
`plgpu.load`), so this kernel is covered on the CPU by its CUDA lowering (tests check
the exact wgmma instruction: `.s32.s8.s8` / `.f32.e4m3.e4m3`) and on a GPU by tests
marked `gpu` against reference.scaled_matmul_ref. The epilogue is the same f32 formula
as the Triton kernel, which interpret mode does check.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels import reference as numerics
from pallas_kernels.errors import BackendError, KernelArgumentError, KernelTypeError
from pallas_kernels.reference import scaled_matmul_ref  # noqa: F401  (the reference, beside the kernel)

_SWIZZLE_BYTES = 128


@dataclasses.dataclass(frozen=True)
class MosaicBlocks:
  """Tiles of the wgmma GEMM: tile_m a multiple of 64 (one warpgroup's wgmma M), tile_n a
  multiple of 8 up to 256, tile_k a multiple of 128 (the 128-byte swizzle in 8-bit
  elements). max_concurrent_steps: TMA pipeline depth (shared memory ~ steps * tiles)."""

  tile_m: int = 128
  tile_n: int = 128
  tile_k: int = 128
  max_concurrent_steps: int = 3

  def check(self):
    if self.tile_m % 64 or self.tile_m <= 0:
      raise KernelArgumentError(f"MosaicBlocks.tile_m must be a positive multiple of 64, got {self.tile_m}")
    if self.tile_n % 8 or not 8 <= self.tile_n <= 256:
      raise KernelArgumentError(f"MosaicBlocks.tile_n must be a multiple of 8 in [8, 256], got {self.tile_n}")
    if self.tile_k % _SWIZZLE_BYTES or self.tile_k <= 0:
      raise KernelArgumentError(f"MosaicBlocks.tile_k must be a positive multiple of {_SWIZZLE_BYTES}, "
                                f"got {self.tile_k}")
    if self.max_concurrent_steps < 1:
      raise KernelArgumentError(f"MosaicBlocks.max_concurrent_steps must be >= 1, got {self.max_concurrent_steps}")


  def smem_bytes(self, out_dtype) -> int:
    """Shared memory of the pipeline: every buffered step holds an x tile, a w tile and an
    output tile (Pallas buffers outputs as deep as inputs); scales are negligible."""
    per_step = (self.tile_m + self.tile_n) * self.tile_k + self.tile_m * self.tile_n * jnp.dtype(out_dtype).itemsize
    return self.max_concurrent_steps * per_step


SMEM_LIMIT_BYTES = 227 * 1024  # Hopper's opt-in shared memory per block
MOSAIC_DECODE_BLOCKS = MosaicBlocks(tile_m=64, tile_n=128, tile_k=256, max_concurrent_steps=3)
MOSAIC_PREFILL_BLOCKS = MosaicBlocks(tile_m=128, tile_n=128, tile_k=128, max_concurrent_steps=3)
# int8 keeps 64-row tiles at every M: one warpgroup holding a 128x128 int32 accumulator
# plus its f32 epilogue (scales, bias) sits at 255 registers and spills (make gpu-check);
# 64x128 needs ~167.
MOSAIC_INT8_BLOCKS = MOSAIC_DECODE_BLOCKS


def default_mosaic_blocks(m: int, n: int, k: int, out_dtype=jnp.bfloat16, dtype=jnp.int8) -> MosaicBlocks:
  """int8: 64x128 tiles, long K. fp8: decode (M <= 64) one 64-row wgmma tile, long K
  tiles; prefill 128x128. The pipeline is as deep (<= 4) as shared memory allows."""
  if jnp.dtype(dtype) == jnp.dtype(jnp.int8):
    base = MOSAIC_INT8_BLOCKS
  else:
    base = MOSAIC_DECODE_BLOCKS if m <= 64 else MOSAIC_PREFILL_BLOCKS
  for steps in (4, 3, 2, 1):
    blocks = dataclasses.replace(base, max_concurrent_steps=steps)
    if blocks.smem_bytes(out_dtype) <= SMEM_LIMIT_BYTES - 8192:  # barriers, scales
      return blocks
  return dataclasses.replace(base, max_concurrent_steps=1)


def _mosaic_matmul_kernel(x_ref, w_ref, sx_ref, sw_ref, b_ref, o_ref, acc_ref, *, num_k_steps):
  plgpu = _compat.mosaic()
  # x_ref (tile_m, tile_k), w_ref (tile_n, tile_k): both K-major in swizzled SMEM.
  plgpu.wgmma(acc_ref, x_ref, plgpu.transpose_ref(w_ref, (1, 0)))

  @pl.when(pl.program_id(2) == num_k_steps - 1)
  def _epilogue():
    plgpu.wgmma_wait(0)
    tile = acc_ref.shape
    acc = acc_ref[...].astype(jnp.float32)
    sx = _compat.mosaic_load(sx_ref, layout=plgpu.Layout.WGMMA.reduce(1))  # one per row
    sw = _compat.mosaic_load(sw_ref, layout=plgpu.Layout.WGMMA.reduce(0))  # one per column
    y = numerics.scale_acc(acc, lax.broadcast_in_dim(sx, tile, [0]), lax.broadcast_in_dim(sw, tile, [1]))
    if b_ref is not None:
      b = _compat.mosaic_load(b_ref, layout=plgpu.Layout.WGMMA.reduce(0)).astype(jnp.float32)
      y = y + lax.broadcast_in_dim(b, tile, [1])
    o_ref[...] = y.astype(o_ref.dtype)

  plgpu.wgmma_wait(1)  # keep one wgmma in flight; its operands are released one step late


def check_mosaic_shapes(m, n, k, out_dtype):
  if k % 16:
    raise BackendError(f"mosaic backend: K={k} must be a multiple of 16 (TMA needs 16-byte-aligned "
                     "int8/fp8 row strides); use backend='triton'")
  if (n * jnp.dtype(out_dtype).itemsize) % 16:
    raise BackendError(f"mosaic backend: N={n} rows of {jnp.dtype(out_dtype).name} are not 16-byte "
                     "aligned for the TMA store; use backend='triton'")


@functools.partial(jax.jit, static_argnames=("out_dtype", "blocks", "interpret"))
def _mosaic_scaled_matmul(xq, wq, sx, sw, bias, *, out_dtype, blocks, interpret):
  plgpu = _compat.mosaic()
  (m, k), n = xq.shape, wq.shape[0]
  tm, tn, tk = blocks.tile_m, blocks.tile_n, blocks.tile_k
  acc_dtype = jnp.int32 if xq.dtype == jnp.int8 else jnp.float32
  swizzled = (plgpu.TilingTransform((8, _SWIZZLE_BYTES // xq.dtype.itemsize)),
              plgpu.SwizzleTransform(_SWIZZLE_BYTES))
  grid = (pl.cdiv(m, tm), pl.cdiv(n, tn), pl.cdiv(k, tk))
  in_specs = [
      plgpu.BlockSpec((tm, tk), lambda i, j, s: (i, s), transforms=swizzled, delay_release=1),
      plgpu.BlockSpec((tn, tk), lambda i, j, s: (j, s), transforms=swizzled, delay_release=1),
      plgpu.BlockSpec((tm,), lambda i, j, s: (i,)),
      plgpu.BlockSpec((tn,), lambda i, j, s: (j,)),
  ]
  kernel = functools.partial(_mosaic_matmul_kernel, num_k_steps=grid[2])
  args = [xq, wq, sx, sw]
  if bias is None:
    body = lambda x, w, a, b, o, acc: kernel(x, w, a, b, None, o, acc)
  else:
    body = kernel
    in_specs.append(plgpu.BlockSpec((tn,), lambda i, j, s: (j,)))
    args.append(bias)
  return pl.pallas_call(
      body, grid=grid, in_specs=in_specs,
      out_specs=plgpu.BlockSpec((tm, tn), lambda i, j, s: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      scratch_shapes=[plgpu.ACC((tm, tn), acc_dtype)],
      compiler_params=_compat.mosaic_params(
          dimension_semantics=["parallel", "parallel", "sequential"],
          max_concurrent_steps=blocks.max_concurrent_steps),
      interpret=interpret, name=f"mosaic_scaled_matmul_{xq.dtype.name}")(*args)


def mosaic_scaled_matmul(xq, wq, sx, sw, bias=None, *, out_dtype=jnp.bfloat16,
                         blocks: MosaicBlocks | None = None, interpret=False):
  """Hopper wgmma GEMM; operands already checked by matmul._check (int8_matmul/fp8_matmul)."""
  (m, k), n = xq.shape, wq.shape[0]
  check_mosaic_shapes(m, n, k, out_dtype)
  if interpret:
    raise NotImplementedError("mosaic backend: Pallas interpret mode cannot run wgmma on transposed "
                              "8-bit operands (jax 0.10.2); use backend='triton' with interpret=True")
  blocks = default_mosaic_blocks(m, n, k, out_dtype, xq.dtype) if blocks is None else blocks
  if not isinstance(blocks, MosaicBlocks):
    raise KernelTypeError(f"mosaic backend: blocks must be MosaicBlocks or WsBlocks, got {type(blocks).__name__}; "
                          "pass blocks=None for the default tiles")
  blocks.check()
  if blocks.smem_bytes(out_dtype) > SMEM_LIMIT_BYTES - 8192:
    raise KernelArgumentError(f"mosaic backend: {blocks} needs ~{blocks.smem_bytes(out_dtype)} bytes of shared "
                     f"memory with {jnp.dtype(out_dtype).name} output (limit {SMEM_LIMIT_BYTES}); "
                     "lower max_concurrent_steps or the tiles")
  if bias is not None:
    bias = bias.astype(jnp.float32)
  return _mosaic_scaled_matmul(xq, wq, sx, sw, bias, out_dtype=jnp.dtype(out_dtype), blocks=blocks,
                               interpret=False)
