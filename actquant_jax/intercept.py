"""Run an unmodified Flax model with quantized params.

The model's own code runs as written; every weight matmul (see _capture: a contraction of
an activation with a parameter, whatever module or jnp function wrote it) whose weight
is a QuantizedKernel runs w8a8_dot instead. Everything else, including weight matmuls
kept in float, is the model's own math.

How: the call is traced once with float stand-ins for the quantized weights (shapes
only) and the traced program is run again with the matmuls replaced; the float weights
are never materialized. A lookup into a quantized weight (a tied embedding's gather)
reads its 8-bit rows and their scales: exactly the dequantized weight's rows. Works under
jax.jit (the tracing is trace-time only), with any apply arguments (`mutable=["cache"]`
for KV-cache decoding, methods). A scan over layers stays a scan: a stacked weight's QuantizedKernel (leading layer axis
on every array) is indexed by the iteration's layer inside the body.

linen: `quantized_apply(model)` gives apply(qparams, ...) like model.apply;
`with quantized(model):` makes model.apply itself take qparams (HF `generate`).
nnx: `quantize_model(model, stats, config)` puts the QuantizedKernels into the model's
Params and makes the model's calls run this way.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from actquant_jax import _capture, backends, ops, rotation
from actquant_jax._dataflow import dataflow_facts, layer_dataflow
from actquant_jax.config import QuantConfig
from actquant_jax.errors import QuantizationError, QuantizationTypeError
from actquant_jax.quant import QuantizedKernel, weight_from_matrix
from actquant_jax.sharding import quantized_param_class
from actquant_jax.transform import quantize_params, quantize_params_with_report

_is_qk = lambda x: isinstance(x, QuantizedKernel)


def _stand_in_spec(qk: QuantizedKernel):
  return jax.ShapeDtypeStruct(qk.float_shape, jnp.dtype(qk.param_dtype))


def _stand_in(qk: QuantizedKernel):
  """What the model's code is traced with: the kept float weight, or just its shape (the
  program then runs with the weight absent: never materialized)."""
  return qk.kept if qk.kept is not None else _stand_in_spec(qk)


class _Table(_capture.Absent):
  """A quantized weight that is not materialized (an Absent): matmul sites read its
  QuantizedKernel, a row lookup (gather) its 8-bit values and scales (_lookup)."""

  def __init__(self, aval, qk: QuantizedKernel):
    super().__init__(aval)
    self.qk = qk

  def rows(self, indices, params):
    return _lookup(self.qk, indices, params)


class _CastTable(_Table):
  """A _Table through a dtype cast of the program: its rows are the table's, cast alike."""

  def __init__(self, aval, base: _Table, eqn):
    super().__init__(aval, base.qk)
    self.base, self.eqn = base, eqn

  def rows(self, indices, params):
    r = self.base.rows(indices, params)
    if self.eqn.primitive.name != "convert_element_type":
      return r
    return jax.lax.convert_element_type(r, self.eqn.params["new_dtype"])


_CASTS = ("convert_element_type", "copy", "copy_p")


def _row_gather(params, qk: QuantizedKernel) -> bool:
  """A gather reading whole slices along the weight's contracted axes at indices into its
  output axes only (nn.Embed, jnp.take(E, ids, axis=0), E[ids] of a tied (vocab, hidden)
  table): each gathered element is one output channel's, so its scale is that channel's."""
  dn = params["dimension_numbers"]
  shape = qk.float_shape
  return (qk.values.ndim == 2 and not tuple(getattr(dn, "operand_batching_dims", ()))
          and set(dn.start_index_map) <= set(qk.out) and set(dn.collapsed_slice_dims) <= set(qk.out)
          and all(params["slice_sizes"][a] == shape[a] for a in qk.contract))


def _table_reads(graph, param: str, qk: QuantizedKernel):
  """How the model reads a quantized weight outside its matmul sites: (row lookups its
  8-bit table can serve, the first read it cannot serve or None). Through dtype casts only
  (the lookup reads the values in the weight's own layout), not inside a scan's layer
  stack."""
  lookups, root = 0, graph.params[param]
  for node in _capture.param_nodes(graph, param):
    todo = [(node, r, False) for r in node.readers]
    while todo:
      src, r, moved = todo.pop()
      if r is None:
        return lookups, "an op without outputs"
      if r.site is not None:
        continue
      if r.prim in _CASTS or r.prim in _capture.LAYOUT_PRIMITIVES:
        todo += [(r, x, moved or r.prim not in _CASTS) for x in r.readers]
        continue
      if (r.prim == "gather" and not moved and node is root and r.inputs and r.inputs[0] is src
          and _row_gather(r.params, qk)):
        lookups += 1
        continue
      what = "a lookup into one layer of a scan's stacked weight" if r.prim == "gather" and node is not root else (
          f"`{r.prim}`" + (" (after a transpose)" if moved else ""))
      return lookups, what
  return lookups, None


def _lookup(qk: QuantizedKernel, indices, params):
  """gather(dequantized weight, indices) without the float weight: the gather run on the
  8-bit values and, with the same indices, on the per-output-channel scales (in the
  weight's layout, size 1 along the contracted axes), multiplied as
  QuantizedKernel.dequantize multiplies them (times the inverse-smoothing vector where
  there is one): bitwise its rows."""
  shape, contract, out = qk.float_shape, tuple(qk.contract), tuple(qk.out)
  dn, sizes = params["dimension_numbers"], tuple(params["slice_sizes"])
  mode, fill = params["mode"], params.get("fill_value")
  g = lambda a, sz, fv: jax.lax.gather(a, indices, dn, sz, unique_indices=params["unique_indices"],
                                       indices_are_sorted=params["indices_are_sorted"], mode=mode, fill_value=fv)
  values = weight_from_matrix(jnp.swapaxes(qk.values, -1, -2), shape, contract, out)
  s_shape = tuple(1 if a in contract else n for a, n in enumerate(shape))
  scale = weight_from_matrix(qk.scale[None, :], s_shape, contract, out)
  # An index out of range gives the fill of the float gather: 1 * fill (NaN by default).
  rows = g(values, sizes, 1).astype(jnp.float32) * g(scale, tuple(1 if a in contract else n for a, n in
                                                                   enumerate(sizes)), fill)
  if qk.rotated:  # the table holds E R along its one contracted axis: rows times R^T
    kept = [a for a in range(len(shape)) if a not in dn.collapsed_slice_dims]
    at = dn.offset_dims[kept.index(contract[0])]
    rows = jnp.moveaxis(rotation.unrotate_rows(jnp.moveaxis(rows, at, -1)), -1, at)
  if qk.inv_smooth is not None:  # along the contracted axes, which are the slices' (offset) axes
    inv = weight_from_matrix(qk.inv_smooth[:, None], tuple(1 if a in out else n for a, n in enumerate(shape)),
                             contract, out)
    inv = inv.reshape([n for a, n in enumerate(inv.shape) if a not in dn.collapsed_slice_dims])
    target = [1] * rows.ndim
    for i, d in enumerate(dn.offset_dims):
      target[d] = inv.shape[i]
    rows = rows * inv.reshape(target)
  return rows.astype(jnp.dtype(qk.param_dtype))


def _serve_table(eqn, ins):
  """_capture.evaluate's on_absent: dtype casts of a _Table stay a _Table (applied to the
  rows it gives), a row gather of one is a _lookup; anything else: None (the default)."""
  t = ins[0] if ins else None
  if not isinstance(t, _Table) or any(isinstance(a, _capture.Absent) for a in ins[1:]):
    return None
  name = eqn.primitive.name
  if name in _CASTS:
    return [_CastTable(eqn.outvars[0].aval, t, eqn)]
  if name == "gather" and _row_gather(eqn.params, t.qk):
    return [t.rows(ins[1], eqn.params)]
  return None


def _layer(qk: QuantizedKernel, layer) -> QuantizedKernel:
  """One layer of a stacked QuantizedKernel (every array's leading axis), or qk itself."""
  if layer is None:
    return qk
  one = jax.tree_util.tree_map(lambda a: a[layer], qk)
  return dataclasses.replace(one, param_shape=tuple(qk.param_shape)[1:])


def _shared_quantize(shared: dict, x, site: _capture.Contraction, x2d, qk: QuantizedKernel,
                     kernel: backends.W8A8Kernel):
  """The activation quantization of a weight matmul reading x: once per (x, layout,
  act_group, quantize pass) in one model call (q/k/v, a gated MLP's gate/up), with the
  settings of the group's first layer (the others' must equal them: see settings_mismatch)."""
  if not qk.act_group:
    return kernel.quantize(x2d, qk.inv_smooth, qk.act_scale, rotate=qk.rotated)
  key = (id(x), tuple(site.x_contract), qk.act_group, qk.rotated, kernel.quantizer, kernel.marks)
  if key not in shared:  # (x is kept in the entry: its id stays unique while the call runs)
    shared[key] = (x, qk, *kernel.quantize(x2d, qk.inv_smooth, qk.act_scale, rotate=qk.rotated))
    return shared[key][2:]
  _, first, xq, sx = shared[key]
  return xq, sx + ops.settings_mismatch(qk, first)


def _group_products(shared: dict, x, x2d, site: _capture.Contraction, members, qks: dict, layer, xq, sx,
                    kernel: backends.W8A8Kernel, out_dtype, interpret: bool):
  """The 2-D products of x with this site's weight and its group's others (the members of
  its act_group reading the same x: q/k/v, gate/up) as one native GEMM call; this site's
  is returned, the others wait in `shared` for their own site (which takes them only if
  it reads this same x). Only where every member runs on the native CPU GEMM."""
  qk = _layer(qks[site.param], layer)
  others = []
  for s in members:
    if s.param == site.param or s.stack != site.stack or ("y", id(x), s.param) in shared:
      continue
    q = _layer(qks[s.param], layer)
    k = ops.choose_kernel(q, m=x2d.shape[0], out_dtype=out_dtype, backend=kernel.requested, interpret=interpret)
    if q.in_features == qk.in_features and (k.backend, k.quantizer, k.marks) == ("cpu", kernel.quantizer,
                                                                                 kernel.marks):
      others.append((s, q))
  if not others:
    return None
  stack = lambda p, q: q.values if layer is None else qks[p].values
  accs, flags = kernel.accumulate_group(xq, [stack(site.param, qk)] + [stack(s.param, q) for s, q in others],
                                        layer=layer)
  for (s, q), acc in zip(others, accs[1:]):
    _, sx_s = _shared_quantize(shared, x, s, x2d, q, kernel)
    shared[("y", id(x), s.param)] = kernel.epilogue(acc, sx_s + flags, q.scale, None, out_dtype)
  return kernel.epilogue(accs[0], sx + flags, qk.scale, None, out_dtype)


def _matmul(site: _capture.Contraction, stacked: QuantizedKernel, layer, x, w, run, backend, interpret, shared: dict,
            members=(), qks=None):
  """The float contraction (run(x, w), or run(w, x) when the weight is the left operand)
  as one 2-D W8A8 matmul with x on the left: contracted axes of x moved last and flattened
  to K (in the weight's pairing order), the output laid out as the dot would lay it out:
  x's free axes, then the weight's output axes -- or, the weight on the left, the
  weight's output axes first (a transpose of the same int8 GEMM's result).

  Inside a scan (layer: the iteration's index) the GEMM gets the stacked 8-bit weight and
  the index: the native kernel reads the layer in place (no per-step copy of it); the
  slice `qk.values` is then unused (and dropped by XLA)."""
  qk = _layer(stacked, layer)
  if (tuple(site.contract), tuple(site.out)) != (tuple(qk.contract), tuple(qk.out)):
    raise QuantizationError(f"quantized_apply: layer {site.layer}: the model contracts weight {site.param} over axes "
                     f"{site.contract} -> {site.out}, but its QuantizedKernel was made for {qk.contract} -> "
                     f"{qk.out} (qparams from another model?)")
  w_spec = jax.ShapeDtypeStruct(w.aval.shape, w.aval.dtype) if isinstance(w, _capture.Absent) else w
  # (An Absent weight is never read: the quantized copy replaces it.)
  out_dtype = (jax.eval_shape(run, w_spec, x) if site.weight_lhs else jax.eval_shape(run, x, w_spec)).dtype
  rest = [a for a in range(x.ndim) if a not in site.x_contract]
  x2 = x if tuple(site.x_contract) == (x.ndim - 1,) else jnp.transpose(x, rest + list(site.x_contract))
  x2 = x2.reshape(x2.shape[:len(rest)] + (-1,))  # the contracted axes flattened to K
  ops.check_inputs(x2, qk, None, site.layer)
  x2d = x2.reshape(-1, qk.in_features)
  kernel = ops.choose_kernel(qk, m=x2d.shape[0], out_dtype=out_dtype, backend=backend, interpret=interpret)
  xq, sx = _shared_quantize(shared, x, site, x2d, qk, kernel)
  # computed with its group's first member (x stays alive in its quantize entry: a unique id)
  y = shared.pop(("y", id(x), site.param), None)
  if y is None and kernel.backend == "cpu" and len(members) > 1:
    y = _group_products(shared, x, x2d, site, members, qks, layer, xq, sx, kernel, out_dtype, interpret)
  if y is None or y.dtype != out_dtype:
    y = kernel.scaled_matmul(xq, sx, qk.values if layer is None else stacked.values, qk.scale, None, out_dtype,
                             layer=layer)
  y = y.reshape([x.shape[a] for a in rest] + [qk.float_shape[a] for a in qk.out])
  if site.weight_lhs and rest:  # dot_general(w, x): the weight's free axes first
    n = len(rest)
    y = jnp.transpose(y, tuple(range(n, y.ndim)) + tuple(range(n)))
  return y


def run_quantized(fn: Callable, qvariables, param_paths_of: Callable, args, kwargs, *, backend: str,
                  interpret: bool, where: str):
  """fn(float_variables, *args, **kwargs) with its weight matmuls on the QuantizedKernels
  found in `qvariables`. param_paths_of(float_variables) -> per-leaf param path."""
  floats = jax.tree_util.tree_map(lambda x: _stand_in(x) if _is_qk(x) else x, qvariables, is_leaf=_is_qk)
  qks = {}
  flat_q = jax.tree_util.tree_leaves(qvariables, is_leaf=_is_qk)
  for path, leaf in zip(param_paths_of(floats), flat_q):
    if _is_qk(leaf):
      if path is None:
        raise QuantizationError(f"{where}: a QuantizedKernel outside the params collection")
      qks[path] = leaf
  program = _capture.trace(lambda v, a, k: fn(v, *a, **k), floats, param_paths_of(floats), args, kwargs)
  graph = _capture.analyze(program)
  routed = {}
  for i, site in graph.sites.items():
    if site.param in qks:
      if site.reason is not None:
        raise QuantizationError(f"{where}: layer {site.layer}: weight {site.param} is quantized but this model uses it "
                         f"in a matmul that cannot run quantized ({site.reason})")
      stacked = qks[site.param].values.ndim - 2
      if stacked != (1 if site.stack else 0) or (site.stack and qks[site.param].values.shape[0] != site.stack):
        what = (lambda n: f"one weight of a stack of {n} scanned layers" if n else "an unstacked weight")
        raise QuantizationError(f"{where}: layer {site.layer}: this model uses weight {site.param} as "
                                f"{what(site.stack)}, but its QuantizedKernel was made for "
                                f"{what(qks[site.param].values.shape[0] if stacked else 0)} (qparams from another "
                                "model?)")
      routed[i] = site
  for p, qk in qks.items():
    if p not in graph.params:
      continue
    if p in graph.seen_inside:
      raise QuantizationError(f"{where}: weight {p} is quantized but contracted inside a `{graph.seen_inside[p]}` "
                              "(a while loop or cond): not supported; write the loop as a scan or unroll it")
    if qk.kept is not None:  # (a float copy, from an older version: it serves every other read)
      continue
    lookups, other = _table_reads(graph, p, qk)
    if other is not None:
      raise QuantizationError(f"{where}: weight {p} is quantized, but this model also reads it outside its matmuls, "
                              f"with {other}: its 8-bit table serves row lookups only (nn.Embed, jnp.take, E[ids]). "
                              f"Keep it in float: LayerRule({_capture.layer_name(p)!r}, skip=True)")
    if lookups and qk.folded_into:
      raise QuantizationError(f"{where}: weight {p} is read by a lookup, but its 8-bit table holds the smoothed weight "
                              f"(its 1/s was folded into {', '.join(qk.folded_into)}), which a lookup cannot read: "
                              "quantize it again (quantize_params does not smooth a weight a lookup reads)")
    if lookups and qk.rotated and len(qk.contract) != 1:
      raise QuantizationError(f"{where}: weight {p} is read by a lookup, but its 8-bit table holds the weight rotated "
                              f"over {len(qk.contract)} contracted axes, which a lookup cannot undo: quantize it again "
                              "(quantize_params rotates a lookup's table only over one contracted axis)")
  _check_folds(graph, qks, routed, where)
  # The stand-ins were for tracing only: a weight with no float copy is not materialized
  # (a lookup reads its 8-bit table: _Table).
  absent = jax.tree_util.tree_map(lambda x: _Table(_stand_in_spec(x), x)
                                  if _is_qk(x) and x.kept is None else x, qvariables, is_leaf=_is_qk)
  absent = jax.tree_util.tree_map(lambda x: x.kept if _is_qk(x) else x, absent, is_leaf=_is_qk)
  inputs = (jax.tree_util.tree_leaves(absent, is_leaf=lambda x: isinstance(x, _capture.Absent))
            + _capture.program_inputs({}, (args, kwargs)))
  shared = {}  # activation quantizations of this call, by input and act_group; group products
  groups = {}  # members of an act_group, by (group, scan, x's layout)
  for site in routed.values():
    if qks[site.param].act_group:
      groups.setdefault((qks[site.param].act_group, site.scan, tuple(site.x_contract)), []).append(site)
  members = lambda site: groups.get((qks[site.param].act_group, site.scan, tuple(site.x_contract)), ())
  flat, _ = _capture.evaluate(program, inputs,
                              lambda site, x, w, run, layer: (_matmul(site, qks[site.param], layer, x, w, run,
                                                                      backend, interpret, shared, members(site),
                                                                      qks), None),
                              routed, on_absent=_serve_table)
  return _capture.unflatten_output(program, flat)


def _check_folds(graph, qks, routed, where):
  """A layer whose 1/s was folded into its producers must, here too, read only their
  output (else the model computes X / s where X was meant: stats of another model); and
  every layer's dataflow must be the calibrated one (static scales, runtime vectors and
  groups were chosen for it)."""
  if not any(qks[s.param].folded_into or qks[s.param].dataflow for s in routed.values()):
    return
  facts = dataflow_facts(graph)
  for s in routed.values():
    qk = qks[s.param]
    f = facts.get(s.layer)
    if qk.folded_into and (f is None or not f.exclusive or set(f.producers) != set(qk.folded_into)):
      seen = "nothing" if f is None else f"{', '.join(p or 'a plain op' for p in f.producers)}" + (
          "" if f.exclusive else " (whose output other ops read too)")
      raise QuantizationError(f"{where}: layer {s.layer}: its smoothing was folded into {', '.join(qk.folded_into)} when "
                       f"quantized, but in this model its input comes from {seen}. The qparams were made with "
                       "stats of a different model structure: calibrate this model and quantize again")
    if qk.dataflow and f is not None and layer_dataflow(f, s.contract, s.out) != qk.dataflow:
      raise QuantizationError(f"{where}: layer {s.layer}: its input here (from "
                       f"{', '.join(p or 'a plain op' for p in f.producers)}) is not what its stats were calibrated "
                       "on. The qparams were made with stats of a different model structure: calibrate this model "
                       "and quantize again")


def quantized_apply(model: nn.Module, *, method: str | Callable | None = None, backend: str = "auto",
                    interpret: bool = False) -> Callable:
  """apply(qparams, *args, **kwargs) -> model.apply(qparams, *args, method=method, **kwargs)
  with every weight matmul whose weight is a QuantizedKernel run by w8a8_dot.

  Any apply keyword works: `mutable=["cache"]` (KV-cache decoding returns (y, updated
  variables) as model.apply does), `rngs`, flags. backend / interpret: as w8a8_dot.
  """
  if not isinstance(model, nn.Module):
    raise QuantizationTypeError(f"quantized_apply: expected a linen Module, got {type(model).__name__} "
                    "(for nnx use aq.quantize_model)")

  def apply(qparams, *args, **kwargs):
    return run_quantized(lambda v, *a, **k: model.apply(v, *a, method=method, **k), qparams,
                         _capture.linen_param_paths, args, kwargs, backend=backend, interpret=interpret,
                         where="quantized_apply")

  return apply


@contextlib.contextmanager
def quantized(model: nn.Module, *, backend: str = "auto", interpret: bool = False):
  """Within the block, `model.apply(variables, ...)` accepts qparams (every apply path:
  any method, `mutable=["cache"]`, rngs) and runs its weight matmuls in 8 bits -- for
  code that calls `model.apply` itself, e.g. HF generation:

    with aq.quantized(hf_model.module):
      hf_model.generate(ids, params=qparams["params"])

  Only this module object is affected, and only until the block ends.
  """
  if not isinstance(model, nn.Module):
    raise QuantizationTypeError(f"quantized: expected a linen Module, got {type(model).__name__}")
  if "apply" in vars(model):
    raise QuantizationError("quantized: this module is already inside an aq.quantized block")
  float_apply = model.apply

  def apply(variables, *args, method=None, **kwargs):
    return run_quantized(lambda v, *a, **k: float_apply(v, *a, method=method, **k), variables,
                         _capture.linen_param_paths, args, kwargs, backend=backend, interpret=interpret,
                         where="quantized")

  object.__setattr__(model, "apply", apply)  # an instance attribute: the class is untouched
  try:
    yield model
  finally:
    object.__delattr__(model, "apply")


# ---------------------------------------------------------------- nnx

def _quantized_call(self, *args, **kwargs):
  """__call__ of a quantized nnx model: the original call, weight matmuls in 8 bits;
  non-param state the call updates (caches, RNG counters) is written back."""
  base = type(self).__aq_float_class__
  graphdef, state = nnx.split(self)
  settings = type(self).__aq_settings__

  def fn(st, *a, **k):
    m = nnx.merge(graphdef, st)
    object.__setattr__(m, "__class__", base)  # the float class: its own __call__
    out = base.__call__(m, *a, **k)
    return out, nnx.state(m, nnx.Not(nnx.Param))

  out, rest = run_quantized(fn, state, _capture.nnx_param_paths, args, kwargs, where="quantize_model", **settings)
  nnx.update(self, rest)
  return out


def _quantized_class(cls, backend: str, interpret: bool):
  return type(cls.__name__, (cls,), {"__call__": _quantized_call, "__aq_float_class__": cls,
                                     "__aq_settings__": dict(backend=backend, interpret=interpret),
                                     "__module__": cls.__module__, "__qualname__": cls.__qualname__})


def quantize_model(model: nnx.Module, stats, config: QuantConfig = QuantConfig(), *, copy: bool = False,
                   backend: str = "auto", interpret: bool = False):
  """Quantize an nnx model: each calibrated weight's nnx.Param gets its QuantizedKernel,
  producers that absorbed 1/s get their new params, and calling the model runs its weight
  matmuls in 8 bits (any module kind, layers in nnx.List / nnx.Sequential / dicts). A
  module referenced from two attributes (a tie) is one set of Params: quantized once, the
  tie kept. In place unless copy=True (which clones first).

  Memory: the quantized tree is built from the model's own param arrays (no float copy
  of the model), so the peak is the float params plus the int8 kernels (~1.25x for f32).

  Sharding: a quantized weight's Param becomes a QuantizedParam (an nnx.Param), its
  `out_sharding` annotation kept; nnx.get_partition_spec maps it onto the QuantizedKernel's
  leaves, so `jax.device_put(state, nnx.get_named_sharding(state, mesh))` and nnx.update
  place the quantized model as the float one would be.
  """
  model = _target(model, copy)
  return _install(model, quantize_params(_float_params(model), stats, config), backend, interpret)


def quantize_model_with_report(model: nnx.Module, stats, config: QuantConfig = QuantConfig(), *,
                               copy: bool = False, backend: str = "auto", interpret: bool = False):
  """quantize_model, and quantize_params_with_report's report: (model, {layer: LayerReport})."""
  model = _target(model, copy)
  qpure, report = quantize_params_with_report(_float_params(model), stats, config)
  return _install(model, qpure, backend, interpret), report


def _target(model, copy: bool):
  """The nnx model quantize_model writes into: the model, or its clone."""
  if not isinstance(model, nnx.Module):
    raise QuantizationTypeError(f"quantize_model: expected an nnx Module, got {type(model).__name__}")
  return nnx.clone(model) if copy else model


def _float_params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _install(model, qpure, backend: str, interpret: bool):
  """The model with the quantized params `qpure` written into its Params, its calls in 8 bits."""
  # Write every param back through its Variable (shared Variables are one object: a tie
  # stays a tie).
  params = nnx.state(model, nnx.Param)
  flat_vars = dict(nnx.to_flat_state(params))
  for path, value in _flatten_pure(qpure):
    var = flat_vars.get(path)
    if var is None:
      raise QuantizationError(f"quantize_model: no Param at {'/'.join(map(str, path))}")
    if value is not var.get_value():
      var.set_value(value)
  nnx.update(model, params)
  # A quantized weight's Param maps the float weight's sharding spec onto the
  # QuantizedKernel's leaves when nnx.get_partition_spec asks for it (QuantizedParam).
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Param) and isinstance(node.get_raw_value(), QuantizedKernel):
      object.__setattr__(node, "__class__", quantized_param_class(type(node)))
  cls = type(model)
  if not hasattr(cls, "__aq_float_class__"):
    object.__setattr__(model, "__class__", _quantized_class(cls, backend, interpret))
  return model


def _flatten_pure(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten_pure(v, prefix + (k,))
  else:
    yield prefix, tree
