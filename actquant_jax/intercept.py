"""Run an unmodified Flax model with quantized params.

linen: `quantized_apply(model)` returns apply(qparams, *args, **kwargs) that runs
model.apply under method interception: every nn.Dense whose `kernel` is a
QuantizedKernel runs w8a8_dot instead of its float matmul; every other module (float-
kept Dense layers included) runs its own code. Works under jax.jit; the interception
is trace-time only.

nnx: `quantize_model(model, stats, config)` swaps each calibrated nnx.Linear for a
QuantizedLinear holding its quantized kernel (in place, or on a copy).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
from flax import nnx

from actquant_jax import _hooks
from actquant_jax.config import QuantConfig
from actquant_jax.layers import QuantizedLinear, quantized_dense_call
from actquant_jax.quant import QuantizedKernel
from actquant_jax.transform import quantize_params


def _dense_interceptor(backend: str, interpret: bool):
  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name != "__call__" or type(mod) is not nn.Dense:
      return next_fun(*args, **kwargs)
    if not mod.has_variable("params", "kernel"):  # init, or params missing: Flax's own errors
      return next_fun(*args, **kwargs)
    kernel = mod.get_variable("params", "kernel")
    if not isinstance(kernel, QuantizedKernel):
      return next_fun(*args, **kwargs)
    bias = mod.get_variable("params", "bias") if mod.use_bias else None
    path = "/".join(mod.path)
    return quantized_dense_call(args[0], kernel, bias, dtype=mod.dtype, param_dtype=mod.param_dtype,
                                backend=backend, interpret=interpret, name=path)
  return interceptor


def quantized_apply(model: nn.Module, *, method: str | Callable | None = None, backend: str = "auto",
                    interpret: bool = False) -> Callable:
  """apply(qparams, *args, **kwargs) -> model.apply(qparams, *args, method=method, **kwargs)
  with each quantized nn.Dense routed to w8a8_dot. backend / interpret: as w8a8_dot."""
  if not isinstance(model, nn.Module):
    raise TypeError(f"quantized_apply: expected a linen Module, got {type(model).__name__} "
                    "(for nnx use aq.quantize_model)")
  interceptor = _dense_interceptor(backend, interpret)

  def apply(qparams, *args, **kwargs):
    with nn.intercept_methods(interceptor):
      return model.apply(qparams, *args, method=method, **kwargs)

  return apply


def quantize_model(model: nnx.Module, stats, config: QuantConfig = QuantConfig(), *, copy: bool = False,
                   backend: str = "auto", interpret: bool = False, return_report: bool = False):
  """Quantize an nnx model: each calibrated nnx.Linear becomes a QuantizedLinear holding
  its QuantizedKernel, and producers that absorbed 1/s get their new params. In place
  unless copy=True (which clones first).

  Memory: the quantized tree is built from the model's own param arrays (no float copy
  of the model), so the peak is the float params plus the int8 kernels (~1.25x for f32),
  and the float kernels are released when the Linear modules are swapped out.
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"quantize_model: expected an nnx Module, got {type(model).__name__}")
  if copy:
    model = nnx.clone(model)
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  result = quantize_params(pure, stats, config, return_report=return_report)
  qpure, report = result if return_report else (result, None)
  del pure

  for path, m in _module_index(model).items():
    node = _lookup(qpure, path)
    if not isinstance(node, dict):
      continue
    if isinstance(node.get("kernel"), QuantizedKernel):
      parent_path, _, name = path.rpartition("/")
      parent = _module_index(model)[parent_path] if parent_path else model
      _set_child(parent, name, QuantizedLinear.from_linear(m, node["kernel"], node.get("bias"),
                                                           backend=backend, interpret=interpret))
      continue
    for pname, value in node.items():  # folded producers (norm scale/bias, Dense columns)
      var = getattr(m, pname, None)
      if isinstance(var, nnx.Param) and not isinstance(value, dict):
        var.set_value(value)
  return (model, report) if return_report else model


def _module_index(model) -> dict[str, nnx.Module]:
  return {"/".join(str(p) for p in path): m for path, m in nnx.iter_graph(model)
          if isinstance(m, nnx.Module) and path}


def _lookup(tree, path: str):
  node = tree
  for part in path.split("/"):
    if not isinstance(node, dict):
      return None
    key = part if part in node else (int(part) if part.isdigit() and int(part) in node else None)
    if key is None:
      return None
    node = node[key]
  return node


def _set_child(parent, name: str, child):
  if isinstance(parent, (list, nnx.List)) and name.isdigit():
    parent[int(name)] = child
  elif isinstance(parent, dict):
    parent[name] = child
  else:
    setattr(parent, name, child)
