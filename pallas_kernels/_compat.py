"""Every JAX-version-specific Pallas GPU API the kernels touch, in one place.

Supported: jax >= 0.10.2, < 0.12 (the 0.11 calls read from the jax-v0.11.0 source and the
main branch after it). Facts (shared/PALLAS_NOTES.md, docs/PALLAS_NOTES_additions.md):
- `jax_pallas_use_mosaic_gpu` is on by default, so a Triton kernel must be given the
  Triton backend's CompilerParams.
- 0.11 deprecates `plgpu.load(ref, idx)`: the index goes on the ref (`ref.at[idx]`) and
  `idx` became optional; 0.10.2 still requires it positionally.
- JAX's Triton lowering builds `tt.dot` without `max_num_imprecise_acc` (0 by default),
  and Triton refuses Hopper wgmma for an fp8 dot with an f32 result unless it is >= 32:
  the fp8 kernel then converts e4m3 to f16 and runs HMMA. `enable_triton_fp8_wgmma`
  sets it on fp8 dots (promotion to the f32 accumulator every K-tile).

The GPU backend modules are imported on first use, not with the library: importing
actquant_jax on a CPU loads neither Mosaic GPU nor Triton.
"""

from __future__ import annotations

import functools
import importlib

import jax

JAX_VERSION = tuple(int(''.join(c for c in p if c.isdigit()) or 0) for p in jax.__version__.split(".")[:3])
SUPPORTED_JAX = ((0, 10, 2), (0, 12, 0))  # [lower, upper)
if not SUPPORTED_JAX[0] <= JAX_VERSION < SUPPORTED_JAX[1]:
  import warnings
  warnings.warn(f"pallas_kernels supports jax >= 0.10.2, < 0.12; this is jax {jax.__version__}: "
                "the Pallas GPU calls in pallas_kernels/_compat.py may not match", RuntimeWarning)


def _module(name):
  return importlib.import_module(name)


@functools.cache
def triton():
  """jax.experimental.pallas.triton (imported on first use)."""
  enable_triton_fp8_wgmma()
  return _module("jax.experimental.pallas.triton")


@functools.cache
def mosaic():
  """jax.experimental.pallas.mosaic_gpu (imported on first use)."""
  return _module("jax.experimental.pallas.mosaic_gpu")


# Triton backend
def triton_load(ref, *, mask=None, other=None):
  return triton().load(ref, mask=mask, other=other)


def triton_store(ref, val, *, mask=None):
  return triton().store(ref, val, mask=mask)


def triton_params(num_warps: int, num_stages: int):
  """Selects the Triton backend for a pallas_call (else it goes to Mosaic GPU)."""
  return triton().CompilerParams(num_warps=num_warps, num_stages=num_stages)


def triton_call(kernel, *, out_shape, grid, num_warps, num_stages, interpret, name, debug=False):
  from jax.experimental import pallas as pl
  return pl.pallas_call(kernel, out_shape=out_shape, grid=grid,
                        compiler_params=triton_params(num_warps, num_stages),
                        interpret=interpret, name=name, debug=debug)


OWN_KERNEL_PREFIX = "actquant_"  # the pallas_call names of this package's Triton kernels


@functools.cache
def enable_triton_fp8_wgmma() -> bool:
  """Makes Pallas Triton fp8 dots eligible for Hopper wgmma (QGMMA) by setting the dot's
  `max_num_imprecise_acc` to its K: the tensor core accumulates one K-tile, then Triton
  adds it into the f32 accumulator (the promotion interval DeepSeek-V3 and cuBLAS use).
  Wraps JAX's private dot_general lowering rule for the Triton backend; only 8-bit float
  dots inside this package's own kernels (pallas_call names starting with OWN_KERNEL_PREFIX)
  are touched: another library's Triton kernels lower exactly as JAX lowers them. Returns
  False (fp8 stays on HMMA) where the rule is not where 0.10.2-0.11 keep it."""
  try:
    from jax import lax
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton import lowering as tl
    rules = tl.triton_lowering_rules
    original = rules[lax.dot_general_p]
  except (ImportError, AttributeError, KeyError):
    return False

  fp8_types = tuple(getattr(ir, n) for n in ("Float8E4M3FNType", "Float8E5M2Type") if hasattr(ir, n))

  def dot_general_fp8_wgmma(ctx, a, b, **params):
    if not str(getattr(getattr(ctx, "context", None), "name", "")).startswith(OWN_KERNEL_PREFIX):
      return original(ctx, a, b, **params)
    block = ir.InsertionPoint.current.block
    before = len(block.operations)
    out = original(ctx, a, b, **params)
    for op in list(block.operations)[before:]:
      if op.operation.name != "tt.dot":
        continue
      a_type = ir.RankedTensorType(op.operands[0].type)
      if not isinstance(a_type.element_type, fp8_types):
        continue
      k = a_type.shape[-1]
      op.operation.attributes["maxNumImpreciseAcc"] = ir.IntegerAttr.get(
          ir.IntegerType.get_signless(32), max(32, k))
    return out

  rules[lax.dot_general_p] = dot_general_fp8_wgmma
  return True


# Mosaic GPU backend (Hopper wgmma)
def mosaic_load(ref, *, layout, optimized=True):
  """plgpu.load of a whole ref: 0.10 takes the index positionally, 0.11 on the ref.
  optimized=False for a GMEM ref under Warpgroup semantics ("Only optimized transfers to
  SMEM supported")."""
  plgpu = mosaic()
  if JAX_VERSION >= (0, 11, 0):
    return plgpu.load(ref, layout=layout, optimized=optimized)
  return plgpu.load(ref, (), layout=layout, optimized=optimized)


def mosaic_params(*, dimension_semantics, max_concurrent_steps):
  """CompilerParams with Lane lowering semantics pinned: the 0.10 default, which 0.11
  changed to Warpgroup; the kernels are written for Lane (register layouts per thread)."""
  plgpu = mosaic()
  return plgpu.CompilerParams(dimension_semantics=dimension_semantics,
                              max_concurrent_steps=max_concurrent_steps,
                              lowering_semantics=plgpu.LoweringSemantics.Lane)
