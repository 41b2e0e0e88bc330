"""SmoothQuant: smoothing factors, the alpha search, and folding 1/s into producers.

X W = (X diag(s)^-1) (diag(s) W),  s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

Dividing channel j of X by s_j shrinks outlier channels and multiplying row j of W by
s_j grows the matching weights, moving quantization difficulty from activations (hard:
dynamic, outlier channels) to weights (easy: static, per-output-channel scales).
All functions here are pure (numpy/jnp in, out). The (K,) vector math (s, 1/s, static
scales) runs on the host in numpy; everything that reads a weight runs jitted on the
weight's own devices (see WeightRef).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from actquant_jax._dataflow import kind_offsets
from actquant_jax import backends, gptq, rotation
from actquant_jax.errors import QuantizationError
from actquant_jax.quant import qtype_max, quantize_with_scale, scale_from_absmax, weight_matrix
from actquant_jax.sharding import kernel_axes, put_like, to_host

S_MIN, S_MAX = 1e-5, 1e5


def smoothing_factors(x_absmax, w_absmax, alpha: float) -> np.ndarray:
  """s_j = x_j^alpha / w_j^(1-alpha), in float32.

  Guards: a channel that is all-zero in X or in W gets s_j = 1 (nothing to migrate; a
  0 or inf factor would destroy the other side), and s is clipped to [1e-5, 1e5].
  """
  x = np.asarray(x_absmax, np.float64)
  w = np.asarray(w_absmax, np.float64)
  if x.shape != w.shape or x.ndim != 1:
    raise QuantizationError(f"smoothing_factors: x_absmax {x.shape} and w_absmax {w.shape} must be equal (K,) vectors")
  if not 0.0 <= alpha <= 1.0:
    raise QuantizationError(f"smoothing_factors: alpha must be in [0, 1], got {alpha}")
  ok = (x > 0) & (w > 0)
  s = np.where(ok, np.power(np.where(ok, x, 1.0), alpha) / np.power(np.where(ok, w, 1.0), 1.0 - alpha), 1.0)
  return np.clip(s, S_MIN, S_MAX).astype(np.float32)


# A calibration row whose absmax is this many times the median row's is a sink token's
# (massive activations: SmolLM2's layer-11 down_proj input reaches ~3500 at the first
# position and at <|endoftext|>, ~1.4 elsewhere). A static scale set by those rows
# rounds every other row to zeros.
SINK_RATIO = 64.0


def calibration_row_absmax(samples, s=None, rotate: bool = False) -> np.ndarray:
  """(S,) max |x / s| of each calibration row (x rotated as the layer rotates it), on the host."""
  x = samples if isinstance(samples, jax.Array) else jax.device_put(np.asarray(samples, np.float32))
  sv = None if s is None else put_like(np.asarray(s, np.float32), x)
  return np.asarray(to_host(_row_absmax_of_rows(x, sv, rotate=rotate)), np.float32)


@functools.partial(jax.jit, static_argnames=("rotate",))
def _row_absmax_of_rows(x, s, *, rotate):
  """Reduced where the rows live (a mesh's shards): only the (S,) maxima go to the host."""
  x = x.astype(jnp.float32)
  if s is not None:
    x = x / s
  if rotate:
    x = rotation.rotate_rows(x)
  return jnp.max(jnp.abs(x), axis=1, initial=0.0)


def sink_rows(row_absmax) -> np.ndarray:
  """(S,) bool: the rows whose absmax is over SINK_RATIO times the median row's."""
  r = np.asarray(row_absmax, np.float32)
  med = float(np.median(r)) if r.size else 0.0
  return r > SINK_RATIO * med if med > 0 else np.zeros(r.shape, bool)


# The static range is chosen among these fractions of the non-sink rows' absmax.
CLIP_GRID = tuple(float(f) for f in np.linspace(0.2, 1.0, 33))


def static_act_scale(samples, s, qtype: str, rotate: bool = False) -> np.float32:
  """Per-tensor static scale of X / s (rotated where the layer is) from its calibration
  rows: static_scale_of_rows[0]."""
  return static_scale_of_rows(samples, s, qtype, rotate)[0]


def static_scale_of_rows(samples, s, qtype: str, rotate: bool = False):
  """(scale, rows beyond it, sink rows, rows) of X / s (rotated where the layer is).

  The scale is the range, among CLIP_GRID's fractions of the largest non-sink row max,
  whose *clipped* quantization of the non-sink rows has the least mean per-row relative
  error ||Q(x) - x||^2 / ||x||^2: what a kernel that saturates would do best, every token
  counting the same. The absmax itself gives the few largest rows' range to all: on Gemma 3
  (rotated + auto alpha, 16 held-out windows) KL 2.37e-2 with it, 9.2e-3 with this. At run time a row within the
  scale shares it and a row beyond it (a sink token, one of the largest rows, or text
  unlike the calibration's) is scaled on its own (pallas_kernels.reference.static_row_scale):
  nothing saturates. How many calibration rows that is goes into the report."""
  x = samples if isinstance(samples, jax.Array) else jax.device_put(np.asarray(samples, np.float32))
  sv = None if s is None else put_like(np.asarray(s, np.float32), x)
  r = calibration_row_absmax(x, s, rotate)
  sinks = sink_rows(r)
  amax = float(r[~sinks].max()) if (~sinks).any() else 0.0
  if amax <= 0:
    return np.float32(1.0), int(sinks.sum()), int(sinks.sum()), int(r.size)
  scales, errors = to_host(_clip_errors(x, sv, put_like(~sinks, x), put_like(np.float32(amax), x), qtype=qtype,
                                        rotate=rotate))
  best = len(CLIP_GRID) - 1 - int(np.argmin(np.asarray(errors)[::-1]))  # a tie: the wider range
  scale = np.float32(np.asarray(scales)[best])
  return scale, int((r > scale * qtype_max(qtype)).sum()), int(sinks.sum()), int(r.size)


@functools.partial(jax.jit, static_argnames=("qtype", "rotate"))
def _clip_errors(x, s, keep, amax, *, qtype, rotate):
  """(scales, mean relative error of the kept rows) for each CLIP_GRID fraction of amax."""
  x = x.astype(jnp.float32)
  if s is not None:
    x = x / s
  if rotate:
    x = rotation.rotate_rows(x)
  n2 = jnp.sum(x * x, axis=1)
  w = jnp.where(keep & (n2 > 0), 1.0 / jnp.where(n2 > 0, n2, 1.0), 0.0)
  scales = scale_from_absmax(amax * jnp.asarray(CLIP_GRID, jnp.float32), qtype)

  def err(scale):
    q = quantize_with_scale(x, scale, qtype).astype(jnp.float32) * scale
    return jnp.sum(w * jnp.sum((q - x) ** 2, axis=1)) / jnp.maximum(jnp.sum(w > 0), 1)

  return scales, jax.lax.map(err, scales)


# ---------------------------------------------------------------- reading weights on device
# Everything that reads a weight runs jitted where the weight lives (a sharded weight is
# read shard by shard, never gathered); only (K,) vectors and scalars cross to the host,
# where s, 1/s and the static scales are computed as above. Jitted per weight shape: a
# model's identical layers compile once.

@dataclasses.dataclass(frozen=True)
class WeightRef:
  """A layer's weight as smoothing and quantization read it: the param leaf as stored
  (any layout, any float dtype), its contraction (see QuantizedKernel), and the updates
  smoothing made to it that are not applied yet, in order: ("rows", s) multiplies its
  contracted (input) channels by s, ("cols", 1/s) its last axis by 1/s (a Dense
  producer's output channels absorbing the next layer's 1/s). Each update is computed in
  float32 and cast back to the weight's dtype, as an eager update would be; applying
  them only inside the jitted reader keeps no smoothed float copy of the model."""

  leaf: Any
  contract: tuple = (0,)
  out: tuple = (1,)
  ops: tuple = ()

  @property
  def kinds(self) -> tuple:
    return tuple(kind for kind, _ in self.ops)

  def vectors(self) -> tuple:
    """The updates' vectors on the weight's devices (explicit transfers)."""
    return tuple(put_like(np.asarray(v, np.float32), self.leaf) for _, v in self.ops)

  @property
  def shape(self) -> tuple:
    """(K, N) of the matrix it contracts as."""
    shape = np.shape(self.leaf)
    return (math.prod(shape[a] for a in self.contract), math.prod(shape[a] for a in self.out))


def as_ref(kernel) -> WeightRef:
  return kernel if isinstance(kernel, WeightRef) else WeightRef(kernel)


# Weights are read in their own layout: XLA CPU fuses an f32 transpose into a reduction
# or a quantize pass badly (a tied (32000, 1024) embedding read as its (1024, 32000)
# matrix took 1.9 s to quantize, 0.1 s in place). Elementwise products and max/sum
# reductions give the same bits in any layout; only the int8 values are transposed.

def _along(v, shape, axes):
  """A vector over the flattened `axes` of `shape` (in their order), broadcastable
  against an array of that shape."""
  t = v.reshape([shape[a] for a in axes]).transpose(np.argsort(axes))
  return t.reshape([shape[i] if i in axes else 1 for i in range(len(shape))])


def _apply_ops(w, vecs, kinds, contract, out):
  for kind, v in zip(kinds, vecs):
    if kind == "rows":  # the contracted (input) channels times s
      w = (w.astype(jnp.float32) * _along(v, w.shape, contract)).astype(w.dtype)
    else:  # "cols": the last axis
      w = (w.astype(jnp.float32) * v).astype(w.dtype)
  return w


def _current32(w, vecs, kinds, contract, out):
  """The weight with its updates, float32, in its own layout (traced)."""
  return _apply_ops(jnp.asarray(w), vecs, kinds, contract, out).astype(jnp.float32)


def _row_absmax_of(w32, contract, out):
  """max over the output axes: (K,), contracted axes flattened in their order."""
  r = jnp.max(jnp.abs(w32), axis=tuple(out))  # the contracted axes, in increasing order
  return r.transpose([sorted(contract).index(a) for a in contract]).reshape(-1)


def _channel_scale(w32, axis: int, qtype: str):
  """compute_scale(w32, qtype, granularity="channel", axis=axis), the same bits: NaN is
  read as Inf inside the one max (reference.quantize_rows_ref's way), so a group holding
  NaN or Inf gets a NaN scale without compute_scale's second reduction (nonfinite_probe),
  with which XLA CPU's fusion of a weight's column reduction ran 6x slower."""
  ax = jnp.where(jnp.isnan(w32), jnp.float32(jnp.inf), jnp.abs(w32))
  reduced = tuple(i for i in range(w32.ndim) if i != axis)
  return scale_from_absmax(jnp.max(ax, axis=reduced, keepdims=True, initial=0.0), qtype)


def _quantize_in_place(w32, qtype: str, contract, out):
  """A float32 weight quantized per output channel: (values (N, K), scale (N,)), bit for
  bit what quantize_kernel gives (quant.quantize of its (N, K) matrix, channel axis 0),
  but reduced and rounded in the weight's layout and transposed once, in 8 bits."""
  if len(out) != 1:
    return _quantize_in_place(weight_matrix(w32, contract, out), qtype, (0,), (1,))
  scale = _channel_scale(w32, out[0], qtype)
  # The barrier keeps XLA from fusing the transpose into the quantize pass (a
  # transposed read of the f32 weight: 4x slower); the int8 transpose alone is cheap.
  values = jax.lax.optimization_barrier(quantize_with_scale(w32, scale, qtype))
  return weight_matrix(values, out, contract), scale.reshape(-1)  # (N, K): output axes first


_STATIC = ("kinds", "contract", "out")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _updated(w, vecs, *, kinds, contract, out):
  return _apply_ops(jnp.asarray(w), vecs, kinds, contract, out)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _row_absmax(w, vecs, *, kinds, contract, out):
  return _row_absmax_of(_current32(w, vecs, kinds, contract, out), contract, out)


@functools.partial(jax.jit, static_argnames=_STATIC + ("qtype", "rotate", "values_sharding", "scale_sharding"))
def _quantize_weight(w, vecs, rows, s, *, kinds, contract, out, qtype, rotate, values_sharding, scale_sharding):
  w32 = _current32(w, vecs, kinds, contract, out)
  if rotate:  # R^T W, quantized from its (K, N) matrix
    w32, contract, out = rotation.rotate_weight(weight_matrix(w32, contract, out)), (0,), (1,)
  if rows is not None:  # GPTQ against the rows as the GEMM reads them: x / s, rotated
    x = rows if s is None else rows / s
    x = rotation.rotate_rows(x) if rotate else x
    values, scale = gptq.round_weight(weight_matrix(w32, contract, out), gptq.hessian(x), qtype=qtype)
  else:
    values, scale = _quantize_in_place(w32, qtype, contract, out)
  if values_sharding is not None:  # (N, K): the weight's own sharding, transposed
    values = jax.lax.with_sharding_constraint(values, values_sharding)
    scale = jax.lax.with_sharding_constraint(scale, scale_sharding)
  return values, scale


def apply_updates(ref: WeightRef):
  """The weight with its pending updates applied, in its own layout and dtype."""
  if not ref.ops:
    return ref.leaf
  return _updated(ref.leaf, ref.vectors(), kinds=ref.kinds, contract=ref.contract, out=ref.out)


def weight_row_absmax(kernels) -> np.ndarray:
  """max_j over the rows (input channels) of every (K, N) kernel (or WeightRef) of a
  group: reduced on the weights' devices, the (K,) result on the host."""
  refs = [as_ref(k) for k in kernels]
  maxima = [_row_absmax(r.leaf, r.vectors(), kinds=r.kinds, contract=r.contract, out=r.out) for r in refs]
  return np.max(np.stack([np.asarray(m) for m in to_host(maxima)]), axis=0).astype(np.float32)


def quantize_weight(ref: WeightRef, qtype: str, rotate: bool = False, rows=None, s=None):
  """(values (N, K), scale (N,)) of the weight with its updates, quantized per output
  channel, on the weight's devices: rounded to nearest (bit for bit what quantize_kernel
  gives), or with `rows` -- the (S, K) calibration rows of its input, before smoothing
  and rotation; s the smoothing vector or None -- by GPTQ (gptq.py). A weight with a
  NamedSharding gives values with its spec transposed and scales with its output axis's."""
  vs = ss = None
  sharding = getattr(ref.leaf, "sharding", None)
  if isinstance(ref.leaf, jax.Array) and isinstance(sharding, NamedSharding):
    k_axis, n_axis = kernel_axes(sharding.spec, ref.leaf.ndim, ref.contract, ref.out)
    vs, ss = NamedSharding(sharding.mesh, P(n_axis, k_axis)), NamedSharding(sharding.mesh, P(n_axis))
  if rows is not None:  # explicit transfers, onto the weight's devices
    rows = _put_rows(rows if isinstance(rows, jax.Array) else np.asarray(rows, np.float32), ref)
    s = None if s is None else put_like(np.asarray(s, np.float32), ref.leaf)
  else:
    s = None
  return _quantize_weight(ref.leaf, ref.vectors(), rows, s, kinds=ref.kinds, contract=ref.contract, out=ref.out, qtype=qtype,
                          rotate=rotate, values_sharding=vs, scale_sharding=ss)


def _as_2d(w32, contract, out):
  """(w, k_axis): a 2-D weight as it is ((K, N) or (N, K)), any other as its (K, N)
  matrix (an f32 transpose: slow on XLA CPU, but only DenseGeneral-like weights)."""
  if w32.ndim == 2:
    return w32, contract[0]
  return weight_matrix(w32, contract, out), 0


def _w8a8_in_place(x, w2, k_axis: int, s, inv, act_scale, qtype: str, act_mode: str, rotate: bool = False):
  """x @ diag(s) W through the library's W8A8 numbers (the XLA kernel's stages), with 1/s
  at run time (and rotate: R^T diag(s) W, x rotated) -- the weight quantized and
  contracted in its own 2-D layout (traced). XLA CPU ran the int8 dot of a weight
  quantized in place and transposed to (N, K) 17x slower than this contraction over its
  own K axis; the int32 sums are the same."""
  ws = w2 * (s[:, None] if k_axis == 0 else s[None, :])
  if rotate:
    ws = rotation.rotate_weight(ws) if k_axis == 0 else rotation.rotate_rows(ws)
  scale = _channel_scale(ws, 1 - k_axis, qtype)
  kernel = backends.choose("xla", backends.problem_for(k=x.shape[1], qtype=qtype, act=act_mode))
  xq, sx = kernel.quantize(x, inv, act_scale if act_mode == "static" else None, rotate=rotate)
  acc, flags = kernel.accumulate(xq, quantize_with_scale(ws, scale, qtype), w_k_axis=k_axis)
  return kernel.epilogue(acc, sx + flags, scale.reshape(-1), None, x.dtype)


def _error_terms(x, w32, contract, out):
  """(the weight in 2-D, its K axis, y = x @ W, sum y^2)."""
  w2, k_axis = _as_2d(w32, contract, out)
  y = jax.lax.dot_general(x, w2, (((1,), (k_axis,)), ((), ())))
  return w2, k_axis, y, jnp.sum(jnp.sum(y * y, axis=1))


@functools.partial(jax.jit, static_argnames=("kinds", "contracts", "outs", "qtype", "act_mode", "rotate"))
def _grid_errors(samples, leaves, vecs, s_grid, inv_grid, act_grid, *, kinds, contracts, outs, qtype, act_mode,
                 rotate):
  total = jnp.zeros(s_grid.shape[0], jnp.float32)
  for x, w, v, kind, contract, out in zip(samples, leaves, vecs, kinds, contracts, outs):
    x = x.astype(jnp.float32)
    w2, k_axis, y, den = _error_terms(x, _current32(w, v, kind, contract, out), contract, out)

    def err(a):
      d = _w8a8_in_place(x, w2, k_axis, *a, qtype, act_mode, rotate) - y
      return jnp.sum(jnp.sum(d * d, axis=1))
    # One candidate at a time (lax.map, inside the one jitted call): vmap over the grid
    # ran 2x slower here and would hold every candidate's smoothed copy of the weight.
    num = jax.lax.map(err, (s_grid, inv_grid, act_grid))
    total = total + jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
  return total


def _put_rows(x, ref: WeightRef):
  """Calibration rows (S, K) (host or device data: moved by an explicit transfer, never
  through the host when on a device) on the weight's devices, K split like the weight's K: the
  partitioner then contracts each shard locally and sums (S, N) partials, instead of
  gathering the weight's K to match replicated rows."""
  sharding = getattr(ref.leaf, "sharding", None)
  if isinstance(ref.leaf, jax.Array) and isinstance(sharding, NamedSharding):
    return put_like(x, ref.leaf, P(None, kernel_axes(sharding.spec, ref.leaf.ndim, ref.contract, ref.out)[0]))
  return put_like(x, ref.leaf)


def smoothing_errors(samples, kernels, svecs, qtype: str, act_mode: str, rotate: bool = False) -> np.ndarray:
  """For each smoothing vector of `svecs` (None = no smoothing): the sum over a group's
  layers of ||y_q - y||^2 / ||y||^2 on calibration rows, y_q being the library's own
  W8A8 path with 1/s at run time. One jitted call on the weights' devices for the whole
  candidate list; the (G,) errors come back to the host."""
  refs = [as_ref(k) for k in kernels]
  k = refs[0].shape[0]
  s_grid = np.stack([np.ones(k, np.float32) if s is None else np.asarray(s, np.float32) for s in svecs])
  inv_grid = (1.0 / s_grid).astype(np.float32)  # 1/1 = 1: "no smoothing" computes as None does, bit for bit
  act_grid = np.array([static_act_scale(samples, s, qtype, rotate) if act_mode == "static" else 1.0
                       for s in svecs], np.float32)
  like = refs[0].leaf
  errs = _grid_errors(tuple(_put_rows(samples, r) for r in refs), tuple(r.leaf for r in refs),
                      tuple(r.vectors() for r in refs), put_like(s_grid, like), put_like(inv_grid, like),
                      put_like(act_grid, like), kinds=tuple(r.kinds for r in refs),
                      contracts=tuple(r.contract for r in refs), outs=tuple(r.out for r in refs), qtype=qtype,
                      act_mode=act_mode, rotate=rotate)
  return np.asarray(to_host(errs), np.float64)


def output_error(samples, kernels, x_absmax, s, qtype: str, act_mode: str) -> float:
  """Sum over a group's layers of ||y_q - y||^2 / ||y||^2 on calibration rows for one
  smoothing vector s (None: none)."""
  return float(smoothing_errors(samples, kernels, [s], qtype, act_mode)[0])


def choose_alpha(samples, kernels, x_absmax, grid, qtype: str, act_mode: str, rotate: bool = False):
  """The grid value (None = no smoothing) with the least output error; returns
  (alpha, {alpha: error}). kernels: the group's (K, N) kernels or WeightRefs."""
  w_absmax = weight_row_absmax(kernels)
  svecs = [None if a is None else smoothing_factors(x_absmax, w_absmax, a) for a in grid]
  errs = smoothing_errors(samples, kernels, svecs, qtype, act_mode, rotate)
  errors = {a: float(e) for a, e in zip(grid, errs)}
  best = min(grid, key=lambda a: (errors[a], -1 if a is None else a))
  return best, errors


def _rel(a, b):
  d = jnp.sqrt(jnp.sum(jnp.sum(b * b, axis=-1)))
  return jnp.where(d > 0, jnp.sqrt(jnp.sum(jnp.sum((a - b) ** 2, axis=-1))) / jnp.where(d > 0, d, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("contract", "out", "qtype", "act_mode", "rotate"))
def _layer_errors(w, values, scale, s, inv, act_scale, samples, *, contract, out, qtype, act_mode, rotate):
  w32 = jnp.asarray(w).astype(jnp.float32)
  # ||dq(W') - W'|| in the (N, K) layout of values: W' transposed in f32 (a report only)
  w_nk = weight_matrix(w32, out, contract) * s[None, :]
  weight_err = _rel(values.astype(jnp.float32) * scale[:, None], rotation.rotate_rows(w_nk) if rotate else w_nk)
  if samples.shape[0] == 0:
    return weight_err, jnp.float32(0.0)
  x = samples.astype(jnp.float32)
  w2, k_axis, y, den = _error_terms(x, w32, contract, out)
  d = _w8a8_in_place(x, w2, k_axis, s, inv, act_scale, qtype, act_mode, rotate) - y
  e = jnp.sum(jnp.sum(d * d, axis=1))
  return weight_err, jnp.where(den > 0, jnp.sqrt(e) / jnp.sqrt(jnp.where(den > 0, den, 1.0)), 0.0)


def layer_errors(weight, values, scale, s, samples, act_scale, qtype: str, act_mode: str,
                 rotate: bool = False) -> tuple[float, float]:
  """(||dq(W') - W'|| / ||W'||, ||y_q - y|| / ||y|| on calibration rows) of one layer:
  W' = diag(s) W (the float weight's matrix, before any update), (values, scale) its
  quantized weight, y_q the layer alone in W8A8 with 1/s at run time (equal to a folded
  producer's output up to float rounding) and its static act_scale (None: dynamic). On
  the weight's devices; two floats back."""
  ref = as_ref(weight)
  k = ref.shape[0]
  sv = np.ones(k, np.float32) if s is None else np.asarray(s, np.float32)
  like = ref.leaf
  errs = _layer_errors(ref.leaf, values, scale, put_like(sv, like), put_like((1.0 / sv).astype(np.float32), like),
                       put_like(np.float32(1.0 if act_scale is None else act_scale), like),
                       _put_rows(samples, ref), contract=ref.contract, out=ref.out,
                       qtype=qtype, act_mode=act_mode, rotate=rotate)
  return tuple(float(e) for e in to_host(errs))


# alpha="auto" fits one value out of the grid to the calibration rows; with a handful of
# rows it fits their noise (one token picked 0.9, 10-40x worse than no smoothing on new
# data). Below MIN_AUTO_ROWS rows the search is not run and AUTO_FALLBACK_ALPHA is used:
# SmoothQuant's default, the value that is reasonable for most models without a search.
MIN_AUTO_ROWS = 64
AUTO_FALLBACK_ALPHA = 0.5


def auto_alpha(samples, kernels, x_absmax, grid, qtype: str, act_mode: str, rotate: bool = False):
  """alpha="auto" for one group: (alpha, {alpha: error} or None, note). With fewer than
  MIN_AUTO_ROWS calibration rows no search is run: (AUTO_FALLBACK_ALPHA, None, why)."""
  rows = int(np.shape(samples)[0])
  if rows < MIN_AUTO_ROWS:
    return AUTO_FALLBACK_ALPHA, None, (f"alpha='auto' needs >= {MIN_AUTO_ROWS} calibration rows, got {rows}: "
                                       f"used alpha={AUTO_FALLBACK_ALPHA} (calibrate on more tokens to search)")
  alpha, errors = choose_alpha(samples, kernels, x_absmax, grid, qtype, act_mode, rotate)
  return alpha, errors, ""


def outlier_ratio(x_absmax, s=None) -> float:
  """max / median of per-channel absmax: how far the outlier channels stick out."""
  x = np.asarray(x_absmax, np.float64)
  if s is not None:
    x = x / np.asarray(s, np.float64)
  med = float(np.median(x))
  return float(np.max(x)) / med if med > 0 else float("inf")


# Folding: params of the producer that absorb 1/s (same names in linen and nnx).
FOLD_PARAMS = {"layernorm": ("scale", "bias"), "rmsnorm": ("scale",), "dense": ("kernel", "bias")}


def _keeps_offset_fold(v) -> bool:
  """A `1 + g` scale param folds within float rounding only when stored with at least
  float32's 24-bit significand (see fold_inverse: in bfloat16 the 1 + g' of a small
  (1 + g) / s loses most of its bits)."""
  dtype = jnp.dtype(v.dtype if hasattr(v, "dtype") else np.asarray(v).dtype)
  return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).nmant >= 23


def can_fold(kind: str, producer_params: dict, names: tuple | None = None) -> bool:
  """names: the producer's params that absorb 1/s, as the traced dataflow found them
  (default: FOLD_PARAMS[kind]). kind may name a `1 + g` scale ("rmsnorm(1+scale)",
  _dataflow.kind_offsets): such a param must be float32 or wider (_keeps_offset_fold);
  in a narrower dtype the layer keeps its 1/s at run time."""
  base, offsets = kind_offsets(kind)
  if base not in FOLD_PARAMS or not isinstance(producer_params, dict):
    return False
  if any(n in producer_params and not _keeps_offset_fold(producer_params[n]) for n in offsets):
    return False
  if names:
    return all(n in producer_params for n in names)
  # A norm without a scale has nothing to fold 1/s into (its bias alone would not do).
  required = {"layernorm": "scale", "rmsnorm": "scale", "dense": "kernel"}[base]
  return required in producer_params


def fold_inverse(kind: str, producer_params: dict, s, names: tuple | None = None) -> dict:
  """Producer params whose output is the old output / s: a norm's scale and bias divided
  by s; a Dense's output columns and bias divided by s. Computed in float32 with
  inv = fl(1/s) and cast back to each param's dtype.

  A scale the model uses as 1 + g (kind "rmsnorm(1+scale)": Gemma's norms) becomes
  g' = fl(fl(fl(1 + g) * inv) - 1), so that the model's own 1 + g' is t = fl((1 + g) * inv)
  up to one rounding of t - 1. With float32 params (can_fold requires them):
  - t >= 0.5: exact, 1 + g' = t (t - 1 is exact: Sterbenz for t <= 2, a multiple of
    ulp(t) >= ulp(t - 1) above; so is 1 + (t - 1)).
  - t < 0.5: g' lies in (-1, -0.5], where float32's spacing is 2^-24, so
    |(1 + g') - t| <= 2^-25 ~= 3e-8 (1 + g' itself is exact again: Sterbenz): an absolute
    error, relative 2^-25 / t -- measured over 2M random (g, s): 3.0e-6 for t in
    [1e-2, 1e-1), 3.0e-5 in [1e-3, 1e-2), 3.0e-3 in [1e-5, 1e-4) (s near its 1e5 clip
    over 1 + g ~ 1), 2.8e-2 below 1e-5 (1 + g itself small as well).
  In the activation, h * (1 + g') differs from h * t by at most 2^-25 |h| (h: the
  normalized input, |h| <= sqrt(K)), against an int8 step of max_j |h_j t_j| / 127 in
  that row. A plain scale (h * g) has only the relative 2^-24 of g * inv.
  In bfloat16 the same fold keeps 8 bits of t - 1, not of t (1 + g' off t by up to 0.2% at
  t = 0.5, 17% at 0.01, 100% at 1e-3): can_fold refuses it, the 1/s stays a run-time vector.
  """
  base, offsets = kind_offsets(kind)
  inv = 1.0 / np.asarray(s, np.float32)
  out = dict(producer_params)
  for name in names or FOLD_PARAMS[base]:
    if name in out:
      v = out[name]
      # last axis = channels; 1/s placed like it (a sharded param is updated where it lives)
      sharding = getattr(v, "sharding", None)
      spec = P()
      if isinstance(sharding, NamedSharding):
        spec = P((tuple(sharding.spec) + (None,) * v.ndim)[v.ndim - 1])
      v32, c = jnp.asarray(v, jnp.float32), offsets.get(name, 0.0)
      new = v32 * put_like(inv, v, spec) if not c else (v32 + c) * put_like(inv, v, spec) - c
      out[name] = new.astype(jnp.asarray(v).dtype)
  return out
