"""Dataflow analysis of a traced model (_capture's Graph): what decides whether a
layer's 1/s can be folded into the op that produced its input.

Read from the traced program, not from names or classes: a producer is foldable when its
output is `h * g (+ b)` or `h * (1 + g) (+ b)` (Gemma's norms) for parameter vectors g, b
along the channel axis (any norm, whatever library wrote it, dtype casts around the
product allowed) or a weight matmul (+ bias), its params serve nothing else, and at every
call the input tensor is read by the layers of one group only (exclusivity). Calibration
records these facts; quantized_apply checks them again on the model it runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

from actquant_jax import _capture

# Producer kinds 1/s can fold into (kind_offsets' base kind).
FOLDABLE_KINDS = ("layernorm", "rmsnorm", "dense")


@dataclasses.dataclass(frozen=True)
class DataflowFacts:
  """One layer's dataflow facts (see LayerStats for the fields)."""

  group: str
  producer: str
  producer_kind: str
  exclusive: bool
  producers: tuple = ()
  fold_params: tuple = ()


# Ops between a param vector and the mul/add of a norm that keep it one vector along the
# channel (last) axis.
_BROADCAST = ("reshape", "broadcast_in_dim", "convert_element_type", "expand_dims", "squeeze")


def _param_vector(node, k: int):
  """(g, c) if `node` is a (K,) param vector g, or c + g with c = 1 (Gemma's `1 + scale`,
  `scale + 1`), broadcast along the last axis through reshapes, broadcasts and dtype casts
  (before or after the add), else None. c is 0.0 or 1.0."""
  offset = 0.0
  while node.param is None:
    if not node.inputs or len(node.readers) > 1 or not node.shape or node.shape[-1] != k:
      return None
    if node.prim == "add" and len(node.inputs) == 2 and offset == 0.0:  # elementwise: any leading shape
      one = [i for i, a in enumerate(node.inputs) if _capture.constant_value(a) == 1.0]
      if not one:
        return None
      offset, node = 1.0, node.inputs[1 - one[0]]
      continue
    if node.prim not in _BROADCAST:
      return None
    if node.prim == "broadcast_in_dim":
      if tuple(node.params["broadcast_dimensions"])[-1:] != (len(node.shape) - 1,):
        return None
    elif node.prim != "convert_element_type" and math.prod(node.shape[:-1]) != 1:
      return None
    node = node.inputs[0]
  if node.shape != (k,):
    return None
  return node, offset


def _norm_scale(node, k: int, top: bool = False):
  """(g, c) if node = (... * (c + g)) through a chain of single-reader muls (c: see
  _param_vector), else None."""
  if node.prim != "mul" or (len(node.readers) > 1 and not top) or len(node.inputs) != 2:
    return None
  for a in node.inputs:
    g = _param_vector(a, k)
    if g is not None:
      return g
  for a in node.inputs:
    g = _norm_scale(a, k)
    if g is not None:
      return g
  return None


def producer_kind(base: str, offsets: dict) -> str:
  """The kind of a norm producer as the dataflow found it: "rmsnorm" (h * g),
  "layernorm" (h * g + b), or with the scale taken as 1 + g (Gemma's norms) the param in
  the name: "rmsnorm(1+scale)". kind_offsets reads it back."""
  return base + "".join(f"(1+{name})" for name, c in offsets.items() if c)


def kind_offsets(kind: str) -> tuple[str, dict]:
  """(base kind, {param name: c}) of a producer kind: "rmsnorm(1+scale)" ->
  ("rmsnorm", {"scale": 1.0}) -- the producer multiplies by c + param -- and "layernorm"
  -> ("layernorm", {})."""
  base, sep, rest = kind.partition("(1+")
  if not sep or not rest.endswith(")"):
    return kind, {}
  return base, {name: 1.0 for name in rest[:-1].split(")(1+")}


def _uncast(node):
  """node seen through dtype casts whose inputs nothing else reads (Gemma computes its norm
  in f32 and casts the product back: the cast's input is then the norm's output)."""
  while node.prim == "convert_element_type" and node.inputs and len(node.inputs[0].readers) == 1:
    node = node.inputs[0]
  return node


def _producer(x, graph, k: int):
  """(module path, kind, param names that absorb 1/s, param nodes) of what made x."""
  node, bias = _uncast(x), None
  if node.prim == "add" and len(node.inputs) == 2:
    for a, b in (node.inputs, node.inputs[::-1]):
      pb = _param_vector(b, k)
      if pb is not None and pb[1] == 0.0:
        node, bias = a, pb[0]
        break
    if bias is not None and len(node.readers) == 1:
      node = _uncast(node)
  name = lambda n: n.param.rpartition("/")[2]
  module = lambda n: n.param.rpartition("/")[0]
  if node.site is not None:  # a weight matmul (+ bias): fold into its output columns
    site = graph.sites[node.site]
    # (the weight on the left: its output columns are not the output's last axis)
    if (site.reason is None and len(site.param_shape) == 2 and site.contract == (0,) and site.out == (1,)
        and not site.weight_lhs and (bias is None or len(node.readers) == 1)):
      w = _capture.weight_source(node.inputs[0 if site.weight_lhs else 1])[0]
      if bias is None or module(bias) == module(w):
        return module(w), "dense", (name(w),) + (() if bias is None else (name(bias),)), [w] + ([bias] if bias else [])
    return "", "op", (), []
  found = _norm_scale(node, k, top=node is x) if (bias is None or len(node.readers) == 1) else None
  if found is not None and (bias is None or module(bias) == module(found[0])):
    g, c = found
    kind = producer_kind("rmsnorm" if bias is None else "layernorm", {name(g): c})
    return module(g), kind, (name(g),) + (() if bias is None else (name(bias),)), [g] + ([bias] if bias else [])
  return "", "op", (), []


def dataflow_facts(graph: _capture.Graph) -> dict[str, DataflowFacts]:
  """Per layer: its group, the producers of its inputs and whether folding is exact."""
  sites = {i: s for i, s in sorted(graph.sites.items()) if s.reason is None}
  outputs = set(map(id, graph.outputs))
  order = {}
  for s in sites.values():
    order.setdefault(s.layer, len(order))
  parent = {layer: layer for layer in order}

  def find(a):
    while parent[a] != a:
      a = parent[a]
    return a
  per_call = {}
  for i, s in sites.items():
    x = graph.x_node[i]
    readers = [r for r in x.readers]
    reader_sites = [sites[r.site] if (r is not None and r.site in sites
                                      and graph.x_node[r.site] is x) else None for r in readers]
    reader_layers = [None if r is None else r.layer for r in reader_sites]
    # One smoothing per group: the layers of one scan's layer stack (per layer), or plain
    # weights; readers of both kinds cannot share one, so the producer cannot fold.
    mixed = any(r is not None and (r.scan, r.stack) != (s.scan, s.stack) for r in reader_sites)
    for other in reader_sites:
      if other is not None and (other.scan, other.stack) == (s.scan, s.stack):
        a, b = find(s.layer), find(other.layer)
        if a != b:
          parent[max(a, b, key=order.get)] = min(a, b, key=order.get)
    exclusive = id(x) not in outputs and all(r is not None for r in reader_layers) and not mixed
    k = math.prod(x.shape[a] for a in s.x_contract)
    folds_last_axis = s.x_contract == (len(x.shape) - 1,)
    prod, kind, names, pnodes = _producer(x, graph, k) if folds_last_axis else ("", "op", (), [])
    # The producer's params may serve nothing else (a norm called twice cannot fold); a
    # layer stack's per-layer 1/s folds only into params stacked by the same scan.
    if any(len(_capture.param_readers(graph, n.param)) > 1 for n in pnodes):
      exclusive = False
    if s.stack and any(n.scan != s.scan for n in pnodes):
      exclusive = False
    per_call.setdefault(s.layer, []).append((prod, kind, names, exclusive))
  facts = {}
  for layer, calls in per_call.items():
    prods = tuple(c[0] for c in calls)
    kinds, names = {c[1] for c in calls}, {c[2] for c in calls}
    same = len(kinds) == 1 and len(names) == 1
    exclusive = same and all(c[3] for c in calls) and len(set(prods)) == len(prods)
    facts[layer] = DataflowFacts(find(layer), prods[0], calls[0][1] if same else "op", exclusive, prods,
                                 calls[0][2] if same else ())
  return facts


def layer_dataflow(facts: DataflowFacts, contract, out) -> str:
  """Digest of where one layer's input comes from (its producers at every call) and its
  contraction: what its calibrated scales and smoothing were chosen for. (Whether other
  ops also read the input matters only to a fold, checked on its own: a method that
  returns intermediates changes it legitimately.)"""
  key = (tuple(facts.producers), facts.producer_kind, tuple(contract), tuple(out))
  return hashlib.sha256(repr(key).encode()).hexdigest()[:12]


def fingerprint(graph: _capture.Graph, facts: dict) -> str:
  """Digest of the model structure: every weight matmul's weight, shape and layout, and
  the dataflow facts folding relies on."""
  h = hashlib.sha256()
  for i, s in sorted(graph.sites.items()):
    f = facts.get(s.layer)
    key = (s.param, s.param_shape, s.contract, s.out, s.reason, None if f is None else dataclasses.astuple(f))
    h.update(repr(key + ((s.stack,) if s.stack else ())).encode())
  return h.hexdigest()[:16]


def read_elsewhere(graph: _capture.Graph, param: str) -> bool:
  """True when the weight feeds anything but weight matmuls (through layout ops)."""
  todo = _capture.param_readers(graph, param)
  while todo:
    r = todo.pop()
    if r is None:
      return True
    if r.site is not None:
      continue
    if r.prim in _capture.LAYOUT_PRIMITIVES:
      todo += r.readers
      continue
    return True
  return False
