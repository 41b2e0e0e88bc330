"""Helpers shared by the kernel tests: CUDA lowering on a CPU-only machine."""

import jax


def lower_for_cuda(f, *args):
  """Run the real Pallas GPU lowering (Triton / Mosaic GPU) without a GPU; returns the
  StableHLO text of the lowered module."""
  structs = [None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
  return jax.jit(f).trace(*structs).lower(lowering_platforms=("cuda",)).as_text()
