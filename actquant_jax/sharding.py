"""Quantized params on a mesh, with JAX's own sharding: qparams keep the float params'
paths, so a user's sharding rules for the float model carry over; this maps each float
kernel's spec onto its QuantizedKernel's fields (the weight is stored transposed).
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from actquant_jax.quant import QuantizedKernel


def quantized_partition_specs(qparams, float_specs):
  """PartitionSpecs for qparams from the specs a user's rules give the float params.

  float_specs: the same tree as the float params, a PartitionSpec per leaf. A Dense kernel
  (K, N) with spec (k_axis, n_axis) becomes a QuantizedKernel whose values (N, K) get
  (n_axis, k_axis), per-output-channel scales (n_axis,) -- they follow the weight's
  output axis -- the inverse-smoothing vector (k_axis,), and the scalar act_scale ().
  """
  def go(q, s, path):
    if isinstance(q, QuantizedKernel):
      spec = tuple(s) + (None,) * (2 - len(tuple(s)))
      k_axis, n_axis = spec
      return QuantizedKernel(P(n_axis, k_axis), P(n_axis), None if q.act_scale is None else P(),
                             None if q.inv_smooth is None else P(k_axis), q.qtype)
    if isinstance(q, dict):
      if not isinstance(s, dict) or set(s) != set(q):
        raise ValueError(f"quantized_partition_specs: {path or '/'}: float_specs does not match the params tree")
      return {k: go(q[k], s[k], f"{path}/{k}") for k in q}
    return s
  return go(qparams, float_specs, "")


def shard_quantized(qparams, float_specs, mesh):
  """device_put qparams onto `mesh` following `float_specs` (see quantized_partition_specs)."""
  specs = quantized_partition_specs(qparams, float_specs)
  shardings = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
  return jax.device_put(qparams, shardings)
