"""Pallas GPU kernels for W8A8, each beside its pure-jnp reference (reference.py).

int8_matmul / fp8_matmul: 8-bit GEMM, outer-dimension scaling epilogue (Triton backend
for Ampere+, backend="mosaic" for Hopper wgmma). quantize_rows: fused per-token (or
static) activation quantize with the runtime smoothing vector.

Names are resolved on first use (PEP 562): `import pallas_kernels` (and the reference)
loads no Pallas GPU backend, so importing the library on a CPU stays light.
"""

import importlib

_LAZY = {
    "DECODE_BLOCKS": "matmul", "MEDIUM_BLOCKS": "matmul", "PREFILL_BLOCKS": "matmul",
    "MatmulBlocks": "matmul", "default_blocks": "matmul", "fp8_matmul": "matmul",
    "int8_matmul": "matmul", "scaled_matmul": "matmul",
    "MosaicBlocks": "matmul_mosaic", "WsBlocks": "matmul_mosaic_ws", "WS_BLOCKS": "matmul_mosaic_ws",
    "QuantizeBlocks": "quantize", "quantize_rows": "quantize",
    "fp8_matmul_ref": "reference", "int8_matmul_ref": "reference",
    "quantize_rows_ref": "reference", "scaled_matmul_ref": "reference",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
  if name not in _LAZY:
    raise AttributeError(f"module 'pallas_kernels' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"pallas_kernels.{_LAZY[name]}"), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_LAZY))
