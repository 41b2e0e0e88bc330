"""GPTQ weight rounding (Frantar et al., 2022): error compensation from calibration inputs.

Nearest rounding makes each weight's error on its own. GPTQ rounds a weight's input
channels one at a time and moves each channel's rounding error onto the channels not yet
rounded, in the proportions that cancel it on the calibration inputs X:
minimize ||X W - X Q||^2 with H = X^T X. Same grid, same per-output-channel scales
(quant.scale_from_absmax of each output channel), same storage: the kernels see an
ordinary QuantizedKernel. Measured on SmolLM2-135M (rotated, int8, held-out text): the
weight's share of the KL vs float 3.0e-3 -> 1.1e-3; FP8 e4m3 3.4e-2 -> 1.4e-2
(docs/results.md).

X is the input exactly as the GEMM reads it: x / s (smoothing), then rotated (x R) where
the layer rotates -- the weight rounded is the matrix the GEMM multiplies.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve

from actquant_jax.errors import QuantizationError
from actquant_jax.quant import qtype_dtype, scale_from_absmax
from pallas_kernels import reference as numerics

BLOCK = 32      # input channels rounded between two matmul updates of the rest (32: 2.5x faster than 128 here)
DAMP = 0.01     # H + DAMP * mean(diag H) * I: inputs a channel never saw, a finite inverse
_PREC = jax.lax.Precision.HIGHEST


def min_rows(k: int) -> int:
  """Calibration rows GPTQ needs for a contraction of K: with fewer, H = X^T X has rank
  below K, and the compensation fits the calibration rows' span at the expense of other
  inputs (quantize_params rounds such a layer to nearest and says so)."""
  return k


def hessian(x: jax.Array) -> jax.Array:
  """H = sum_r x_r^T x_r / |x_r|^2 of the (S, K) rows the GEMM reads, in f32: each row at
  unit norm, so that every token's relative output error counts the same. Unweighted, an
  attention sink's rows (SmolLM2: row max ~3500 where others' is ~1.4) would set H alone."""
  x = jnp.asarray(x, jnp.float32)
  norm = jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))
  x = jnp.where(norm > 0, x / jnp.where(norm > 0, norm, 1.0), 0.0)
  return jnp.dot(x.T, x, precision=_PREC)


@functools.partial(jax.jit, static_argnames=("qtype", "block"))
def round_weight(w_kn: jax.Array, h: jax.Array, *, qtype: str, block: int = BLOCK):
  """(values (N, K), scale (N,)) of a (K, N) float weight rounded by GPTQ against H (K, K).

  Rows of w_kn (input channels) are rounded in order, in blocks of `block`: inside a
  block each row's error e (over the N outputs) updates the block's later rows
  (w_m -= U[j, m] e); at the end of a block, one matmul updates every later row. U is the
  upper Cholesky factor of H^-1 (U^T U = H^-1), the form in which the GPTQ update is a
  row of U. Values beyond the scale's range saturate, as nearest rounding's would.
  """
  if w_kn.ndim != 2 or h.shape != (w_kn.shape[0],) * 2:
    raise QuantizationError(f"gptq.round_weight: w_kn must be (K, N) and h (K, K); got {w_kn.shape} and {h.shape}")
  k, n = w_kn.shape
  w = jnp.asarray(w_kn, jnp.float32)
  scale = scale_from_absmax(jnp.max(jnp.abs(w), axis=0), qtype)  # (N,): nearest's scales
  dt = qtype_dtype(qtype)
  eye = jnp.eye(k, dtype=jnp.float32)
  d = jnp.diag(h)
  h = h + DAMP * jnp.maximum(jnp.mean(d), jnp.float32(1e-30)) * eye
  u = jnp.linalg.cholesky(cho_solve((jnp.linalg.cholesky(h), True), eye)).T
  kp = -(-k // block) * block
  u = jnp.eye(kp, dtype=jnp.float32).at[:k, :k].set(u)  # padded rows: zero weights, zero error
  w = jnp.zeros((kp, n), jnp.float32).at[:k].set(w)
  inv = 1.0 / scale
  below = jnp.arange(block)
  rows = jnp.arange(kp)

  def row_step(j, carry):
    wb, qb, eb, ub = carry
    q = numerics.saturate_cast(wb[j] * inv, dt)
    e = (wb[j] - q.astype(jnp.float32) * scale) / ub[j, j]
    wb = wb - jnp.where(below[:, None] > j, ub[j][:, None], 0.0) * e[None, :]
    return wb, qb.at[j].set(q), eb.at[j].set(e), ub

  def block_step(b, carry):
    w, values = carry
    i0 = b * block
    wb = jax.lax.dynamic_slice(w, (i0, 0), (block, n))
    ub = jax.lax.dynamic_slice(u, (i0, i0), (block, block))
    _, qb, eb, _ = jax.lax.fori_loop(
        0, block, row_step, (wb, jnp.zeros((block, n), dt), jnp.zeros((block, n), jnp.float32), ub))
    later = jax.lax.dynamic_slice(u, (i0, 0), (block, kp)) * (rows >= i0 + block)[None, :]
    w = w - jnp.dot(later.T, eb, precision=_PREC)
    return w, jax.lax.dynamic_update_slice(values, qb, (i0, 0))

  _, values = jax.lax.fori_loop(0, kp // block, block_step, (w, jnp.zeros((kp, n), dt)))
  return values[:k].T, scale
