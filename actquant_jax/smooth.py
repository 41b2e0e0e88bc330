"""SmoothQuant: smoothing factors, the alpha search, and folding 1/s into producers.

X W = (X diag(s)^-1) (diag(s) W),  s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

Dividing channel j of X by s_j shrinks outlier channels and multiplying row j of W by
s_j grows the matching weights, moving quantization difficulty from activations (hard:
dynamic, outlier channels) to weights (easy: static, per-output-channel scales).
All functions here are pure (numpy/jnp in, out).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from actquant_jax.ops import w8a8_dot
from actquant_jax.quant import qtype_max, quantize_kernel

S_MIN, S_MAX = 1e-5, 1e5


def smoothing_factors(x_absmax, w_absmax, alpha: float) -> np.ndarray:
  """s_j = x_j^alpha / w_j^(1-alpha), in float32.

  Guards: a channel that is all-zero in X or in W gets s_j = 1 (nothing to migrate; a
  0 or inf factor would destroy the other side), and s is clipped to [1e-5, 1e5].
  """
  x = np.asarray(x_absmax, np.float64)
  w = np.asarray(w_absmax, np.float64)
  if x.shape != w.shape or x.ndim != 1:
    raise ValueError(f"smoothing_factors: x_absmax {x.shape} and w_absmax {w.shape} must be equal (K,) vectors")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"smoothing_factors: alpha must be in [0, 1], got {alpha}")
  ok = (x > 0) & (w > 0)
  s = np.where(ok, np.power(np.where(ok, x, 1.0), alpha) / np.power(np.where(ok, w, 1.0), 1.0 - alpha), 1.0)
  return np.clip(s, S_MIN, S_MAX).astype(np.float32)


def weight_row_absmax(kernels) -> np.ndarray:
  """max_j over the rows (input channels) of every (K, N) kernel of a group."""
  return np.max(np.stack([np.max(np.abs(np.asarray(k, np.float32)), axis=1) for k in kernels]), axis=0)


def static_act_scale(x_absmax, s, qtype: str) -> np.float32:
  """Per-tensor static scale of X / s from per-channel calibration absmax (exact: the
  max of X_j / s_j is max|X_j| / s_j)."""
  x = np.asarray(x_absmax, np.float32)
  if s is not None:
    x = x / np.asarray(s, np.float32)
  amax = float(np.max(x))
  return np.float32(amax / qtype_max(qtype) if amax > 0 else 1.0)


def quantize_smoothed(kernel, x_absmax, s, qtype: str, act_mode: str, *, runtime_inv: bool, name: str):
  """The QuantizedKernel of one layer: diag(s) W quantized per output channel, with a
  static activation scale if asked, and 1/s kept as a runtime vector if not folded."""
  k = np.asarray(kernel, np.float32)
  if s is not None:
    k = k * np.asarray(s, np.float32)[:, None]
  act_scale = static_act_scale(x_absmax, s, qtype) if act_mode == "static" else None
  inv = (1.0 / np.asarray(s, np.float32)).astype(np.float32) if (s is not None and runtime_inv) else None
  return quantize_kernel(jnp.asarray(k), qtype, act_scale=act_scale, inv_smooth=inv, name=name)


def output_error(samples, kernels, x_absmax, s, qtype: str, act_mode: str) -> float:
  """Sum over a group's layers of ||y_q - y||^2 / ||y||^2 on calibration rows, y_q being
  the library's own W8A8 path (so the error is the one inference will have)."""
  x = jnp.asarray(samples, jnp.float32)
  err = 0.0
  for kern in kernels:
    y = np.asarray(x @ jnp.asarray(kern, jnp.float32), np.float64)
    qk = quantize_smoothed(kern, x_absmax, s, qtype, act_mode, runtime_inv=True, name="alpha search")
    yq = np.asarray(w8a8_dot(x, qk, backend="xla"), np.float64)
    den = float(np.sum(y * y))
    err += float(np.sum((yq - y) ** 2)) / den if den > 0 else 0.0
  return err


def choose_alpha(samples, kernels, x_absmax, grid, qtype: str, act_mode: str):
  """The grid value (None = no smoothing) with the least output error; returns
  (alpha, {alpha: error})."""
  w_absmax = weight_row_absmax(kernels)
  errors = {}
  for a in grid:
    s = None if a is None else smoothing_factors(x_absmax, w_absmax, a)
    errors[a] = output_error(samples, kernels, x_absmax, s, qtype, act_mode)
  best = min(grid, key=lambda a: (errors[a], -1 if a is None else a))
  return best, errors


# alpha="auto" fits one value out of the grid to the calibration rows; with a handful of
# rows it fits their noise (one token picked 0.9, 10-40x worse than no smoothing on new
# data). Below MIN_AUTO_ROWS rows the search is not run and AUTO_FALLBACK_ALPHA is used:
# SmoothQuant's default, the value that is reasonable for most models without a search.
MIN_AUTO_ROWS = 64
AUTO_FALLBACK_ALPHA = 0.5


def auto_alpha(samples, kernels, x_absmax, grid, qtype: str, act_mode: str):
  """alpha="auto" for one group: (alpha, {alpha: error} or None, note). With fewer than
  MIN_AUTO_ROWS calibration rows no search is run: (AUTO_FALLBACK_ALPHA, None, why)."""
  rows = int(np.shape(samples)[0])
  if rows < MIN_AUTO_ROWS:
    return AUTO_FALLBACK_ALPHA, None, (f"alpha='auto' needs >= {MIN_AUTO_ROWS} calibration rows, got {rows}: "
                                       f"used alpha={AUTO_FALLBACK_ALPHA} (calibrate on more tokens to search)")
  alpha, errors = choose_alpha(samples, kernels, x_absmax, grid, qtype, act_mode)
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


def can_fold(kind: str, producer_params: dict, names: tuple | None = None) -> bool:
  """names: the producer's params that absorb 1/s, as the traced dataflow found them
  (default: FOLD_PARAMS[kind])."""
  if kind not in FOLD_PARAMS or not isinstance(producer_params, dict):
    return False
  if names:
    return all(n in producer_params for n in names)
  # A norm without a scale has nothing to fold 1/s into (its bias alone would not do).
  required = {"layernorm": "scale", "rmsnorm": "scale", "dense": "kernel"}[kind]
  return required in producer_params


def fold_inverse(kind: str, producer_params: dict, s, names: tuple | None = None) -> dict:
  """Producer params whose output is the old output / s (exact): a norm's scale and bias
  divided by s; a Dense's output columns and bias divided by s."""
  inv = 1.0 / np.asarray(s, np.float32)
  out = dict(producer_params)
  for name in names or FOLD_PARAMS[kind]:
    if name in out:
      v = out[name]
      out[name] = (jnp.asarray(v, jnp.float32) * inv).astype(jnp.asarray(v).dtype)  # last axis = channels
  return out
