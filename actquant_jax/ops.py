"""w8a8_dot: the quantized matmul behind every quantized Dense.

On GPU it runs the Pallas kernels (pallas_kernels). On an x86-64 CPU with AVX512-VNNI
the int8 GEMM is the native kernel in cpu_kernels or XLA's (backends.py), and dynamic
int8 quantization is cpu_kernels.quantize_rows (static's elementwise pass and the epilogue
stay XLA fusions); elsewhere the XLA path: int8 `lax.dot_general` with int32 accumulation (fp8:
f32 accumulation). All compute the numbers defined in pallas_kernels/reference.py.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

import cpu_kernels
from actquant_jax import backends
from actquant_jax.errors import QuantizationError, QuantizationTypeError
from actquant_jax.quant import QuantizedKernel, qtype_dtype
from pallas_kernels import reference as ref

Backend = Literal["auto", "xla", "cpu", "triton", "mosaic"]
BACKENDS = backends.NAMES


def resolve_backend(backend: str, interpret: bool = False, qtype: str = "int8", in_features: int = 0, *,
                    m: int | None = None, n: int | None = None, out_dtype=None) -> str:
  """The backend name for a problem on this process's device: backends.choose (a registry
  where each backend says whether it can run the problem and why not; "auto" picks by GPU
  generation and shape, once per problem, logged)."""
  if in_features > ref.MAX_K:
    raise QuantizationError(f"K = {in_features} is above the {ref.MAX_K} input features whose int8 "
                            "accumulation this library keeps exact")
  problem = backends.problem_for(k=in_features, qtype=qtype, m=m, n=n, out_dtype=out_dtype,
                                 interpret=interpret)
  return backends.choose(backend, problem).backend


def _accumulate_chunk(xq: jax.Array, wq: jax.Array, *, backend: str, interpret: bool = False) -> jax.Array:
  if backend == "xla":
    return ref.accumulate_ref(xq, wq)
  if backend == "cpu":
    return cpu_kernels.s8_gemm(xq, wq)[0]
  from pallas_kernels import fp8_matmul, int8_matmul
  mm = int8_matmul if xq.dtype == jnp.int8 else fp8_matmul
  # The raw accumulator comes from the Triton kernel (the Mosaic one always scales).
  return mm(xq, wq, backend="triton", interpret=interpret)


def accumulate(xq: jax.Array, wq: jax.Array, *, backend: str, interpret: bool = False) -> jax.Array:
  """xq (M, K) @ wq (N, K)^T on a resolved backend: int8 -> int32 for K <= ref.K_CHUNK,
  beyond it the exact sum rounded once to f32 (int32 chunks, see reference.py); fp8 -> f32."""
  return ref.accumulate_chunked(xq, wq, functools.partial(_accumulate_chunk, backend=backend, interpret=interpret))


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


def _check_inputs(x: jax.Array, qk: QuantizedKernel, bias, name: str):
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
  applied first; a row holding NaN or Inf gets sx = NaN."""
  return _quantize(x2d, qk, backend if backend != "cpu" else "xla", interpret)


def settings_mismatch(qk: QuantizedKernel, first: QuantizedKernel) -> jax.Array:
  """0, or NaN where qk's activation settings differ from those of `first`, the member of
  its act_group whose quantization it shares (added to the shared scales: an edited
  member gives NaN outputs, never another layer's quantization). A comparison of two
  (K,) vectors: nothing over x."""
  if (qk.qtype, qk.act_scale is None, qk.inv_smooth is None) != (first.qtype, first.act_scale is None,
                                                                  first.inv_smooth is None):
    return jnp.float32(jnp.nan)
  same = jnp.bool_(True)
  for a, b in ((qk.act_scale, first.act_scale), (qk.inv_smooth, first.inv_smooth)):
    if a is not None:
      same &= jnp.all(a == b)
  return jnp.where(same, jnp.float32(0.0), jnp.float32(jnp.nan))


def _marks_nonfinite(qk: QuantizedKernel, backend: str) -> bool:
  """Whether non-finite inputs are quantized to reference.NONFINITE_MARK (the GEMM step
  then flags those rows) rather than found by the scale: on the native GEMM, which flags
  them while it reads x, always; on XLA in static mode where the native library can scan
  the int8 xq (cpu_kernels.marked_rows, one pass over bytes). An XLA reduction for it, or
  the float probe, cost MiniLM static 1.5x vs 2.5x FP32 unchecked (XLA fused x's
  producers into it)."""
  if qk.qtype != "int8" or backend not in ("cpu", "xla"):
    return False
  return backend == "cpu" or (qk.act_scale is not None and jax.default_backend() == "cpu"
                              and cpu_kernels.available())


def _quantizes_natively(qk: QuantizedKernel, backend: str) -> bool:
  """Whether dynamic int8 quantization runs as cpu_kernels.quantize_rows (one native pass
  over x, the same numbers): on a CPU with the native library. XLA splits it into a
  reduction and an elementwise fusion, each reading x and recomputing x's producer (an
  erf GELU three times over on MiniLM: 10x the native pass's time)."""
  return (qk.qtype == "int8" and qk.act_scale is None and backend in ("xla", "cpu")
          and jax.default_backend() == "cpu" and cpu_kernels.available())


def _quantize(x2d, qk: QuantizedKernel, backend: str, interpret: bool):
  """quantize_activations as the backend's GEMM wants it (see _marks_nonfinite)."""
  dtype = qtype_dtype(qk.qtype)
  if _quantizes_natively(qk, backend):
    inv = None if qk.inv_smooth is None else qk.inv_smooth.astype(jnp.float32)
    return cpu_kernels.quantize_rows(x2d.astype(jnp.float32), inv)
  if backend in ("xla", "cpu"):
    nonfinite = "mark" if _marks_nonfinite(qk, backend) else "scale"
    return ref.quantize_rows_ref(x2d, qk.inv_smooth, dtype=dtype, scale=qk.act_scale, nonfinite=nonfinite)
  from pallas_kernels import quantize_rows
  return quantize_rows(x2d, qk.inv_smooth, scale=qk.act_scale, dtype=dtype, backend=backend,
                       interpret=interpret)


def _xla_w8a8(xq, sx, qk: QuantizedKernel, bias, out_dtype):
  if xq.shape[0] == 1 and jax.default_backend() == "cpu":
    # XLA CPU's int8 matrix-vector product is ~15x slower than its GEMM at two rows.
    y = ref.scaled_matmul_ref(jnp.pad(xq, ((0, 1), (0, 0))), qk.values, jnp.pad(sx, (0, 1)), qk.scale, bias,
                              out_dtype)
    return y[:1]
  # (Row blocks for big outputs, so the int32 accumulator stays in cache, were measured:
  # +0-10% on a lone GEMM, but -4% and +60% peak memory inside MiniLM; not kept.)
  return ref.scaled_matmul_ref(xq, qk.values, sx, qk.scale, bias, out_dtype)


def w8a8_dot(x: jax.Array, qk: QuantizedKernel, bias: jax.Array | None = None, *,
             out_dtype=None, backend: str = "auto", interpret: bool = False,
             name: str = "w8a8_dot") -> jax.Array:
  """y = x @ W (+ bias) with both operands in 8 bits.

  x: (..., K) float, any number of leading batch dims. qk: a QuantizedKernel for a (K, N)
  kernel. Activations are quantized per token (dynamic) or with qk.act_scale (static),
  after multiplying by qk.inv_smooth if present. The product accumulates in int32 (fp8:
  f32) and is scaled as (acc * sw[n]) * sx[m] + bias in f32, then cast to `out_dtype`
  (default: x.dtype).

  backend: "auto" (by GPU generation and shape, see actquant_jax/backends.py; on CPU the
  native AVX512-VNNI int8 GEMM where it runs, else XLA), "xla", "cpu", "triton" or
  "mosaic" (Hopper wgmma).
  interpret=True runs the Pallas kernels on the CPU (slow; tests).
  A row of x holding NaN or Inf gives a non-finite output row (its scale is NaN) in every
  mode and backend. K is unbounded up to reference.MAX_K: beyond 65536 the int8 product is
  accumulated in int32 chunks and combined exactly (see pallas_kernels/reference.py).
  """
  return _w8a8_dot(x, qk, bias, out_dtype, backend, interpret, name, _quantize)


def _w8a8_dot(x, qk: QuantizedKernel, bias, out_dtype, backend: str, interpret: bool, name: str, quantize):
  """w8a8_dot with its activation quantization given as quantize(x2d, qk, backend,
  interpret) -> (xq, sx): the intercept shares one among the layers of an act_group."""
  x = jnp.asarray(x)
  _check_inputs(x, qk, bias, name)
  out_dtype = x.dtype if out_dtype is None else out_dtype
  backend = resolve_backend(backend, interpret, qk.qtype, qk.in_features, m=math.prod(x.shape[:-1]),
                            n=qk.out_features, out_dtype=out_dtype)
  lead = x.shape[:-1]
  x2d = x.reshape(-1, qk.in_features)
  xq, sx = quantize(x2d, qk, backend, interpret)
  if backend == "xla":
    y = _xla_w8a8(xq, sx + cpu_kernels.marked_rows(xq) if _marks_nonfinite(qk, backend) else sx, qk, bias, out_dtype)
  elif backend == "cpu":
    # (K <= cpu_kernels.MAX_K here: the backend registry sends larger K to "xla")
    acc, marked = cpu_kernels.s8_gemm(xq, qk.values)
    y = ref.epilogue_ref(acc, sx + marked, qk.scale, bias, out_dtype)
  elif xq.dtype == jnp.int8 and qk.in_features > ref.K_CHUNK:
    # (the fused Pallas kernels keep one int32 accumulator: past K_CHUNK their raw
    # accumulators are taken per chunk and combined, then the same epilogue)
    y = ref.epilogue_ref(accumulate(xq, qk.values, backend=backend, interpret=interpret), sx, qk.scale, bias,
                         out_dtype)
  else:
    from pallas_kernels import scaled_matmul
    y = scaled_matmul(xq, qk.values, sx, qk.scale, bias, out_dtype=out_dtype, backend=backend,
                      interpret=interpret)
  return y.reshape(*lead, qk.out_features)
