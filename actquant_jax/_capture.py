"""The one notion of a quantizable matmul, shared by calibration and inference.

A *weight contraction* is a `dot_general` in the traced program one of whose operands
is a parameter (reached from the param leaf through layout-only ops: transpose, dtype
casts) and the other is not. Every way to write a matmul -- `lax.dot_general`,
`jnp.einsum`, `jnp.dot`, `jnp.matmul`, `@`, nn.Dense / DenseGeneral / Einsum, nnx
Linear / LinearGeneral / Einsum, HF's `FlaxConv1D`, `x @ E.T` -- becomes such an
equation, so the parameter is found by dataflow identity, never by class or name.
Contractions of two activations (attention) are not weight contractions.

Why the jaxpr and not patched jax functions (qwix's way): one definition reached by
every spelling (aliases bound at import time included), no global patching, thread
safe, and lifted transforms are plain nested jaxprs (jit and remat are inlined here),
so statistics leave through the program's outputs, never through Python state.

Scans (`nn.scan`, `nnx.scan`, `jax.lax.scan` over stacked layer params): a `scan` whose
body has a matmul is interpreted, not inlined. A param fed to it as a scanned operand
(`xs`, leading axis L) is seen in the body as a *view*: the same param path, one layer
of it; its contraction is a site with `stack` = L and `scan` = which scan slices it. A
param fed as a loop-invariant operand (`consts`) is the same node in the body (one
weight called L times). `evaluate` runs the scan as a `lax.scan` whose body is the
interpreter again: the handler of a stacked site gets the iteration's layer index, and
what it records leaves as the scan's stacked outputs (per layer), never through Python
state.

Two passes over one traced program, in the same order:
- `analyze`: a symbolic run giving the flat dataflow graph -- the contraction sites and,
  for folding, which op produced each activation and who else reads it.
- `evaluate`: a concrete run (under the caller's jit) that hands each weight
  contraction to a handler (record statistics / run w8a8_dot).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.extend
import numpy as np
from flax import nnx

from actquant_jax.errors import QuantizationError

Literal = jax.extend.core.Literal
# Sub-programs run inline (their boundary has no meaning for a forward pass).
_INLINE = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
           "remat2": "jaxpr", "checkpoint": "jaxpr", "remat": "jaxpr"}
# Inlined only when they contain a matmul (else kept, with their custom derivatives).
_INLINE_IF_DOT = {"custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
                  "custom_vjp_call_jaxpr": "fun_jaxpr"}
# Ops between a param and a matmul operand that keep the weight's values.
LAYOUT_PRIMITIVES = ("transpose", "convert_element_type", "copy", "copy_p")


def _jaxpr_of(sub):
  """(jaxpr, consts) of a ClosedJaxpr or an open Jaxpr."""
  if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):
    return sub.jaxpr, list(sub.consts)
  return sub, []


def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    for s in (v if isinstance(v, (tuple, list)) else (v,)):
      if hasattr(s, "eqns") or (hasattr(s, "jaxpr") and hasattr(s, "consts")):
        yield _jaxpr_of(s)[0]


def _has_dot(jaxpr) -> bool:
  return any(e.primitive.name == "dot_general" or any(_has_dot(j) for j in _sub_jaxprs(e)) for e in jaxpr.eqns)


def _inlined(eqn):
  name = eqn.primitive.name
  if name in _INLINE and _INLINE[name] in eqn.params:
    return _jaxpr_of(eqn.params[_INLINE[name]])
  if name in _INLINE_IF_DOT and _INLINE_IF_DOT[name] in eqn.params:
    j, c = _jaxpr_of(eqn.params[_INLINE_IF_DOT[name]])
    if _has_dot(j):
      return j, c
  return None


def runs_scan(eqn) -> bool:
  """A scan whose body runs a matmul: interpreted (per-layer weights), not bound as is."""
  return eqn.primitive.name == "scan" and _has_dot(_jaxpr_of(eqn.params["jaxpr"])[0])


def _scan_parts(eqn):
  """(body jaxpr, its consts, number of consts, number of carries): a scan's operands are
  consts (loop-invariant), then the carries, then the scanned xs (leading axis: length)."""
  body, bconsts = _jaxpr_of(eqn.params["jaxpr"])
  nc, ncar = eqn.params["num_consts"], eqn.params["num_carry"]
  return body, bconsts, nc, ncar


def _interpret(jaxpr, consts, args, bind, lift_const, scan=None):
  env: dict = {}
  read = lambda v: v.val if isinstance(v, Literal) else env[v]
  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
  for v, a in zip(jaxpr.invars, args):
    env[v] = a
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    sub = _inlined(eqn)
    if sub is not None:
      j, c = sub
      outs = _interpret(j, [lift_const(x) for x in c], ins, bind, lift_const, scan)
    elif scan is not None and runs_scan(eqn):
      outs = scan(eqn, ins)
    else:
      outs = bind(eqn, ins)
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
  return [read(v) for v in jaxpr.outvars]


# ---------------------------------------------------------------- the traced program

@dataclasses.dataclass(frozen=True)
class Program:
  """A model call traced once: the jaxpr, which flat inputs are params (their paths),
  and how to rebuild the output pytree."""

  closed: Any
  param_paths: tuple      # per flat input: "module/path/name" for a param leaf, else None
  out_tree: Any


def _key_str(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def linen_param_paths(variables) -> list:
  """Per flat leaf of linen `variables`: its path inside the "params" collection, or None."""
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  out = []
  for path, _ in leaves:
    keys = [_key_str(k) for k in path]
    out.append("/".join(keys[1:]) if keys and keys[0] == "params" else None)
  return out


def nnx_param_paths(state) -> list:
  """Per flat leaf of an nnx State: the path of its nnx.Param variable, or None."""
  out = []
  for path, var in jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
    n = len(jax.tree_util.tree_leaves(var))
    name = "/".join(_key_str(k) for k in path) if isinstance(var, nnx.Param) else None
    out += [name] * n
  return out


def trace(fn: Callable, variables, param_paths: list, *rest) -> Program:
  """Trace fn(variables, *rest). Leaves of `rest` that are not arrays are closed over
  (static: flags, `mutable=[...]`), so any apply signature can be traced."""
  leaves, tree = jax.tree_util.tree_flatten(rest)
  dyn = [isinstance(x, (jax.Array, np.ndarray, np.generic)) or hasattr(x, "aval") for x in leaves]

  def flat_fn(variables, dyn_leaves):
    it = iter(dyn_leaves)
    full = [next(it) if d else x for x, d in zip(leaves, dyn)]
    return fn(variables, *jax.tree_util.tree_unflatten(tree, full))

  dyn_leaves = [x for x, d in zip(leaves, dyn) if d]
  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(variables, dyn_leaves)
  n_dyn = len(jax.tree_util.tree_leaves(dyn_leaves))
  return Program(closed, tuple(param_paths) + (None,) * n_dyn, jax.tree_util.tree_structure(out_shape))


def program_inputs(variables, rest) -> list:
  leaves = jax.tree_util.tree_leaves(rest)
  dyn = [x for x in leaves if isinstance(x, (jax.Array, np.ndarray, np.generic)) or hasattr(x, "aval")]
  return jax.tree_util.tree_leaves(variables) + jax.tree_util.tree_leaves(dyn)


# ---------------------------------------------------------------- symbolic run: the graph

class Node:
  """A value of the flattened program: made by `prim` from `inputs`."""

  __slots__ = ("prim", "params", "inputs", "shape", "param", "out_index", "readers", "site", "scan", "stack")

  def __init__(self, prim, params=None, inputs=(), shape=(), param=None, out_index=0):
    self.prim, self.params, self.inputs, self.shape = prim, params or {}, list(inputs), tuple(shape)
    self.param, self.out_index, self.readers, self.site = param, out_index, [], None
    # A param view inside a scan body: which scan slices the stacked param, and its length.
    self.scan, self.stack = -1, 0


@dataclasses.dataclass(frozen=True)
class Contraction:
  """One weight contraction site.

  index:      call index: its order among the program's matmuls.
  param:      the weight's param path ("block_0/attn/query/kernel").
  layer:      the layer name (see `layer_name`).
  param_shape: the weight's shape.
  contract:   weight axes contracted with the activation, paired with x_contract.
  x_contract: the activation's contracted axes (in the dot as the model wrote it).
  out:        the weight's free axes, in the order they appear in the output.
  batch:      weight batch axes (per-head weights); float for now when non-empty.
  weight_lhs: the weight was the left operand (`dot_general(w, x)`, as jnp.einsum writes
              'BSD,CKDH->CBSKH'): the same contraction, its output laid out with the
              weight's free axes first, then x's (dot_general's order: batch, lhs free,
              rhs free). It is quantized like the other order: the 2-D W8A8 matmul runs
              with x on the left and its result is transposed back.
  perm:       operand axis i is weight axis perm[i] (layout ops between them).
  reason:     None when quantizable, else why it stays float.
  stack:      0, or L: the weight is one layer of a param stacked along a leading axis of
              L layers that a scan slices (param_shape, contract and out are then the
              layer's: the stacked param is (L,) + param_shape).
  scan:       which scan (in program order) slices it, or -1.
  """

  index: int
  param: str
  layer: str
  param_shape: tuple
  contract: tuple
  x_contract: tuple
  out: tuple
  batch: tuple
  weight_lhs: bool
  perm: tuple
  reason: str | None = None
  stack: int = 0
  scan: int = -1


def layer_name(param: str) -> str:
  """A layer is named by the path of the module holding its weight when the weight is
  called `kernel` (Flax's Dense-like modules: the names rules and reports used so far),
  else by the weight's own path (raw params, tied embeddings)."""
  module, _, name = param.rpartition("/")
  return module if name == "kernel" and module else param


def weight_source(node: Node):
  """(param node, perm) if `node` is a param seen through layout-only ops, else None."""
  perm = None
  while True:
    if node.param is not None:
      p = tuple(range(len(node.shape))) if perm is None else perm
      return node, p
    if node.prim not in LAYOUT_PRIMITIVES or not node.inputs:
      return None
    if node.prim == "transpose":
      t = tuple(node.params["permutation"])
      perm = t if perm is None else tuple(t[i] for i in perm)
    node = node.inputs[0]


@dataclasses.dataclass
class Graph:
  sites: dict           # index -> Contraction
  x_node: dict          # index -> the activation Node
  out_node: dict        # index -> the output Node
  params: dict          # param path -> Node
  outputs: list         # the program's output Nodes, and every scan body's (read by the next iteration)
  seen_inside: dict     # param path -> primitive (while, cond, ...) it is contracted in: not supported
  views: dict = dataclasses.field(default_factory=dict)  # param path -> its Nodes inside scan bodies


def param_nodes(graph: Graph, param: str) -> list:
  """The param's node and its views inside scan bodies (a loop-invariant param is the
  same node inside the body)."""
  return [graph.params[param]] + graph.views.get(param, [])


def param_readers(graph: Graph, param: str) -> list:
  return [r for n in param_nodes(graph, param) for r in n.readers]


def _sliced_param(node: Node):
  """The param node if `node` is a param seen through dtype casts only (a scan slices its
  leading axis: a transpose would change which axis that is), else None."""
  while node.param is None:
    if node.prim not in ("convert_element_type", "copy", "copy_p") or not node.inputs:
      return None
    node = node.inputs[0]
  return node


def _literal(value) -> Node:
  return Node("literal", {"value": value} if np.size(value) == 1 else None, shape=np.shape(value))


def constant_value(node: Node):
  """The float value of a node that is one constant everywhere (a literal or scalar
  constant, through broadcasts, reshapes and dtype casts), else None."""
  while node.prim in ("broadcast_in_dim", "reshape", "convert_element_type", "expand_dims", "squeeze") and node.inputs:
    node = node.inputs[0]
  if node.prim in ("literal", "const") and "value" in node.params:
    try:
      return float(np.asarray(node.params["value"]).reshape(()))
    except (TypeError, ValueError):
      return None
  return None


def analyze(program: Program) -> Graph:
  jaxpr, consts = program.closed.jaxpr, program.closed.consts
  params: dict[str, Node] = {}
  args = []
  for v, p in zip(jaxpr.invars, program.param_paths):
    n = Node("param" if p else "input", shape=getattr(v.aval, "shape", ()), param=p)
    if p:
      params[p] = n
    args.append(n)
  sites, x_node, out_node, seen_inside, views = {}, {}, {}, {}, {}
  escapes: list = []
  counter, scans = [0], [0]

  def lift_const(c):
    # (a scalar's value is kept: the dataflow reads constants such as the 1 of `1 + g`)
    return Node("const", {"value": c} if np.size(c) == 1 else None, shape=np.shape(c))

  def scan(eqn, ins):
    sid = scans[0]
    scans[0] += 1
    body, bconsts, nc, ncar = _scan_parts(eqn)
    ins_n = [x if isinstance(x, Node) else _literal(x) for x in ins]
    body_args, forwarded = [], set()
    for i, (x, v) in enumerate(zip(ins_n, body.invars)):
      shape = getattr(v.aval, "shape", ())
      src = _sliced_param(x) if i >= nc + ncar else None
      if i < nc:  # loop-invariant: the same value at every iteration
        body_args.append(x)
        forwarded.add(i)
      elif src is not None and src.scan < 0:  # a stacked param: one layer per iteration
        view = Node("param", shape=shape, param=src.param)
        view.scan, view.stack = sid, int(eqn.params["length"])
        views.setdefault(src.param, []).append(view)
        body_args.append(view)
        forwarded.add(i)
      else:
        if src is not None:  # a layer of a layer: nested stacking
          seen_inside.setdefault(src.param, "scan (nested: a scan over a weight already sliced by an outer scan)")
        body_args.append(Node("carry" if i < nc + ncar else "xs", shape=shape))
    outs_b = _interpret(body, [lift_const(c) for c in bconsts], body_args, bind, lift_const, scan)
    escapes.extend(o for o in outs_b if isinstance(o, Node))
    outs = [Node("scan", eqn.params, ins_n, getattr(v.aval, "shape", ()), out_index=i)
            for i, v in enumerate(eqn.outvars)]
    for i, x in enumerate(ins_n):
      if i not in forwarded:
        x.readers.append(outs[0] if outs else None)
    return outs

  def bind(eqn, ins):
    ins_n = [x if isinstance(x, Node) else _literal(x) for x in ins]
    outs = [Node(eqn.primitive.name, eqn.params, ins_n, getattr(v.aval, "shape", ()), out_index=i)
            for i, v in enumerate(eqn.outvars)]
    for x in ins_n:
      x.readers.append(outs[0] if outs else None)
    if eqn.primitive.name == "dot_general":
      idx = counter[0]
      counter[0] += 1
      site = _site(idx, eqn, ins_n)
      if site is not None:
        sites[idx] = site
        x_node[idx] = ins_n[1] if site.weight_lhs else ins_n[0]
        out_node[idx] = outs[0]
        outs[0].site = idx
    elif any(True for _ in _sub_jaxprs(eqn)) and any(_has_dot(j) for j in _sub_jaxprs(eqn)):
      for x in ins_n:
        src = weight_source(x)
        if src is not None:
          seen_inside.setdefault(src[0].param, eqn.primitive.name)
    return outs

  outputs = _interpret(jaxpr, [lift_const(c) for c in consts], args, bind, lift_const, scan)
  return Graph(sites, x_node, out_node, params, outputs + escapes, seen_inside, views)


def _site(idx, eqn, ins) -> Contraction | None:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  srcs = [weight_source(x) for x in ins]
  if (srcs[0] is None) == (srcs[1] is None):
    return None  # activation x activation (attention), or weight x weight
  w_lhs = srcs[0] is not None
  pnode, perm = srcs[0] if w_lhs else srcs[1]
  wc, xc, wb = (lc, rc, lb) if w_lhs else (rc, lc, rb)
  contract = tuple(perm[a] for a in wc)
  batch = tuple(perm[a] for a in wb)
  free_operand = [a for a in range(len(perm)) if a not in wc and a not in wb]
  out = tuple(perm[a] for a in free_operand)
  reason = None
  if batch:
    reason = "weight has batch axes (per-head weights): not supported yet"
  elif not out:
    reason = "weight has no output axis (a matrix-vector reduction)"
  return Contraction(idx, pnode.param, layer_name(pnode.param), pnode.shape, contract, tuple(xc), out, batch,
                     w_lhs, perm, reason, stack=pnode.stack, scan=pnode.scan)


# ---------------------------------------------------------------- concrete run

class Absent:
  """Stands for a weight that is not materialized (only its quantized copy exists): layout
  ops pass it on, and only the matmul sites given to `evaluate` may read it."""

  def __init__(self, aval):
    self.aval = aval


def evaluate(program: Program, inputs: list, on_contraction: Callable, sites: dict, *,
             reduce_aux: Callable = lambda site, aux: aux, on_absent: Callable | None = None):
  """Run the program on flat `inputs`; at each site in `sites` call
  on_contraction(site, x, w, run, layer) -> (y, aux) (run(x, w) is the original float
  matmul; w may be an Absent; layer: for a stacked site (site.stack > 0), the iteration's
  layer index, a traced int32 scalar, else None; aux: a pytree of arrays about that call,
  or None). Returns (the flat outputs, {site index: aux}).

  A site inside a scan runs once per iteration: its aux leaves the scan as a scan output,
  stacked along a new leading axis -- kept for a stacked site of that scan (per layer),
  else merged by reduce_aux(site, stacked aux) (the calls of one weight; default: kept).

  on_absent(eqn, ins) -> outputs or None: asked first when an op other than a matmul site
  reads an Absent (a quantized weight's lookup served from its 8-bit values); None: the
  default (layout ops pass the Absent on, anything else raises).
  """
  counter, scans = [0], [0]
  iters: dict = {}    # scan id -> the current iteration's index (inside its body)
  aux: list = [{}]    # recorded aux, innermost scan body last

  def bind(eqn, ins):
    params = eqn.primitive.get_bind_params(eqn.params)
    run = lambda *a: eqn.primitive.bind(*a, **params)
    if eqn.primitive.name == "dot_general":
      idx = counter[0]
      counter[0] += 1
      site = sites.get(idx)
      if site is not None and site.reason is None:
        x, w = (ins[1], ins[0]) if site.weight_lhs else (ins[0], ins[1])
        y, aux[-1][idx] = on_contraction(site, x, w, run, iters[site.scan] if site.stack else None)
        return [y]
    if any(isinstance(a, Absent) for a in ins):
      served = None if on_absent is None else on_absent(eqn, ins)
      if served is not None:
        return served
      if eqn.primitive.name in LAYOUT_PRIMITIVES:
        return [Absent(v.aval) for v in eqn.outvars]
      raise QuantizationError(f"a quantized weight without its float copy is read by `{eqn.primitive.name}`")
    out = run(*ins)
    return out if eqn.primitive.multiple_results else [out]

  def scan(eqn, ins):
    sid = scans[0]
    scans[0] += 1
    body, bconsts, nc, ncar = _scan_parts(eqn)
    length = int(eqn.params["length"])
    consts, init, xs = ins[:nc], ins[nc:nc + ncar], ins[nc + ncar:]
    if any(isinstance(a, Absent) for a in init):
      raise QuantizationError("a quantized weight without its float copy is a scan's carry")
    absent = [isinstance(a, Absent) for a in xs]
    start, end = (counter[0], scans[0]), {}

    def step(carry, t):
      # (lax.scan may trace the body twice: every trace numbers the sites the same way)
      counter[0], scans[0] = start
      iters[sid] = t[0]
      aux.append({})
      it = iter(t[1])
      body_xs = [Absent(jax.ShapeDtypeStruct(a.aval.shape[1:], a.aval.dtype)) if ab else next(it)
                 for a, ab in zip(xs, absent)]
      outs = _interpret(body, list(bconsts), list(consts) + list(carry) + body_xs, bind, lambda c: c, scan)
      if any(isinstance(o, Absent) for o in outs[:ncar]):
        raise QuantizationError("a quantized weight without its float copy is a scan's carry")
      # An absent weight passed through (nnx returns its module state) stays absent, stacked.
      end["ys"] = [o.aval if isinstance(o, Absent) else None for o in outs[ncar:]]
      end["at"] = counter[0], scans[0]
      del iters[sid]
      return outs[:ncar], ([o for o in outs[ncar:] if not isinstance(o, Absent)], aux.pop())

    carry, (ys, body_aux) = jax.lax.scan(
        step, list(init), (np.arange(length, dtype=np.int32), [a for a, ab in zip(xs, absent) if not ab]),
        length=length, reverse=bool(eqn.params["reverse"]), unroll=eqn.params.get("unroll", 1))
    counter[0], scans[0] = end["at"]
    for idx, a in body_aux.items():
      aux[-1][idx] = a if sites[idx].scan == sid else reduce_aux(sites[idx], a)
    it = iter(ys)
    ys = [next(it) if a is None else Absent(jax.ShapeDtypeStruct((length,) + tuple(a.shape), a.dtype))
          for a in end["ys"]]
    return list(carry) + ys

  outs = _interpret(program.closed.jaxpr, list(program.closed.consts), inputs, bind, lambda c: c, scan)
  return outs, aux[0]


def unflatten_output(program: Program, flat):
  return jax.tree_util.tree_unflatten(program.out_tree, flat)
