"""Flax modules: linen QuantizedDense and nnx QuantizedLinear, plus the nnx model swap.

Both keep Flax's names and signatures (`kernel` (in, out), `bias`, `dtype`,
`param_dtype`). The `kernel` param holds either a float array or a QuantizedKernel:
- a QuantizedKernel (from quantize_params / quantize_model) runs w8a8_dot;
- a float kernel with `quantize=False` is exactly nn.Dense / nnx.Linear;
- a float kernel with `quantize=True` is quantized on the fly (per output channel,
  dynamic per-token activations, no smoothing) -- handy before calibration.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen.dtypes import promote_dtype

from actquant_jax.errors import QuantizationError, QuantizationTypeError
from actquant_jax.ops import check_bias, w8a8_dot
from actquant_jax.quant import QuantizedKernel, quantize_kernel

default_kernel_init = nn.initializers.lecun_normal()


def quantized_dense_call(x, kernel, bias, *, dtype, param_dtype, qtype="int8", backend="auto",
                         interpret=False, name="dense"):
  """y = x @ kernel + bias for a QuantizedKernel (or a float kernel quantized on the fly).
  The output dtype follows Flax Dense: `dtype` if set, else the promotion of x and params."""
  if not isinstance(kernel, QuantizedKernel):
    kernel = quantize_kernel(kernel, qtype, name=name)
  out_dtype = dtype if dtype is not None else jnp.result_type(
      x.dtype, param_dtype, *(() if bias is None else (bias.dtype,)))
  if dtype is not None:
    x = x.astype(dtype)
  return w8a8_dot(x, kernel, bias, out_dtype=out_dtype, backend=backend, interpret=interpret, name=name)


def float_dense_call(x, kernel, bias, *, dtype, precision):
  """nn.Dense / nnx.Linear's own math, step for step (so quantize=False is exact)."""
  x, kernel, bias = promote_dtype(x, kernel, bias, dtype=dtype)
  y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
  if bias is not None:
    y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
  return y


class QuantizedDense(nn.Module):
  """nn.Dense with W8A8 math. Same fields as nn.Dense plus `quantize` (False: exactly
  nn.Dense for a float kernel), `qtype` (on-the-fly quantization type), `backend`,
  `interpret`."""

  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Any = default_kernel_init
  bias_init: Any = nn.initializers.zeros_init()
  quantize: bool = True
  qtype: str = "int8"
  backend: str = "auto"
  interpret: bool = False

  @nn.compact
  def __call__(self, inputs):
    if self.has_variable("params", "kernel") and isinstance(self.get_variable("params", "kernel"), QuantizedKernel):
      kernel = self.get_variable("params", "kernel")  # self.param would compare its leaves' shapes
    else:
      kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    if isinstance(kernel, QuantizedKernel) or self.quantize:
      return quantized_dense_call(inputs, kernel, bias, dtype=self.dtype, param_dtype=self.param_dtype,
                                  qtype=self.qtype, backend=self.backend, interpret=self.interpret,
                                  name="/".join(self.path) or "QuantizedDense")
    return float_dense_call(inputs, kernel, bias, dtype=self.dtype, precision=self.precision)


class QuantizedLinear(nnx.Module):
  """nnx.Linear with W8A8 math; `kernel` is an nnx.Param holding a QuantizedKernel (or a
  float kernel: exactly nnx.Linear when quantize=False)."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True, dtype=None,
               param_dtype=jnp.float32, precision=None, kernel_init=default_kernel_init,
               bias_init=nn.initializers.zeros_init(), quantize: bool = True, qtype: str = "int8",
               backend: str = "auto", interpret: bool = False, rngs: nnx.Rngs | None = None,
               kernel=None, bias=None):
    self.in_features, self.out_features = in_features, out_features
    self.use_bias, self.dtype, self.param_dtype, self.precision = use_bias, dtype, param_dtype, precision
    self.quantize, self.qtype, self.backend, self.interpret = quantize, qtype, backend, interpret
    if kernel is None:
      if rngs is None:
        raise QuantizationError("QuantizedLinear: pass rngs (to initialise) or kernel")
      kernel = kernel_init(rngs.params(), (in_features, out_features), param_dtype)
    if not hasattr(kernel, "shape"):
      raise QuantizationTypeError(f"QuantizedLinear: kernel must be an array or a QuantizedKernel, got a "
                                  f"{type(kernel).__name__}: pass jnp.asarray(kernel)")
    if tuple(kernel.shape) != (in_features, out_features):
      raise QuantizationError(f"QuantizedLinear: kernel shape {tuple(kernel.shape)} != ({in_features}, {out_features})")
    self.kernel = nnx.Param(kernel)
    if use_bias:
      if bias is None:
        if rngs is None:
          raise QuantizationError("QuantizedLinear: pass rngs (to initialise) or bias")
        bias = bias_init(rngs.params(), (out_features,), param_dtype)
      check_bias(bias, out_features, "QuantizedLinear")
      self.bias = nnx.Param(bias)
    else:
      self.bias = nnx.data(None)

  def __call__(self, inputs):
    kernel = self.kernel.get_value()
    bias = self.bias.get_value() if self.use_bias else None
    if isinstance(kernel, QuantizedKernel) or self.quantize:
      return quantized_dense_call(inputs, kernel, bias, dtype=self.dtype, param_dtype=self.param_dtype,
                                  qtype=self.qtype, backend=self.backend, interpret=self.interpret,
                                  name="QuantizedLinear")
    return float_dense_call(inputs, kernel, bias, dtype=self.dtype, precision=self.precision)

  @classmethod
  def from_linear(cls, linear: nnx.Linear, kernel, bias=None, **kwargs) -> "QuantizedLinear":
    """A QuantizedLinear standing in for `linear` with the given (quantized) kernel."""
    return cls(linear.in_features, linear.out_features, use_bias=linear.use_bias, dtype=linear.dtype,
               param_dtype=linear.param_dtype, precision=linear.precision, kernel=kernel,
               bias=bias if bias is not None else (linear.bias.get_value() if linear.use_bias else None), **kwargs)
