"""Quickstart: one Dense layer's matmul in W8A8, int8 and FP8, against float32.

  python examples/quickstart.py
"""

import jax
import jax.numpy as jnp

import actquant_jax as aq

kx, kw, kb = jax.random.split(jax.random.key(0), 3)
x = jax.random.normal(kx, (4, 128, 512))             # (batch, tokens, hidden) activations
x = x.at[..., 7].multiply(50.0)                       # one systematic outlier channel
w = jax.random.normal(kw, (512, 1024)) / 512**0.5    # a Dense kernel, (in, out)
b = jax.random.normal(kb, (1024,))
y_ref = x @ w + b

for qtype in ("int8", "float8_e4m3fn"):
  qk = aq.quantize_kernel(w, qtype)                  # int8/fp8 (out, in) + per-channel scales
  y = jax.jit(aq.w8a8_dot)(x, qk, b)                 # per-token dynamic activation quant
  rel = jnp.linalg.norm(y - y_ref) / jnp.linalg.norm(y_ref)
  print(f"{qtype:14s} dynamic per-token  rel. error {float(rel):.2e}  "
        f"weight bytes {qk.values.nbytes + qk.scale.nbytes} vs {w.nbytes} (f32)")

# Static per-tensor activation scale (calibrated offline): the outlier channel sets the
# scale, so normal channels lose resolution -- the problem smoothing solves.
act_scale = jnp.max(jnp.abs(x)) / 127
qk = aq.quantize_kernel(w, act_scale=act_scale)
y = jax.jit(aq.w8a8_dot)(x, qk, b)
print(f"int8           static per-tensor rel. error "
      f"{float(jnp.linalg.norm(y - y_ref) / jnp.linalg.norm(y_ref)):.2e}")

# Smoothing by hand: s_j = sqrt(max|X_j| / max|W_j|), X W = (X / s)(s W).
s = jnp.sqrt(jnp.max(jnp.abs(x), axis=(0, 1)) / jnp.max(jnp.abs(w), axis=1))
qk = aq.quantize_kernel(w * s[:, None], act_scale=jnp.max(jnp.abs(x / s)) / 127, inv_smooth=1 / s)
y = jax.jit(aq.w8a8_dot)(x, qk, b)
print(f"int8 smoothed  static per-tensor rel. error "
      f"{float(jnp.linalg.norm(y - y_ref) / jnp.linalg.norm(y_ref)):.2e}")
