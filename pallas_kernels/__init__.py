"""Pallas GPU kernels for W8A8, each beside its pure-jnp reference (reference.py).

int8_matmul / fp8_matmul: 8-bit GEMM, outer-dimension scaling epilogue (Triton backend
for Ampere+, backend="mosaic" for Hopper wgmma). quantize_rows: fused per-token (or
static) activation quantize with the runtime smoothing vector.
"""

from pallas_kernels.matmul import DECODE_BLOCKS as DECODE_BLOCKS
from pallas_kernels.matmul import MEDIUM_BLOCKS as MEDIUM_BLOCKS
from pallas_kernels.matmul import PREFILL_BLOCKS as PREFILL_BLOCKS
from pallas_kernels.matmul import MatmulBlocks as MatmulBlocks
from pallas_kernels.matmul import default_blocks as default_blocks
from pallas_kernels.matmul import fp8_matmul as fp8_matmul
from pallas_kernels.matmul import int8_matmul as int8_matmul
from pallas_kernels.matmul import scaled_matmul as scaled_matmul
from pallas_kernels.matmul_mosaic import MosaicBlocks as MosaicBlocks
from pallas_kernels.quantize import QuantizeBlocks as QuantizeBlocks
from pallas_kernels.quantize import quantize_rows as quantize_rows
from pallas_kernels.reference import fp8_matmul_ref as fp8_matmul_ref
from pallas_kernels.reference import int8_matmul_ref as int8_matmul_ref
from pallas_kernels.reference import quantize_rows_ref as quantize_rows_ref
from pallas_kernels.reference import scaled_matmul_ref as scaled_matmul_ref
