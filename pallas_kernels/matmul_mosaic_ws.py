"""Warp-specialized, persistent int8 / fp8 scaled GEMM for Hopper (sm_90a), Mosaic GPU.

The structure of JAX's own `jax/experimental/pallas/ops/gpu/hopper_matmul_mgpu.py`, for
8-bit operands with the outer-dimension epilogue:
- persistent: one CTA per SM walks the output tiles (`plgpu.nd_loop`), so prologue and
  epilogue of neighbouring tiles overlap and no tail wave is launched;
- warp-specialized: a producer warpgroup (40 registers, `setmaxnreg`) issues the TMA loads
  of the x and w tiles into a `max_concurrent_steps`-deep ring of swizzled SMEM buffers,
  two consumer warpgroups run `wgmma` on them, each on its own half of the CTA tile (rows:
  `wg_m_slice`) with its own register accumulator, so each holds a 64-row accumulator;
- epilogue per consumer: `(acc * sw[n]) * sx[m] + bias[n]` in f32, cast, written through
  SMEM and stored by TMA in 64-column slabs while the next tile's loads are in flight.

Layout: 8-bit wgmma takes only K-major operands, so the weight is (N, K) and reaches
wgmma through `transpose_ref` (no data movement), as in matmul_mosaic.py.

Shapes: M a multiple of 2 * tile_m, N of tile_n, K of tile_k (the registry sends other
shapes to the single-warpgroup Mosaic kernel or to Triton). Interpret mode cannot run
it; its structure is checked by `make gpu-check` (registers, spills, IGMMA/QGMMA), its
numerics by the tests marked `gpu` against reference.scaled_matmul_ref.
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
from pallas_kernels.errors import BackendError, KernelArgumentError
from pallas_kernels.reference import scaled_matmul_ref  # noqa: F401  (the reference, beside the kernel)

_SWIZZLE_BYTES = 128
H100_SMS = 132


@dataclasses.dataclass(frozen=True)
class WsBlocks:
  """tile_m: rows per consumer warpgroup (the CTA tile is 2 * tile_m x tile_n); tile_k a
  multiple of 128 (the 128-byte swizzle in 8-bit elements); epi_tile_n: columns per TMA
  store of the epilogue."""

  tile_m: int = 64
  tile_n: int = 128
  tile_k: int = 128
  max_concurrent_steps: int = 4
  epi_tile_n: int = 64
  num_sms: int = H100_SMS

  def check(self):
    if self.tile_m % 64:
      raise KernelArgumentError(f"WsBlocks.tile_m must be a multiple of 64, got {self.tile_m}")
    if self.tile_n % self.epi_tile_n or not 8 <= self.tile_n <= 256:
      raise KernelArgumentError(f"WsBlocks.tile_n must be in [8, 256] and a multiple of epi_tile_n "
                                f"({self.epi_tile_n}), got {self.tile_n}")
    if self.tile_k % _SWIZZLE_BYTES:
      raise KernelArgumentError(f"WsBlocks.tile_k must be a multiple of {_SWIZZLE_BYTES}, got {self.tile_k}")

  def shape_error(self, m: int, n: int, k: int) -> str | None:
    if m % (2 * self.tile_m) or n % self.tile_n or k % self.tile_k:
      return (f"the warp-specialized kernel needs M % {2 * self.tile_m} == N % {self.tile_n} == "
              f"K % {self.tile_k} == 0, got M={m} N={n} K={k}")
    return None


WS_BLOCKS = WsBlocks()


def _ws_matmul_kernel(x_gmem, w_gmem, sx_gmem, sw_gmem, b_gmem, o_gmem, *, blocks: WsBlocks):
  plgpu = _compat.mosaic()
  (m, k), n = x_gmem.shape, w_gmem.shape[0]
  tile_m, tile_n, tile_k = blocks.tile_m, blocks.tile_n, blocks.tile_k
  cta_tile_m = 2 * tile_m
  epi_n = blocks.epi_tile_n
  acc_dtype = jnp.int32 if x_gmem.dtype == jnp.int8 else jnp.float32
  out_dtype = o_gmem.dtype
  transforms = (plgpu.TilingTransform((8, _SWIZZLE_BYTES // x_gmem.dtype.itemsize)),
                plgpu.SwizzleTransform(_SWIZZLE_BYTES))
  out_swizzle = min(_SWIZZLE_BYTES, epi_n * jnp.dtype(out_dtype).itemsize)
  out_transforms = (plgpu.TilingTransform((8, out_swizzle // jnp.dtype(out_dtype).itemsize)),
                    plgpu.SwizzleTransform(out_swizzle))
  m_iters, n_iters, k_iters = m // cta_tile_m, n // tile_n, k // tile_k

  def get_pipeline(body, compute_context):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(k_iters,), memory_registers=40,
        in_specs=[
            plgpu.BlockSpec((cta_tile_m, tile_k), lambda s: (0, s), transforms=transforms,
                            memory_space=plgpu.SMEM),
            plgpu.BlockSpec((tile_n, tile_k), lambda s: (0, s), transforms=transforms,
                            memory_space=plgpu.SMEM),
        ],
        wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=blocks.max_concurrent_steps,
        compute_context=compute_context)

  ignore = lambda *_, **__: None

  @functools.partial(
      pl.run_scoped,
      pipeline_allocs=get_pipeline(ignore, ignore).get_allocations(x_gmem, w_gmem),
      out_smem=plgpu.SMEM((2, 2, tile_m, epi_n), out_dtype, transforms=out_transforms),
      collective_axes="wg",
  )
  def _scope(pipeline_allocs, out_smem):
    wg = lax.axis_index("wg")

    @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
    def _tile_loop(loop_info):
      (lin,) = loop_info.index
      # Walk N fastest inside a row of tiles: consecutive CTAs share the x tile in L2.
      m_idx, n_idx = lin // n_iters, lin % n_iters
      cta_m = pl.ds(m_idx * cta_tile_m, cta_tile_m)
      cta_n = pl.ds(n_idx * tile_n, tile_n)
      wg_m = pl.ds(wg * tile_m, tile_m)

      def compute_context(eval_pipeline):
        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_m, tile_n), acc_dtype))
        def _acc_scope(acc_ref):
          eval_pipeline(acc_ref)
          load = functools.partial(_compat.mosaic_load, optimized=False)  # GMEM, Warpgroup semantics
          sx = load(sx_gmem.at[cta_m].at[wg_m], layout=plgpu.Layout.WGMMA.reduce(1))  # one per row
          sw = load(sw_gmem.at[cta_n], layout=plgpu.Layout.WGMMA.reduce(0))  # one per column
          acc = acc_ref[...].astype(jnp.float32)
          y = numerics.scale_acc(acc, lax.broadcast_in_dim(sx, (tile_m, tile_n), [0]),
                                 lax.broadcast_in_dim(sw, (tile_m, tile_n), [1]))
          if b_gmem is not None:
            b = load(b_gmem.at[cta_n], layout=plgpu.Layout.WGMMA.reduce(0))
            y = y + lax.broadcast_in_dim(b, (tile_m, tile_n), [1])
          y = y.astype(out_dtype)
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          for j in range(tile_n // epi_n):
            slot = j % 2
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            out_smem[wg, slot] = y[:, j * epi_n:(j + 1) * epi_n]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[wg, slot],
                                    o_gmem.at[cta_m, cta_n].at[wg_m, pl.ds(j * epi_n, epi_n)])

      def mma_body(_, x_smem, w_smem, acc_ref):
        plgpu.wgmma(acc_ref, x_smem.at[wg_m], plgpu.transpose_ref(w_smem, (1, 0)))
        plgpu.wgmma_wait(0)
        return acc_ref

      get_pipeline(mma_body, compute_context)(
          x_gmem.at[cta_m, :], w_gmem.at[cta_n, :], allocations=pipeline_allocs)

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


@functools.partial(jax.jit, static_argnames=("out_dtype", "blocks"))
def _ws_scaled_matmul(xq, wq, sx, sw, bias, *, out_dtype, blocks):
  plgpu = _compat.mosaic()
  m, n = xq.shape[0], wq.shape[0]
  tiles = (m // (2 * blocks.tile_m)) * (n // blocks.tile_n)
  if bias is None:
    body = lambda x, w, a, b, o: _ws_matmul_kernel(x, w, a, b, None, o, blocks=blocks)
    args = (xq, wq, sx, sw)
  else:
    body = functools.partial(_ws_matmul_kernel, blocks=blocks)
    args = (xq, wq, sx, sw, bias)
  return plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(min(blocks.num_sms, tiles),), grid_names=("sm",),
      num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )(*args)


def ws_scaled_matmul(xq, wq, sx, sw, bias=None, *, out_dtype=jnp.bfloat16, blocks: WsBlocks = WS_BLOCKS):
  """Hopper warp-specialized persistent GEMM; operands as matmul._check wants them."""
  blocks.check()
  (m, k), n = xq.shape, wq.shape[0]
  if (err := blocks.shape_error(m, n, k)) is not None:
    raise BackendError(f"mosaic backend: {err}; pass blocks=None (or MosaicBlocks), or use backend='triton'")
  if bias is not None:
    bias = bias.astype(jnp.float32)
  if jax.default_backend() == "gpu":  # persistent: one CTA per SM of this GPU
    blocks = dataclasses.replace(blocks, num_sms=getattr(jax.devices()[0], "core_count", blocks.num_sms))
  return _ws_scaled_matmul(xq, wq, sx, sw, bias, out_dtype=jnp.dtype(out_dtype), blocks=blocks)
