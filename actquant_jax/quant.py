"""Quantization core: scales, quantize / dequantize, int8 and float8_e4m3fn.

Symmetric quantization only (zero point 0): that is what a GEMM with outer-dimension
scaling needs, since y = (xq * sx) @ (wq * sw) = (xq @ wq) * sx * sw.

Granularities
  "tensor"   one scale for the whole array
  "channel"  one scale per index of `axis` (any axis), reduced over all others
  "token"    one scale per row: reduced over the last axis only (per token of X[..., K])

A scale is kept with reduced axes as size 1 (keepdims), so `values * scale` broadcasts.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from actquant_jax.errors import QuantizationError, QuantizationTypeError
from pallas_kernels import reference as numerics  # the one definition of the formulas

QType = Literal["int8", "float8_e4m3fn"]
Granularity = Literal["tensor", "channel", "token"]

QTYPES: tuple[str, ...] = ("int8", "float8_e4m3fn")
_DTYPES = {"int8": jnp.int8, "float8_e4m3fn": jnp.float8_e4m3fn}


def check_qtype(qtype: str) -> str:
  if qtype not in QTYPES:
    raise QuantizationError(f"qtype must be one of {QTYPES}, got {qtype!r}")
  return qtype


def qtype_dtype(qtype: str):
  """The storage dtype of a qtype (jnp.int8 or jnp.float8_e4m3fn)."""
  return _DTYPES[check_qtype(qtype)]


def qtype_max(qtype: str) -> float:
  """Largest magnitude quantization produces: 127 for int8 (symmetric: -128 is never
  produced, so negation is exact), 448 for float8_e4m3fn -- reference.py's qmax_of."""
  return numerics.qmax_of(qtype_dtype(qtype))


def qtype_of(dtype) -> str:
  """The qtype name of a storage dtype."""
  for name, dt in _DTYPES.items():
    if jnp.dtype(dtype) == jnp.dtype(dt):
      return name
  raise QuantizationTypeError(f"{jnp.dtype(dtype)} is not a quantized storage dtype; expected one of {QTYPES}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized array: `values * scale` approximates the original.

  values: int8 or float8_e4m3fn storage.
  scale:  float32, broadcastable to `values` (reduced axes kept as size 1).
  qtype:  static name of the storage type ("int8" or "float8_e4m3fn").
  """

  values: jax.Array
  scale: jax.Array
  qtype: str = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self):
    return self.values.shape

  @property
  def ndim(self):
    return self.values.ndim

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    return dequantize(self, dtype)


def _reduce_axes(ndim: int, granularity: str, axis: int) -> tuple[int, ...]:
  if granularity == "tensor":
    return tuple(range(ndim))
  if ndim == 0:
    raise QuantizationError(f"granularity {granularity!r} needs an array with at least one axis")
  if granularity == "token":
    return (ndim - 1,)
  if granularity == "channel":
    if not -ndim <= axis < ndim:
      raise QuantizationError(f"channel axis {axis} out of range for an array of rank {ndim}")
    a = axis % ndim
    return tuple(i for i in range(ndim) if i != a)
  raise QuantizationError(f"granularity must be 'tensor', 'channel' or 'token', got {granularity!r}")


def scale_from_absmax(absmax: jax.Array, qtype: str = "int8") -> jax.Array:
  """absmax * f32(1/qmax); an all-zero group gets scale 1 so it round-trips to zeros
  (pallas_kernels/reference.py: dynamic_scale, the formula of every backend)."""
  absmax = jnp.asarray(absmax, jnp.float32)
  return numerics.dynamic_scale(absmax * numerics.scale_factor(None, qtype_dtype(qtype)))


def compute_scale(x: jax.Array, qtype: str = "int8", *, granularity: str = "tensor",
                  axis: int = -1) -> jax.Array:
  """The symmetric scale of `x` for `granularity`, keepdims shape, float32 (NaN for a
  group holding NaN/Inf)."""
  x = jnp.asarray(x)
  axes = _reduce_axes(x.ndim, granularity, axis)
  x32 = x.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(x32), axis=axes, keepdims=True, initial=0.0)
  return scale_from_absmax(absmax, qtype) + numerics.nonfinite_probe(x32, axes, keepdims=True)


def quantize_with_scale(x: jax.Array, scale: jax.Array, qtype: str = "int8") -> jax.Array:
  """Saturating quantize of x * (1 / scale): int8 rounds half to even and clips to [-127, 127];
  float8_e4m3fn clips to [-448, 448] then casts (round to nearest even)."""
  y = jnp.asarray(x, jnp.float32) * numerics.quantize_factor(None, jnp.asarray(scale, jnp.float32))
  return numerics.saturate_cast(y, qtype_dtype(qtype))


def quantize(x: jax.Array, qtype: str = "int8", *, granularity: str = "tensor",
             axis: int = -1, scale: jax.Array | None = None) -> QArray:
  """Quantize `x` symmetrically. With `scale` given (a static, calibrated scale) it is used
  as is and out-of-range values saturate; otherwise the scale is x's absmax / qmax at
  `granularity`, so no value saturates.

  Guarantee (int8, values inside the range): |x - dequantize(quantize(x))| <= scale / 2.
  """
  check_qtype(qtype)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise QuantizationTypeError(f"quantize expects a floating-point array, got {x.dtype}")
  if scale is None:
    scale = compute_scale(x, qtype, granularity=granularity, axis=axis)
  else:
    scale = jnp.asarray(scale, jnp.float32)
    try:
      jnp.broadcast_shapes(scale.shape, x.shape)
    except ValueError:
      raise QuantizationError(f"scale of shape {scale.shape} does not broadcast to x of shape {x.shape}") from None
    if not isinstance(scale, jax.core.Tracer) and not bool(np.all(np.asarray(scale) > 0)):
      raise QuantizationError(f"quantize: scale must be > 0 everywhere (1/scale multiplies x), got {np.asarray(scale)}")
  return QArray(quantize_with_scale(x, scale, qtype), scale, qtype)


def dequantize(q: QArray, dtype=jnp.float32) -> jax.Array:
  return (q.values.astype(jnp.float32) * q.scale).astype(dtype)


def check_finite(x, what: str) -> None:
  """Raise ValueError naming `what` if a concrete array holds NaN or Inf.

  Inside jit the values are abstract and nothing is checked (documented, not silent:
  the eager entry points -- calibration and weight quantization -- call this).
  """
  if isinstance(x, jax.core.Tracer):
    return
  a = np.asarray(x, dtype=np.float32) if np.asarray(x).dtype != np.float32 else np.asarray(x)
  if not np.all(np.isfinite(a)):
    n_nan = int(np.isnan(a).sum())
    n_inf = int(np.isinf(a).sum())
    raise QuantizationError(f"{what}: contains {n_nan} NaN and {n_inf} Inf values (shape {a.shape})")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
  """What a quantized Dense `kernel` leaf becomes: one pytree node with everything the
  W8A8 matmul needs.

  values:     (N, K) int8 or float8_e4m3fn -- the (K, N) float kernel transposed to
              K-major once at quantize time (8-bit wgmma and the vLLM/CUTLASS kernels
              need it; XLA's dot does not care).
  scale:      (N,) float32, per output channel.
  act_scale:  () float32 static per-tensor activation scale, or None for dynamic
              per-token quantization.
  inv_smooth: (K,) float32 runtime inverse smoothing vector (multiplied into x before it
              is quantized), or None when smoothing is off or was folded into the producer.
  qtype:      static; the activations are quantized to the same type.
  act_group:  static; "" or the name of the layers quantize_params smoothed together
              (one input, one smoothing vector, one static scale: equal in every
              member). In quantized_apply / quantize_model the members reading one
              input share one quantization of it, with the settings of the first; a
              member whose act_scale / inv_smooth were changed by hand alone gives NaN
              outputs there (change every member, or set its act_group to "").
  kept:       a float copy of the weight for other ops that read it, or None. quantize_params
              keeps none: a tied embedding's lookup reads the 8-bit table (row v is
              values[v] * scale[v], the dequantized weight's row; such a weight is not
              smoothed). A QuantizedKernel with a copy (quantize_kernel(keep_float=True),
              older checkpoints) still runs: the copy then serves every read but the matmuls.
  contract, out: static; the weight's contracted axes (flattened, in order, to K) and
              output axes (flattened to N) -- a Dense kernel (K, N) is (0,), (1,); an
              (H, D, N) DenseGeneral kernel over (H, D) is (0, 1), (2,); `x @ W.T` with W
              (N, K) is (1,), (0,).
  param_shape, param_dtype: static; the float weight's shape and dtype (what the model
              code sees; () means (K, N)).
  folded_into: static; the producer modules whose params absorbed 1/s. Running the
              model checks that its input still comes from them alone (else the fold
              would be wrong: qparams from another model's stats).
  dataflow:   static; a digest of the layer's calibrated dataflow (producers, whether
              its input is read elsewhere, contraction); running the model checks it.
  rotated:    static; values hold R^T W for the randomized Hadamard R of K (rotation.py),
              and x is rotated (x R, after inv_smooth) before it is quantized.

  A weight stacked over the L layers of a scan (nn.scan / nnx.scan) is one QuantizedKernel
  whose arrays all have a leading layer axis (values (L, N, K), scale (L, N), act_scale
  (L,), inv_smooth (L, K)); param_shape is the stacked weight's, contract / out one
  layer's axes. `jax.tree.map(lambda a: a[l], qk)` is layer l's arrays.
  """

  values: jax.Array
  scale: jax.Array
  act_scale: jax.Array | None = None
  inv_smooth: jax.Array | None = None
  qtype: str = dataclasses.field(default="int8", metadata=dict(static=True))
  act_group: str = dataclasses.field(default="", metadata=dict(static=True))
  kept: jax.Array | None = None
  contract: tuple = dataclasses.field(default=(0,), metadata=dict(static=True))
  out: tuple = dataclasses.field(default=(1,), metadata=dict(static=True))
  param_shape: tuple = dataclasses.field(default=(), metadata=dict(static=True))
  param_dtype: str = dataclasses.field(default="float32", metadata=dict(static=True))
  folded_into: tuple = dataclasses.field(default=(), metadata=dict(static=True))
  dataflow: str = dataclasses.field(default="", metadata=dict(static=True))
  rotated: bool = dataclasses.field(default=False, metadata=dict(static=True))

  @property
  def in_features(self) -> int:
    return self.values.shape[-1]

  @property
  def out_features(self) -> int:
    return self.values.shape[-2]

  @property
  def shape(self):
    """The (in, out) shape of the float kernel this replaces."""
    return (self.in_features, self.out_features)

  @property
  def float_shape(self) -> tuple:
    """The shape of the float weight this replaces, as the model's code sees it."""
    return tuple(self.param_shape) or self.shape

  @property
  def act_mode(self) -> str:
    return "dynamic" if self.act_scale is None else "static"

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """The (K, N) float kernel this computes with, inverse smoothing included."""
    w = jnp.swapaxes(self.values.astype(jnp.float32), -1, -2) * self.scale[..., None, :]
    if self.rotated:  # R (R^T W)
      from actquant_jax import rotation
      w = rotation.unrotate_weight(w)
    if self.inv_smooth is not None:
      w = w * self.inv_smooth[..., :, None]
    return w.astype(dtype)


def weight_matrix(w, contract=(0,), out=(1,)):
  """A weight of any rank as the (K, N) matrix of its contraction: contracted axes
  flattened to K (in order), output axes to N."""
  shape = np.shape(w)
  k = int(np.prod([shape[a] for a in contract]))
  n = int(np.prod([shape[a] for a in out]))
  if tuple(contract) == (0,) and tuple(out) == (1,) and len(shape) == 2:
    return w
  xp = np if isinstance(w, np.ndarray) else jnp
  return xp.transpose(w, tuple(contract) + tuple(out)).reshape(k, n)


def weight_from_matrix(m, shape, contract=(0,), out=(1,)):
  """Inverse of weight_matrix: the (K, N) matrix back in the weight's own layout."""
  if tuple(contract) == (0,) and tuple(out) == (1,) and len(shape) == 2:
    return m
  xp = np if isinstance(m, np.ndarray) else jnp
  order = tuple(contract) + tuple(out)
  t = xp.reshape(m, [shape[a] for a in order])
  return xp.transpose(t, tuple(int(i) for i in np.argsort(order)))


def quantize_kernel(kernel: jax.Array, qtype: str = "int8", *,
                    act_scale: jax.Array | float | None = None,
                    inv_smooth: jax.Array | None = None,
                    name: str = "kernel", contract: tuple = (0,), out: tuple = (1,),
                    keep_float: bool = False) -> QuantizedKernel:
  """Quantize a float weight per output channel into a QuantizedKernel.

  A Dense kernel (K, N) by default; any weight with `contract` / `out` naming its
  contracted and output axes (see QuantizedKernel). keep_float: also keep the float
  weight (for other ops that read it).

  `kernel` is the already-smoothed weight (diag(s) W) when smoothing is used; `inv_smooth`
  is 1/s when it is applied at run time. Raises on wrong rank, non-float dtypes, NaN/Inf,
  or side inputs of the wrong shape; `name` (the layer path) is in every message.
  """
  check_qtype(qtype)
  original = jnp.asarray(kernel)
  contract, out = tuple(contract), tuple(out)
  if sorted(contract + out) != list(range(original.ndim)) or not contract or not out:
    if (contract, out) == ((0,), (1,)):
      raise QuantizationError(f"{name}: expected a 2-D (in, out) Dense kernel, got shape {original.shape}")
    raise QuantizationError(f"{name}: contract {contract} and out {out} must split the axes of a weight of shape "
                     f"{original.shape}")
  if not jnp.issubdtype(original.dtype, jnp.floating):
    raise QuantizationTypeError(f"{name}: expected a floating-point kernel, got {original.dtype}")
  check_finite(original, f"{name}: kernel")
  kernel = weight_matrix(original, contract, out)
  k, n = kernel.shape
  w = kernel.astype(jnp.float32).T  # (N, K)
  q = quantize(w, qtype, granularity="channel", axis=0)
  if act_scale is not None:
    act_scale = jnp.asarray(act_scale, jnp.float32)
    if act_scale.shape != ():
      raise QuantizationError(f"{name}: act_scale must be a scalar (static per-tensor), got shape {act_scale.shape}")
    check_finite(act_scale, f"{name}: act_scale")
    if not isinstance(act_scale, jax.core.Tracer) and not 0 < float(act_scale) <= numerics.MAX_SCALE:
      raise QuantizationError(f"{name}: act_scale must be in (0, 2^126] (its reciprocal multiplies x), "
                              f"got {float(act_scale)}")
  if inv_smooth is not None:
    inv_smooth = jnp.asarray(inv_smooth, jnp.float32)
    if inv_smooth.shape != (k,):
      raise QuantizationError(f"{name}: inv_smooth must have shape ({k},) (the kernel's input dim), got {inv_smooth.shape}")
    check_finite(inv_smooth, f"{name}: inv_smooth")
  return QuantizedKernel(q.values, q.scale[:, 0], act_scale, inv_smooth, qtype, "", original if keep_float else None,
                         contract, out, tuple(original.shape), jnp.dtype(original.dtype).name)

