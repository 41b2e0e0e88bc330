"""actquant-jax: W8A8 (int8 and FP8 e4m3) activation quantization for JAX/Flax.

  stats   = aq.calibrate(model, params, batches)
  qparams = aq.quantize_params(params, stats, aq.QuantConfig())
  y = jax.jit(aq.quantized_apply(model))(qparams, x)
"""

from actquant_jax.calibrate import LayerStats as LayerStats
from actquant_jax.errors import StatsFileError as StatsFileError
from actquant_jax.calibrate import calibrate as calibrate
from actquant_jax.calibrate import load_stats as load_stats
from actquant_jax.calibrate import merge_stats as merge_stats
from actquant_jax.calibrate import save_stats as save_stats
from actquant_jax.checkpoint import restore_checkpoint as restore_checkpoint
from actquant_jax.checkpoint import save_checkpoint as save_checkpoint
from actquant_jax.config import LayerRule as LayerRule
from actquant_jax.errors import ActquantError as ActquantError
from actquant_jax.errors import BackendError as BackendError
from actquant_jax.errors import BackendUnavailableError as BackendUnavailableError
from actquant_jax.errors import CalibrationError as CalibrationError
from actquant_jax.errors import CheckpointError as CheckpointError
from actquant_jax.errors import CheckpointExistsError as CheckpointExistsError
from actquant_jax.errors import CheckpointTypeError as CheckpointTypeError
from actquant_jax.errors import KernelArgumentError as KernelArgumentError
from actquant_jax.errors import KernelTypeError as KernelTypeError
from actquant_jax.errors import ModelArgumentError as ModelArgumentError
from actquant_jax.errors import ModelConfigError as ModelConfigError
from actquant_jax.errors import QuantizationError as QuantizationError
from actquant_jax.errors import QuantizationTypeError as QuantizationTypeError
from actquant_jax.config import QuantConfig as QuantConfig
from actquant_jax.intercept import quantize_model as quantize_model
from actquant_jax.intercept import quantize_model_with_report as quantize_model_with_report
from actquant_jax.intercept import quantized as quantized
from actquant_jax.intercept import quantized_apply as quantized_apply
from actquant_jax.layers import QuantizedDense as QuantizedDense
from actquant_jax.layers import QuantizedLinear as QuantizedLinear
from actquant_jax.ops import quantize_activations as quantize_activations
from actquant_jax.ops import w8a8_dot as w8a8_dot
from actquant_jax.quant import QArray as QArray
from actquant_jax.quant import QuantizedKernel as QuantizedKernel
from actquant_jax.quant import compute_scale as compute_scale
from actquant_jax.quant import dequantize as dequantize
from actquant_jax.quant import qtype_dtype as qtype_dtype
from actquant_jax.quant import qtype_max as qtype_max
from actquant_jax.quant import quantize as quantize
from actquant_jax.quant import quantize_kernel as quantize_kernel
from actquant_jax.report import LayerReport as LayerReport
from actquant_jax.report import format_report as format_report
from actquant_jax.report import report_summary as report_summary
from actquant_jax.sharding import quantized_partition_specs as quantized_partition_specs
from actquant_jax.sharding import shard_quantized as shard_quantized
from actquant_jax.sharding import sharded_w8a8_dot as sharded_w8a8_dot
from actquant_jax.transform import quantize_params as quantize_params
from actquant_jax.transform import quantize_params_with_report as quantize_params_with_report
from actquant_jax.transform import smooth_params as smooth_params

__version__ = "0.1.0"
