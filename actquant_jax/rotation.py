"""Randomized Hadamard rotation of a matmul's contraction (QuaRot-style, online).

x W = (x R)(R^T W) for an orthogonal R (K, K): the weight is rotated offline (R^T W,
then quantized per output channel) and each activation row at run time (x R, then
quantized per token). R spreads an outlier channel's magnitude over all K channels, so a
token's scale is no longer set by a few channels: per-token rounding then keeps the
ordinary channels.

R = diag(d) (H_m kron H_p) / sqrt(K): d a fixed pattern of random signs (seeded by K:
the same R wherever it is rebuilt), H_p Sylvester's Hadamard matrix of order p = 2^j,
H_m Paley's of order m = q + 1 for a prime q = 3 (mod 4) (12, 20, 24, 28, 44, 48, 60,
72, ...) or 1. Every entry is +-1 before the one scale, so R is the same on every
machine. Applied as two small contractions over x reshaped (M, m, p): M * K * (m + p)
multiply-adds, against the GEMM's M * K * N.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from actquant_jax.errors import QuantizationError

_MAX_PALEY = 256  # the largest Paley order tried: the dense H_m costs m multiply-adds per element


def _is_prime(q: int) -> bool:
  return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _sylvester(p: int) -> np.ndarray:
  h = np.ones((1, 1), np.float64)
  while h.shape[0] < p:
    h = np.block([[h, h], [h, -h]])
  return h


def _paley(m: int) -> np.ndarray:
  """Paley's construction I: a Hadamard matrix of order m = q + 1, q prime = 3 (mod 4)."""
  q = m - 1
  residues = {(i * i) % q for i in range(1, q)}
  chi = np.array([0] + [1 if i in residues else -1 for i in range(1, q)], np.float64)
  jac = np.array([[chi[(j - i) % q] for j in range(q)] for i in range(q)])  # Jacobsthal: Q^T = -Q
  s = np.zeros((m, m))
  s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jac
  return s + np.eye(m)


@functools.cache
def factors(k: int) -> tuple[int, int] | None:
  """(m, p) with m * p = k, p a power of two and m = 1 or a Paley order; the most
  balanced such split (cheapest to apply), or None where k has none."""
  best = None
  p = 1
  while p <= k:
    if k % p == 0:
      m = k // p
      if m == 1 or (m % 4 == 0 and m <= _MAX_PALEY and _is_prime(m - 1) and (m - 1) % 4 == 3):
        if best is None or max(m, p) < max(best):
          best = (m, p)
    p *= 2
  return best


def why_not(k: int) -> str | None:
  """None where a K-channel contraction can be rotated, else why not."""
  if factors(k) is None:
    return (f"K = {k} is not 2^j times 1 or a Paley order (q + 1, q prime = 3 mod 4, up to {_MAX_PALEY}): "
            "no Hadamard rotation of that size here")
  return None


@functools.cache
def parts(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(signs (K,), H_m / sqrt(m), H_p / sqrt(p)) in float32."""
  if factors(k) is None:
    raise QuantizationError(why_not(k))
  m, p = factors(k)
  signs = np.where(np.random.default_rng(k).integers(0, 2, k) == 1, 1.0, -1.0)
  hm = _sylvester(1) if m == 1 else _paley(m)
  return (signs.astype(np.float32), (hm / np.sqrt(m)).astype(np.float32),
          (_sylvester(p) / np.sqrt(p)).astype(np.float32))


def matrix(k: int) -> np.ndarray:
  """R (K, K) as a dense float64 matrix (tests; the code applies it in factors)."""
  signs, hm, hp = parts(k)
  return signs.astype(np.float64)[:, None] * np.kron(hm.astype(np.float64), hp.astype(np.float64))


def rotate_rows(x: jax.Array) -> jax.Array:
  """x (M, K) @ R, in f32 (x's rows rotated)."""
  k = x.shape[-1]
  signs, hm, hp = parts(k)
  m, p = hm.shape[0], hp.shape[0]
  y = (x.astype(jnp.float32) * signs).reshape(x.shape[:-1] + (m, p))
  y = jnp.einsum("...ab,ac,bd->...cd", y, hm, hp, precision=jax.lax.Precision.HIGHEST)
  return y.reshape(x.shape)


def rotate_weight(w_kn: jax.Array) -> jax.Array:
  """R^T W for a (K, N) weight, in f32: (x R)(R^T W) = x W."""
  return rotate_rows(jnp.asarray(w_kn, jnp.float32).T).T


def unrotate_weight(w_kn: jax.Array) -> jax.Array:
  """R W' for a rotated (K, N) weight W' = R^T W: W again (stacked: any leading axes)."""
  return jnp.swapaxes(unrotate_rows(jnp.swapaxes(w_kn, -1, -2)), -1, -2)


def unrotate_rows(y: jax.Array) -> jax.Array:
  """y (..., K) @ R^T, in f32: rows of a rotated table (E R) back to E's."""
  k = y.shape[-1]
  signs, hm, hp = parts(k)
  m, p = hm.shape[0], hp.shape[0]
  z = jnp.asarray(y, jnp.float32).reshape(y.shape[:-1] + (m, p))
  z = jnp.einsum("...cd,ac,bd->...ab", z, hm, hp, precision=jax.lax.Precision.HIGHEST)
  return z.reshape(y.shape) * signs
