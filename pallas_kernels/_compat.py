"""Every JAX-version-specific Pallas GPU API the kernels touch, in one place.

Pinned against jax 0.10.2. Facts (see shared/PALLAS_NOTES.md): `jax_pallas_use_mosaic_gpu`
is on by default, so a Triton kernel must be given the Triton backend's CompilerParams;
Mosaic GPU moves between 0.10 and 0.11 (`plgpu.kernel` replacing pallas_call, the `idx`
argument of `plgpu.load`, `delay_release` on BlockSpec).
"""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as mgpu
from jax.experimental.pallas import triton as tgpu

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3])

# Triton backend
triton_load = tgpu.load
triton_store = tgpu.store


def triton_params(num_warps: int, num_stages: int):
  """Selects the Triton backend for a pallas_call (else it goes to Mosaic GPU)."""
  return tgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def triton_call(kernel, *, out_shape, grid, num_warps, num_stages, interpret, name, debug=False):
  return pl.pallas_call(kernel, out_shape=out_shape, grid=grid,
                        compiler_params=triton_params(num_warps, num_stages),
                        interpret=interpret, name=name, debug=debug)


# Mosaic GPU backend (Hopper wgmma)
mosaic = mgpu
