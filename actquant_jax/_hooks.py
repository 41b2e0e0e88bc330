"""Small helpers shared by calibration and inference: linen or nnx, how a batch is fed,
what variables a model's traced function takes. (The capture of weight matmuls itself is
in _capture.)"""

from __future__ import annotations

from flax import nnx


def is_nnx(model) -> bool:
  return isinstance(model, nnx.Module)


def call_model(fn, batch):
  """Batches are an array (fn(x)), a tuple/list (fn(*batch)) or a dict (fn(**batch))."""
  if isinstance(batch, dict):
    return fn(**batch)
  if isinstance(batch, (tuple, list)):
    return fn(*batch)
  return fn(batch)


def model_variables(model, params):
  """What the traced model function takes: linen variables, or the nnx model's state."""
  if is_nnx(model):
    return nnx.state(model)
  if params is None:
    raise ValueError("a linen model needs its params (the variables dict from model.init)")
  return params
