"""w8a8_dot: the quantized matmul behind every quantized Dense.

It checks its inputs, takes the kernel backends.choose picks for the problem (once per
problem: the Pallas kernels on GPU, the native int8 GEMM and quantize pass on an x86-64
CPU with AVX512-VNNI or AVX2, XLA's int8 dot elsewhere) and runs its stages. Every kernel
computes the numbers defined in pallas_kernels/reference.py.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from actquant_jax import backends
from actquant_jax.errors import QuantizationError, QuantizationTypeError
from actquant_jax.quant import QuantizedKernel

Backend = Literal["auto", "xla", "cpu", "triton", "mosaic"]
BACKENDS = backends.NAMES


def choose_kernel(qk: QuantizedKernel, *, m: int | None = None, out_dtype=None, backend: str = "auto",
                  interpret: bool = False) -> backends.W8A8Kernel:
  """The W8A8 kernel for x (m, K) @ qk on this process's device: backends.choose (each
  backend says whether it can run the problem and why not; "auto" picks by platform, GPU
  generation and shape, once per problem, logged; the kernel says what runs each stage)."""
  problem = backends.problem_for(k=qk.in_features, qtype=qk.qtype, m=m, n=qk.out_features, out_dtype=out_dtype,
                                 interpret=interpret, act=qk.act_mode)
  return backends.choose(backend, problem)


def check_bias(bias, out_features: int, name: str):
  """bias must be None or an (N,) float array; a list or tuple is refused by name."""
  if bias is None:
    return
  if not hasattr(bias, "shape") or not hasattr(bias, "dtype"):
    raise QuantizationTypeError(f"{name}: bias must be a jax/numpy array of shape ({out_features},), got a "
                                f"{type(bias).__name__}: pass jnp.asarray(bias, jnp.float32)")
  if not jnp.issubdtype(bias.dtype, jnp.floating):
    raise QuantizationTypeError(f"{name}: bias must be floating point, got {bias.dtype}")
  if tuple(bias.shape) != (out_features,):
    raise QuantizationError(f"{name}: bias must have shape ({out_features},), got {tuple(bias.shape)}")


def check_inputs(x: jax.Array, qk: QuantizedKernel, bias, name: str):
  """x (..., K) float, qk a QuantizedKernel, bias None or (N,) float; else a named error."""
  if not isinstance(qk, QuantizedKernel):
    raise QuantizationTypeError(f"{name}: expected a QuantizedKernel, got {type(qk).__name__}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise QuantizationTypeError(f"{name}: activations must be floating point, got {x.dtype}")
  if x.ndim < 1 or x.shape[-1] != qk.in_features:
    raise QuantizationError(f"{name}: input of shape {x.shape} does not match the kernel: expected last "
                            f"dim {qk.in_features} (kernel (in, out) = {qk.shape})")
  check_bias(bias, qk.out_features, name)


def quantize_activations(x2d: jax.Array, qk: QuantizedKernel, *, backend: str = "xla",
                         interpret: bool = False):
  """(M, K) float -> (xq (M, K), sx (M,)) for `qk`'s activation mode, inverse smoothing
  applied first; a row holding NaN or Inf gets sx = NaN (backend "xla": the reference
  formulas; another backend's pass may mark such rows in xq instead, see W8A8Kernel)."""
  kernel = choose_kernel(qk, m=x2d.shape[0], backend=backend, interpret=interpret)
  return kernel.quantize(x2d, qk.inv_smooth, qk.act_scale, rotate=qk.rotated)


def settings_mismatch(qk: QuantizedKernel, first: QuantizedKernel) -> jax.Array:
  """0, or NaN where qk's activation settings differ from those of `first`, the member of
  its act_group whose quantization it shares (added to the shared scales: an edited
  member gives NaN outputs, never another layer's quantization). A comparison of two
  (K,) vectors: nothing over x."""
  if (qk.qtype, qk.act_scale is None, qk.inv_smooth is None, qk.rotated) != (
      first.qtype, first.act_scale is None, first.inv_smooth is None, first.rotated):
    return jnp.float32(jnp.nan)
  same = jnp.bool_(True)
  for a, b in ((qk.act_scale, first.act_scale), (qk.inv_smooth, first.inv_smooth)):
    if a is not None:
      same &= jnp.all(a == b)
  return jnp.where(same, jnp.float32(0.0), jnp.float32(jnp.nan))


def w8a8_dot(x: jax.Array, qk: QuantizedKernel, bias: jax.Array | None = None, *,
             out_dtype=None, backend: str = "auto", interpret: bool = False,
             name: str = "w8a8_dot") -> jax.Array:
  """y = x @ W (+ bias) with both operands in 8 bits.

  x: (..., K) float, any number of leading batch dims. qk: a QuantizedKernel for a (K, N)
  kernel. Activations are quantized per token (dynamic) or with qk.act_scale (static),
  after multiplying by qk.inv_smooth if present. The product accumulates in int32 (fp8:
  f32) and is scaled as (acc * sw[n]) * sx[m] + bias in f32, then cast to `out_dtype`
  (default: x.dtype).

  backend: "auto" (by platform, GPU generation and shape, see actquant_jax/backends.py; on
  CPU the native int8 GEMM (AVX512-VNNI or AVX2) and quantize pass where they run, else XLA), "xla"
  (XLA only), "cpu", "triton" or "mosaic" (Hopper wgmma). `choose_kernel` shows the choice.
  interpret=True runs the Pallas kernels on the CPU (slow; tests).
  A row of x holding NaN or Inf gives a non-finite output row (its scale is NaN) in every
  mode and backend. K is unbounded up to reference.MAX_K: beyond 65536 the int8 product is
  accumulated in int32 chunks and combined exactly (see pallas_kernels/reference.py).
  """
  x = jnp.asarray(x)
  check_inputs(x, qk, bias, name)
  out_dtype = x.dtype if out_dtype is None else out_dtype
  x2d = x.reshape(-1, qk.in_features)
  kernel = choose_kernel(qk, m=x2d.shape[0], out_dtype=out_dtype, backend=backend, interpret=interpret)
  y = kernel.dot(x2d, qk, bias, out_dtype)
  return y.reshape(*x.shape[:-1], qk.out_features)
