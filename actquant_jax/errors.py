"""The library's named errors, in one place.

Every bad input the library can recognise ends in one of these (never in a numpy, JSON,
zip or Pallas message). Each also derives from the builtin a caller would have caught
before it existed (ValueError, TypeError, RuntimeError), so `except ValueError` still works.

The root ActquantError, the backend errors and the kernel errors (KernelArgumentError,
KernelTypeError) are defined in pallas_kernels/errors.py, a module that imports nothing,
and re-exported here: the kernel packages raise them, and importing actquant_jax.errors
from there would run actquant_jax/__init__.py, which imports the kernel packages (a cycle).
"""

from __future__ import annotations

from pallas_kernels.errors import ActquantError as ActquantError
from pallas_kernels.errors import BackendError as BackendError
from pallas_kernels.errors import BackendUnavailableError as BackendUnavailableError
from pallas_kernels.errors import KernelArgumentError as KernelArgumentError
from pallas_kernels.errors import KernelTypeError as KernelTypeError


class QuantizationError(ActquantError, ValueError):
  """Arguments of quantize / quantize_kernel / w8a8_dot / the layers are invalid (shape,
  rank, scale, K too large for exact accumulation, non-finite weights)."""


class QuantizationTypeError(QuantizationError, TypeError):
  """An argument has the wrong type (e.g. a Python list as bias, an int activation)."""


class CalibrationError(ActquantError, ValueError):
  """Calibration inputs or stats are unusable (empty batch, damaged stats file, ...)."""


class StatsFileError(CalibrationError):
  """A stats file that cannot be read back (damaged, or not written by save_stats)."""


class CheckpointError(ActquantError, ValueError):
  """A checkpoint cannot be written or read: not a checkpoint, corrupt or truncated data
  or metadata, another model or config, or an overwrite the library refuses."""


class CheckpointExistsError(CheckpointError, FileExistsError):
  """save_checkpoint: the target exists and overwrite=False."""


class CheckpointTypeError(CheckpointError, TypeError):
  """save_checkpoint: the tree holds a node type a checkpoint cannot hold."""


class ModelConfigError(ActquantError, ValueError):
  """A checkpoint (config.json, GGUF metadata or weights) asks for something the bundled
  model code does not implement: an unknown field that changes the math, an unsupported
  value, a missing or leftover tensor. Never a silent default."""


class ModelArgumentError(ActquantError, ValueError):
  """A bundled model (actquant_jax.models) is called or loaded with an argument it cannot
  take: logits_to_keep, generate's lengths or model, a dtype, encode without a tokenizer."""
