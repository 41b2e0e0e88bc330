"""The alpha="auto" search as it was before it ran jitted on the weights' devices: the
reference tests/test_smooth.py and tests/test_transform.py hold the new one to."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import actquant_jax as aq
from actquant_jax import smooth


@functools.partial(jax.jit, static_argnames=("qtype",))
def _previous_outputs(x, k, s, inv, act_scale, qtype):
  qk = aq.quantize_kernel(k if s is None else k * s[:, None], qtype, act_scale=act_scale, inv_smooth=inv)
  return x @ k, aq.w8a8_dot(x, qk, backend="xla")


def previous_choose_alpha(samples, kernels, x_absmax, grid, qtype, act_mode):
  """The alpha search as it was before it ran in one jitted call per group on the weights'
  devices: s, 1/s and the static scale in numpy on the host, then per candidate and layer
  quantize_kernel(diag(s) W) + w8a8_dot (here jitted per call: the same operations as the
  eager calls, for test time), the errors summed in float64 on the host. The reference
  the new search must agree with."""
  w_absmax = np.max(np.stack([np.abs(np.asarray(k, np.float32)).max(1) for k in kernels]), 0)
  x = jnp.asarray(samples, jnp.float32)
  errors = {}
  for a in grid:
    s = None if a is None else smooth.smoothing_factors(x_absmax, w_absmax, a)
    act = smooth.static_act_scale(samples, s, qtype) if act_mode == "static" else None
    errors[a] = 0.0
    for kern in kernels:
      y, yq = (np.asarray(v, np.float64) for v in _previous_outputs(
          x, jnp.asarray(kern, jnp.float32), s, None if s is None else (1.0 / s).astype(np.float32), act, qtype))
      den = float(np.sum(y * y))
      errors[a] += float(np.sum((yq - y) ** 2)) / den if den > 0 else 0.0
  return min(grid, key=lambda a: (errors[a], -1 if a is None else a)), errors
