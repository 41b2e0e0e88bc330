"""Framework adapters: run a Flax model (linen or nnx) with hooks on its Dense layers and
on the outputs of its modules, without editing the model's code.

linen: `nn.intercept_methods`. nnx: the `__call__` of nnx.Linear / LayerNorm / RMSNorm is
patched for the duration of one trace (nnx has no method interception).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import flax.linen as nn
from flax import nnx


def producer_kind(module) -> str:
  if isinstance(module, (nn.LayerNorm, nnx.LayerNorm)):
    return "layernorm"
  if isinstance(module, (nn.RMSNorm, nnx.RMSNorm)):
    return "rmsnorm"
  if isinstance(module, (nn.Dense, nnx.Linear)):
    return "dense"
  return "module"


def is_dense(module) -> bool:
  # Exactly nn.Dense / nnx.Linear (and our own quantized versions): subclasses may change
  # the math.
  from actquant_jax import layers
  return type(module) in (nn.Dense, nnx.Linear, layers.QuantizedDense, layers.QuantizedLinear)


def is_nnx(model) -> bool:
  return isinstance(model, nnx.Module)


def call_model(fn, batch):
  """Batches are an array (fn(x)), a tuple/list (fn(*batch)) or a dict (fn(**batch))."""
  if isinstance(batch, dict):
    return fn(**batch)
  if isinstance(batch, (tuple, list)):
    return fn(*batch)
  return fn(batch)


@dataclasses.dataclass
class Hooks:
  """on_dense(path, module, x, call) -> y replaces a Dense call (call(x) runs the original);
  on_output(path, kind, out) -> out sees every hooked module's output."""

  on_dense: Callable[[str, Any, Any, Callable], Any] | None = None
  on_output: Callable[[str, str, Any], Any] | None = None


@contextlib.contextmanager
def _linen_hooks(hooks: Hooks):
  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name != "__call__" or not mod.path:  # the root model itself
      return next_fun(*args, **kwargs)
    path = "/".join(str(p) for p in mod.path)
    if hooks.on_dense is not None and is_dense(mod):
      out = hooks.on_dense(path, mod, args[0], lambda x: next_fun(x, *args[1:], **kwargs))
    else:
      out = next_fun(*args, **kwargs)
    if hooks.on_output is not None:
      out = hooks.on_output(path, producer_kind(mod), out)
    return out

  with nn.intercept_methods(interceptor):
    yield


def nnx_module_paths(model) -> dict[int, str]:
  return {id(m): "/".join(str(p) for p in path)
          for path, m in nnx.iter_graph(model) if isinstance(m, nnx.Module) and path}


@contextlib.contextmanager
def _nnx_hooks(model, hooks: Hooks):
  from actquant_jax import layers
  paths = nnx_module_paths(model)
  classes = [nnx.Linear, layers.QuantizedLinear, nnx.LayerNorm, nnx.RMSNorm]
  originals = {cls: cls.__call__ for cls in classes}

  def make(cls):
    orig = originals[cls]

    def patched(self, x, *args, **kwargs):
      path = paths.get(id(self))
      if path is None:
        return orig(self, x, *args, **kwargs)
      if hooks.on_dense is not None and is_dense(self):
        out = hooks.on_dense(path, self, x, lambda v: orig(self, v, *args, **kwargs))
      else:
        out = orig(self, x, *args, **kwargs)
      if hooks.on_output is not None:
        out = hooks.on_output(path, producer_kind(self), out)
      return out
    return patched

  try:
    for cls in classes:
      cls.__call__ = make(cls)
    yield
  finally:
    for cls, f in originals.items():
      cls.__call__ = f


def hooked_forward(model, forward: Callable | None, hooks: Hooks):
  """A pure function (variables, batch) -> output that runs the model with `hooks`.

  linen: variables are the model's variables ({"params": ...}); default forward is
  model.apply(variables, batch). nnx: variables is the model's nnx.State; the model is
  rebuilt from it inside, so the function can be jitted.
  """
  if is_nnx(model):
    graphdef = nnx.graphdef(model)

    def run(state, batch):
      m = nnx.merge(graphdef, state)
      with _nnx_hooks(m, hooks):
        return call_model(m, batch) if forward is None else forward(m, batch)
    return run

  def run(variables, batch):
    with _linen_hooks(hooks):
      if forward is None:
        return call_model(lambda *a, **k: model.apply(variables, *a, **k), batch)
      return forward(variables, batch)
  return run


def model_variables(model, params):
  """What hooked_forward's function takes: linen variables, or the nnx model's state."""
  if is_nnx(model):
    return nnx.state(model)
  if params is None:
    raise ValueError("a linen model needs its params (the variables dict from model.init)")
  return params
