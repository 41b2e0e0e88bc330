"""The library's named errors, in one place.

Every bad input the library can recognise ends in one of these (never in a numpy, JSON,
zip or Pallas message). Each also derives from the builtin a caller would have caught
before it existed (ValueError, TypeError, RuntimeError), so `except ValueError` still works.
"""

from __future__ import annotations


class ActquantError(Exception):
  """Base class of every error actquant-jax raises on purpose."""


class QuantizationError(ActquantError, ValueError):
  """Arguments of quantize / quantize_kernel / w8a8_dot / the layers are invalid (shape,
  rank, scale, K too large for exact accumulation, non-finite weights)."""


class QuantizationTypeError(QuantizationError, TypeError):
  """An argument has the wrong type (e.g. a Python list as bias, an int activation)."""


class BackendError(ActquantError, ValueError):
  """A backend cannot run this problem (wrong qtype, K, device); the message names one that can."""


class BackendUnavailableError(BackendError, RuntimeError):
  """The backend does not exist on this machine (no GPU, no AVX512-VNNI, no compiler)."""


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
