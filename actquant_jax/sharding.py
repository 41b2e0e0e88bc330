"""Quantized params on a mesh, with JAX's own sharding: qparams keep the float params'
paths, so a user's sharding rules for the float model carry over; this maps each float
kernel's spec onto its QuantizedKernel's fields (the weight is stored transposed). nnx: a
quantized weight's Param is a QuantizedParam, whose spec from nnx.get_partition_spec is
mapped the same way.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from actquant_jax.errors import QuantizationError
from actquant_jax.quant import QuantizedKernel


def kernel_axes(spec, rank: int, contract, out):
  """(k_axis, n_axis): the mesh axes of a weight's K and N from its PartitionSpec -- the
  spec of its single contracted (output) axis; a flattened group of axes is left
  unsharded (None)."""
  spec = tuple(spec) + (None,) * (rank - len(tuple(spec)))
  return (spec[contract[0]] if len(contract) == 1 else None,
          spec[out[0]] if len(out) == 1 else None)


def placement(like, spec: P = P()):
  """Where a small array derived from the array `like` (a weight) should live: `spec` on
  like's mesh for a NamedSharding, replicated over like's devices otherwise; None when
  `like` is not a jax.Array (host data: jax places it)."""
  sharding = getattr(like, "sharding", None)
  if not isinstance(like, jax.Array) or sharding is None:
    return None
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, spec)
  devices = sharding._device_assignment
  if len(devices) == 1:
    return jax.sharding.SingleDeviceSharding(devices[0])
  return NamedSharding(jax.sharding.Mesh(np.array(devices), ("replica",)), P())


def _identity(xs):
  return xs


def to_host(tree):
  """Every array of `tree` as numpy on this host (explicit transfers, started together).

  Under jax.distributed (one process per host, a mesh over every process's devices) an
  array may span devices of other processes, which np.asarray / jax.device_get refuse: a
  replicated one is read from a local copy; the sharded ones are gathered, all of one
  mesh in one program (an all-gather to every process). That is a collective: every
  process must ask for it, in the same order -- as it does running the same program
  (calibrate, quantize_params)."""
  leaves, treedef = jax.tree.flatten(tree)
  spread = {}  # mesh -> indices of its sharded leaves that span other processes
  for i, x in enumerate(leaves):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.sharding.is_fully_replicated:
      if isinstance(x.sharding, NamedSharding):
        spread.setdefault(x.sharding.mesh, []).append(i)
      else:
        from jax.experimental import multihost_utils
        leaves[i] = multihost_utils.process_allgather(x, tiled=True)
  for idx in spread.values():
    xs = tuple(leaves[i] for i in idx)
    whole = jax.jit(_identity, out_shardings=tuple(x.sharding.update(spec=P()) for x in xs))(xs)
    for i, x in zip(idx, whole):
      leaves[i] = x
  leaves = [x.addressable_data(0) if isinstance(x, jax.Array) and not x.is_fully_addressable else x for x in leaves]
  return jax.device_get(jax.tree.unflatten(treedef, leaves))


def put_like(x, like, spec: P = P()):
  """Host data x onto `like`'s devices (see placement): an explicit transfer, so it runs
  under jax.transfer_guard("disallow")."""
  where = placement(like, spec)
  return jax.device_put(x) if where is None else jax.device_put(x, where)


def quantized_partition_specs(qparams, float_specs):
  """PartitionSpecs for qparams from the specs a user's rules give the float params.

  float_specs: the same tree as the float params, a PartitionSpec per leaf. A Dense kernel
  (K, N) with spec (k_axis, n_axis) becomes a QuantizedKernel whose values (N, K) get
  (n_axis, k_axis), per-output-channel scales (n_axis,) -- they follow the weight's
  output axis -- the inverse-smoothing vector (k_axis,), and the scalar act_scale (). A
  scan's layer stack (L, K, N) with spec (l_axis, k_axis, n_axis) keeps l_axis first on
  every field.
  """
  def go(q, s, path):
    if isinstance(q, QuantizedKernel):
      # The float weight's spec per axis; K (N) takes the spec of a single contracted
      # (output) axis -- a flattened group of axes is left unsharded. A scan's layer
      # stack keeps its leading layer axes' specs first on every field.
      rank = len(q.float_shape)
      spec = tuple(s) + (None,) * (rank - len(tuple(s)))
      lead = rank - len(q.contract) - len(q.out)  # layer axes of a stacked weight
      layer = spec[:lead]
      k_axis, n_axis = kernel_axes(spec[lead:], rank - lead, q.contract, q.out)
      return dataclasses.replace(q, values=P(*layer, n_axis, k_axis), scale=P(*layer, n_axis),
                                 act_scale=None if q.act_scale is None else P(*layer),
                                 inv_smooth=None if q.inv_smooth is None else P(*layer, k_axis),
                                 kept=None if q.kept is None else P(*spec))
    if isinstance(q, dict):
      if not isinstance(s, dict) or set(s) != set(q):
        raise QuantizationError(f"quantized_partition_specs: {path or '/'}: float_specs does not match the params tree")
      return {k: go(q[k], s[k], f"{path}/{k}") for k in q}
    return s
  return go(qparams, float_specs, "")


class _QuantizedSpecs:
  """Mixin of QuantizedParam: nnx.get_partition_spec asks a Variable for one spec (from
  its `out_sharding` metadata) and puts it in a copy of it (`replace`); for a
  QuantizedKernel value that spec is the float weight's, and the copy gets it mapped onto
  the QuantizedKernel's leaves (quantized_partition_specs)."""

  __slots__ = ()

  def copy(self, *args, **kwargs):
    if args and isinstance(args[0], P) and isinstance(self.get_raw_value(), QuantizedKernel):
      args = (quantized_partition_specs(self.get_raw_value(), args[0]),) + args[1:]
    return super().copy(*args, **kwargs)

  replace = copy


class QuantizedParam(_QuantizedSpecs, nnx.Param):
  """The nnx.Param of a quantized weight (quantize_model gives its Params this class).

  Its value is a QuantizedKernel; its `out_sharding` metadata stays the float weight's
  annotation (logical axis rules and nnx.scan's axis metadata keep working on it), and
  `nnx.get_partition_spec(state)` gives, for it, a QuantizedKernel of PartitionSpecs, one
  per leaf, as quantized_partition_specs maps the float spec: values (N, K) the spec
  transposed, scales (N,) the output axis's, inv_smooth (K,) the input axis's, act_scale
  replicated. So the usual placement works on a quantized model:

    state = nnx.state(model)
    state = jax.device_put(state, nnx.get_named_sharding(state, mesh))
    nnx.update(model, state)

  (flax reads `out_sharding` as one spec, PartitionSpec(*out_sharding), so a tree of
  specs cannot be stored there: the mapping is done when the spec is asked for.)
  """

  __slots__ = ()


_PARAM_CLASSES: dict = {nnx.Param: QuantizedParam}


def quantized_param_class(cls):
  """The QuantizedParam class for a Param class (a user's Param subclass gets a subclass of
  its own with the mixin)."""
  if issubclass(cls, _QuantizedSpecs):
    return cls
  if cls not in _PARAM_CLASSES:
    _PARAM_CLASSES[cls] = type(f"Quantized{cls.__name__}", (_QuantizedSpecs, cls),
                               {"__slots__": (), "__module__": __name__, "__doc__": QuantizedParam.__doc__})
  return _PARAM_CLASSES[cls]


def shard_quantized(qparams, float_specs, mesh):
  """device_put qparams onto `mesh` following `float_specs` (see quantized_partition_specs)."""
  specs = quantized_partition_specs(qparams, float_specs)
  shardings = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
  return jax.device_put(qparams, shardings)


def sharded_w8a8_dot(x, qk: QuantizedKernel, bias=None, *, mesh, batch_axis=None, k_axis=None, n_axis=None,
                     out_dtype=None, backend: str = "auto", interpret: bool = False):
  """w8a8_dot run per shard under jax.shard_map -- how the Pallas kernels (which XLA's
  partitioner cannot split) run on a mesh.

  x (M, K): rows over `batch_axis`, K over `k_axis`. qk: values (N, K) with output
  channels over `n_axis` and input channels over `k_axis` (the specs
  quantized_partition_specs gives column- and row-parallel layers). With `k_axis`, a
  token's scale needs its whole row: the row absmax is a pmax over `k_axis`, and the
  int32 partial products are psum'd before the epilogue, so the result is exact.
  """
  from actquant_jax import ops  # (ops imports this module's callers; imported on use)

  ops.check_inputs(x, qk, bias, "sharded_w8a8_dot")
  if x.ndim != 2:
    raise QuantizationError(f"sharded_w8a8_dot: x must be (M, K), got shape {x.shape}")
  out_dtype = x.dtype if out_dtype is None else out_dtype
  kernel = ops.choose_kernel(qk, out_dtype=out_dtype, backend=backend, interpret=interpret)
  x_spec, v_spec = P(batch_axis, k_axis), P(n_axis, k_axis)
  qk_spec = dataclasses.replace(qk, values=v_spec, scale=P(n_axis), act_scale=None if qk.act_scale is None else P(),
                                inv_smooth=None if qk.inv_smooth is None else P(k_axis),
                                kept=None if qk.kept is None else P())
  b_spec = None if bias is None else P(n_axis)

  def per_shard(xb, q, b):
    if k_axis is None:  # whole rows here: the plain per-device op (kernels on GPU)
      return ops.w8a8_dot(xb, q, b, out_dtype=out_dtype, backend=backend, interpret=interpret)
    # The kernel's stages, with the row maxima / sums and the partial products reduced
    # over the K shards.
    xq, sx = kernel.quantize(xb, q.inv_smooth, q.act_scale, rotate=q.rotated, k_axis=k_axis)
    acc, flags = kernel.accumulate(xq, q.values, k_axis=k_axis)
    return kernel.epilogue(acc, sx + flags, q.scale, b, out_dtype)

  f = jax.shard_map(per_shard, mesh=mesh, in_specs=(x_spec, qk_spec, b_spec), out_specs=P(batch_axis, n_axis),
                    check_vma=False)
  return f(x, qk, bias)
