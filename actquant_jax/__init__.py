"""actquant-jax: W8A8 (int8 and FP8 e4m3) activation quantization for JAX/Flax."""

from actquant_jax.ops import w8a8_dot as w8a8_dot
from actquant_jax.ops import quantize_activations as quantize_activations
from actquant_jax.quant import QArray as QArray
from actquant_jax.quant import QuantizedKernel as QuantizedKernel
from actquant_jax.quant import compute_scale as compute_scale
from actquant_jax.quant import dequantize as dequantize
from actquant_jax.quant import quantize as quantize
from actquant_jax.quant import quantize_kernel as quantize_kernel
from actquant_jax.quant import qtype_dtype as qtype_dtype
from actquant_jax.quant import qtype_max as qtype_max

__version__ = "0.1.0"
