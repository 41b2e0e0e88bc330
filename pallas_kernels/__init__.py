"""Pallas GPU kernels for W8A8, each beside its pure-jnp reference (reference.py)."""

from pallas_kernels.reference import fp8_matmul_ref as fp8_matmul_ref
from pallas_kernels.reference import int8_matmul_ref as int8_matmul_ref
from pallas_kernels.reference import quantize_rows_ref as quantize_rows_ref
from pallas_kernels.reference import scaled_matmul_ref as scaled_matmul_ref
