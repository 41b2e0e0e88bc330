"""Calibration: run the float model over batches and record, for every weight matmul
(a layer: one weight and every contraction that reads it, see _capture), its
per-input-channel absmax (max over all batches and calls), the tokens seen, a sample of
input rows (for choosing alpha), and the dataflow facts folding needs (_dataflow: which
op produced the layer's input at each call and whether anything else reads that tensor).

Statistics are outputs of the one jitted program per batch shape
(remat and jit inside the model are inlined; a scan over layers returns each layer's
statistics as its stacked outputs), so no tracer leaves a transform.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from actquant_jax import _capture
from actquant_jax._dataflow import FOLDABLE_KINDS, dataflow_facts, fingerprint, kind_offsets, read_elsewhere
from actquant_jax.errors import CalibrationError, QuantizationTypeError, StatsFileError
from actquant_jax.report import stats_summary
from actquant_jax.sharding import to_host


def _is_nnx(model) -> bool:
  return isinstance(model, nnx.Module)


def _call_model(fn, batch):
  """Batches are an array (fn(x)), a tuple/list (fn(*batch)) or a dict (fn(**batch))."""
  if isinstance(batch, dict):
    return fn(**batch)
  if isinstance(batch, (tuple, list)):
    return fn(*batch)
  return fn(batch)


def _model_variables(model, params):
  """What the traced model function takes: linen variables, or the nnx model's state."""
  if _is_nnx(model):
    return nnx.state(model)
  if params is None:
    raise CalibrationError("calibrate: a linen model needs its params (the variables dict from model.init)")
  return params


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerStats:
  """Calibration facts of one layer: one weight and every matmul that reads it (a pytree:
  arrays are leaves, the rest static).

  absmax:   (K,) f32, max |x_j| over every token of every batch and every call; K is
            the contraction size (contracted axes flattened, in the weight's pairing order).
  tokens:   () int, rows of x seen.
  samples:  (S, K) f32, a uniform sample of input rows (S <= num_samples).
  group:    name of the first layer (in call order) reading the same input tensor;
            layers with the same group share one smoothing vector.
  producer: module path of the op that made the input (the first call's), or "" for a
            plain op.
  producer_kind: "layernorm" (h * g + b), "rmsnorm" (h * g), "dense" (a weight matmul,
            + bias) or "op" (anything else) -- from the traced dataflow, whatever the class.
            A norm whose scale is 1 + g (Gemma's) names the param: "rmsnorm(1+scale)"
            (see kind_offsets).
  exclusive: True when, at every call, the input tensor is read by layers of `group`
            only (no residual add, no other op, not a model output) -- needed to fold.
  param:    the weight's param path; contract / out: its contracted and output axes.
  producers: every call's producer module path (a shared layer has several).
  fold_params: the producer's param names that absorb 1/s (("scale", "bias"), ...).
  fingerprint: digest of the traced model structure (shapes + dataflow), the same for
            every layer of one calibration; quantize_params checks it.
  keep_float: the weight is also read by ops other than its matmuls (a tied embedding's
            lookup): the float weight is kept beside the quantized one.
  reason:   non-empty for a weight matmul that stays float (its layout is not supported
            yet); such entries have empty arrays.
  layers:   0, or L for a weight stacked over L layers that a scan slices (nn.scan,
            nnx.scan, lax.scan over stacked params): absmax is then (L, K) and samples
            (L, S, K), one statistic per layer; tokens counts one layer's rows.
  """

  absmax: jax.Array
  tokens: jax.Array
  samples: jax.Array
  group: str = dataclasses.field(default="", metadata=dict(static=True))
  producer: str = dataclasses.field(default="", metadata=dict(static=True))
  producer_kind: str = dataclasses.field(default="op", metadata=dict(static=True))
  exclusive: bool = dataclasses.field(default=False, metadata=dict(static=True))
  param: str = dataclasses.field(default="", metadata=dict(static=True))
  contract: tuple = dataclasses.field(default=(0,), metadata=dict(static=True))
  out: tuple = dataclasses.field(default=(1,), metadata=dict(static=True))
  producers: tuple = dataclasses.field(default=(), metadata=dict(static=True))
  fold_params: tuple = dataclasses.field(default=(), metadata=dict(static=True))
  fingerprint: str = dataclasses.field(default="", metadata=dict(static=True))
  keep_float: bool = dataclasses.field(default=False, metadata=dict(static=True))
  reason: str = dataclasses.field(default="", metadata=dict(static=True))
  layers: int = dataclasses.field(default=0, metadata=dict(static=True))

  @property
  def foldable(self) -> bool:
    return self.exclusive and kind_offsets(self.producer_kind)[0] in FOLDABLE_KINDS


Stats = dict  # {layer name: LayerStats}
_FACT_FIELDS = ("group", "producer", "producer_kind", "exclusive", "param", "contract", "out", "producers",
                "fold_params", "fingerprint", "keep_float", "reason", "layers")


def facts_of(s: LayerStats) -> dict:
  return {f: getattr(s, f) for f in _FACT_FIELDS}


# ---------------------------------------------------------------- tracing the model

def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic)) or hasattr(x, "aval")


def model_program(model, variables, forward, batch) -> tuple[_capture.Program, list]:
  """The model's forward on `batch`, traced: (program, its flat inputs)."""
  if _is_nnx(model):
    graphdef = nnx.graphdef(model)
    paths = _capture.nnx_param_paths(variables)

    def fn(state, b):
      m = nnx.merge(graphdef, state)
      return _call_model(m, b) if forward is None else forward(m, b)
  else:
    paths = _capture.linen_param_paths(variables)

    def fn(v, b):
      if forward is None:
        return _call_model(lambda *a, **k: model.apply(v, *a, **k), b)
      return forward(v, b)
  program = _capture.trace(fn, variables, paths, batch)
  return program, _capture.program_inputs(variables, (batch,))


def describe_sites(graph: _capture.Graph) -> str:
  if not graph.sites and not graph.seen_inside:
    return "no matmul with a parameter operand at all"
  parts = [f"{s.param} ({s.reason or 'ok'})" for s in graph.sites.values()]
  parts += [f"{p} (inside {prim})" for p, prim in graph.seen_inside.items()]
  return "; ".join(parts)


# ---------------------------------------------------------------- statistics

def _batch_stats_fn(program: _capture.Program, graph: _capture.Graph, num_samples: int):
  sites = {i: s for i, s in graph.sites.items() if s.reason is None}

  def thin(samples):
    """At most num_samples rows (axis -2), evenly spaced."""
    rows = samples.shape[-2]
    idx = np.linspace(0, rows - 1, min(rows, num_samples)).round().astype(np.int32)
    return samples if len(idx) == rows else jnp.take(samples, idx, axis=-2)

  def on_contraction(site, x, w, run, layer):
    k = math.prod(x.shape[a] for a in site.x_contract)
    rest = [a for a in range(x.ndim) if a not in site.x_contract]
    x2 = jnp.transpose(x, rest + list(site.x_contract)).reshape(-1, k).astype(jnp.float32)
    finite = jnp.isfinite(x2)
    absmax = jnp.max(jnp.where(finite, jnp.abs(x2), 0.0), axis=0, initial=0.0)
    entry = dict(absmax=absmax, nonfinite=jnp.sum(~finite), tokens=jnp.int32(x2.shape[0]), samples=thin(x2))
    return (run(x, w) if not site.weight_lhs else run(w, x)), entry

  def merge_iterations(site, e):
    """The calls of one weight inside a scan that does not slice it (a loop-invariant
    weight: one statistic over its L calls)."""
    return dict(absmax=jnp.max(e["absmax"], axis=0), nonfinite=jnp.sum(e["nonfinite"], axis=0),
                tokens=jnp.sum(e["tokens"], axis=0),
                samples=thin(jnp.moveaxis(e["samples"], 0, -3).reshape(*e["samples"].shape[1:-2], -1,
                                                                        e["samples"].shape[-1])))

  def stats(inputs):
    _, per_site = _capture.evaluate(program, inputs, on_contraction, sites, reduce_aux=merge_iterations)
    out: dict[str, dict] = {}
    for i, entry in sorted(per_site.items()):
      layer = sites[i].layer
      if layer in out:  # a layer called more than once per forward
        prev = out[layer]
        entry = dict(absmax=jnp.maximum(prev["absmax"], entry["absmax"]),
                     nonfinite=prev["nonfinite"] + entry["nonfinite"], tokens=prev["tokens"] + entry["tokens"],
                     samples=jnp.concatenate([prev["samples"], entry["samples"]], axis=-2))
      out[layer] = entry
    return out

  order = []
  for i, s in sorted(sites.items()):
    if s.layer not in order:
      order.append(s.layer)
  return jax.jit(stats), order


def _merge_samples(a, ta, b, tb, cap, rng):
  """Keep `cap` rows (axis -2: a layer stack's samples are (L, S, K), the same rows of
  every layer kept) of a (standing for ta tokens) and b (tb tokens) in proportion."""
  rows = lambda x: x.shape[-2]
  pick = lambda x, n: np.take(x, np.sort(rng.choice(rows(x), n, replace=False)), axis=-2)
  if a is None:
    return b if rows(b) <= cap else pick(b, cap)
  n_a = min(rows(a), int(round(cap * ta / max(ta + tb, 1))))
  n_b = min(rows(b), cap - n_a)
  n_a = min(rows(a), cap - n_b)
  return np.concatenate([pick(a, n_a), pick(b, n_b)], axis=-2)


def calibrate(model, params, batches: Iterable, *, forward: Callable | None = None,
              num_samples: int = 512, progress: bool | None = None, seed: int = 0) -> Stats:
  """Run the float model over `batches` and return {layer name: LayerStats} for every
  weight matmul (see _capture: any contraction of an activation with a parameter).

  model: a linen Module (params: its variables from init) or an nnx Module (params
  ignored, pass None). batches: an iterable of arrays, tuples or dicts of arrays (called
  as model(x), model(*b), model(**b)); forward(variables, batch) (linen) or
  forward(module, batch) (nnx) overrides how a batch is fed. Each batch runs jitted;
  batches of one shape compile once. jit and remat (nn.remat, nnx.remat,
  jax.checkpoint) inside the model are fine. A scan over stacked layer params (nn.scan,
  nnx.scan, lax.scan with the params as scanned operands) gives per-layer statistics
  (LayerStats.layers = L); a weight the scan closes over gets one statistic over its
  calls. progress: print a line per batch to stderr (default: when there are more than
  4 batches); unless progress=False, a last line sums up what was captured (stats_summary:
  how many weight matmuls, how many can be quantized, which stay float and why).

  Raises ValueError on an empty iterable, a batch with 0 rows, NaN/Inf in any layer
  input (naming the layer and batch), weights contracted inside a while loop or cond
  (not supported), and a model with no weight matmul (listing what it saw).
  """
  variables = _model_variables(model, params)
  try:
    total = len(batches)  # type: ignore[arg-type]
  except TypeError:
    total = None
  show = progress if progress is not None else (total is None or total > 4)
  rng = np.random.default_rng(seed)
  acc: dict[str, dict] = {}
  compiled: dict = {}  # batch shapes -> (program, graph, stats fn, call order)
  facts, fp = None, None
  t0 = time.perf_counter()
  n = 0
  for n, batch in enumerate(batches, start=1):
    _check_batch(batch, n)
    key = jax.tree_util.tree_structure(batch), tuple(
        (np.shape(x), str(np.asarray(x).dtype) if not hasattr(x, "dtype") else str(x.dtype))
        for x in jax.tree_util.tree_leaves(batch))
    if key not in compiled:
      program, _ = model_program(model, variables, forward, batch)
      graph = _capture.analyze(program)
      if graph.seen_inside:
        prim = next(iter(graph.seen_inside.values()))
        raise CalibrationError(f"calibrate: params {', '.join(sorted(graph.seen_inside))} are contracted inside a "
                               f"`{prim}` (a while loop / fori_loop with a traced trip count, a cond or switch): "
                               "not supported. Write the loop over layers as a scan (nn.scan, nnx.scan, "
                               "jax.lax.scan over the stacked params) or unroll it (a Python loop over modules)")
      if not any(s.reason is None for s in graph.sites.values()):
        raise CalibrationError("calibrate: the model has no weight matmul to quantize (no Dense or other contraction "
                         f"of an activation with a parameter). Saw: {describe_sites(graph)}")
      if facts is None:
        facts = dataflow_facts(graph)
        fp = fingerprint(graph, facts)
      compiled[key] = (program, graph) + _batch_stats_fn(program, graph, num_samples)
    program, graph, stats_fn, call_order = compiled[key]
    inputs = _capture.program_inputs(variables, (batch,))
    out = to_host(stats_fn(inputs))  # (on every process of a jax.distributed run)
    for path in call_order:  # in call order, so a NaN is reported where it first appears
      e = out[path]
      bad = np.asarray(e["nonfinite"])
      if bad.any():
        where = f"{path}[{int(np.flatnonzero(bad)[0])}] (of a layer stack)" if bad.ndim else path
        raise CalibrationError(f"calibrate: layer {where}: input has {int(bad.sum())} NaN/Inf values "
                         f"in batch {n}")
      a = acc.get(path)
      samples = np.asarray(e["samples"], np.float32)
      t_new = int(np.asarray(e["tokens"]).reshape(-1)[0])  # (a stacked layer: every layer sees as many)
      if a is None:
        acc[path] = dict(absmax=np.asarray(e["absmax"]), tokens=t_new,
                         samples=_merge_samples(None, 0, samples, t_new, num_samples, rng))
      else:
        a["samples"] = _merge_samples(a["samples"], a["tokens"], samples, t_new, num_samples, rng)
        a["absmax"] = np.maximum(a["absmax"], np.asarray(e["absmax"]))
        a["tokens"] += t_new
    if show:
      of = f"/{total}" if total else ""
      print(f"calibrate: batch {n}{of}, {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
  if n == 0:
    raise CalibrationError("calibrate: got no batches (empty iterable)")
  first_graph = next(iter(compiled.values()))[1]
  site_of = {}
  for s in first_graph.sites.values():
    site_of.setdefault(s.layer, s)
  int_t = jnp.int64 if jax.config.jax_enable_x64 else jnp.int32
  out = {}
  for path, s in site_of.items():
    common = dict(param=s.param, contract=s.contract, out=s.out, fingerprint=fp)
    if path in acc:
      a = acc[path]
      out[path] = LayerStats(jnp.asarray(a["absmax"], jnp.float32), jnp.asarray(a["tokens"], int_t),
                             jnp.asarray(a["samples"], jnp.float32), **dataclasses.asdict(facts[path]),
                             keep_float=read_elsewhere(first_graph, s.param), layers=s.stack, **common)
    else:  # seen, but its layout stays float: accounted for, with the reason
      out[path] = LayerStats(jnp.zeros((0,), jnp.float32), jnp.asarray(0, int_t), jnp.zeros((0, 0), jnp.float32),
                             group=path, reason=s.reason or "not supported", layers=s.stack, **common)
  out = dict(sorted(out.items()))
  if progress is not False:
    print(f"calibrate: {stats_summary(out)}", file=sys.stderr, flush=True)
  return out


def _check_batch(batch, n: int) -> None:
  leaves = jax.tree_util.tree_leaves(batch)
  for x in leaves:
    if _is_array(x) and np.ndim(x) >= 1 and np.shape(x)[0] == 0:
      raise CalibrationError(f"calibrate: batch {n} has 0 rows (an input of shape {tuple(np.shape(x))}); "
                       "every calibration batch needs at least one example")


# ---------------------------------------------------------------- merge, save, load

def merge_stats(a: Stats, b: Stats, *, num_samples: int = 512, seed: int = 0) -> Stats:
  """Stats of two calibration runs of the same model, as if over all their batches."""
  if set(a) != set(b):
    raise CalibrationError(f"merge_stats: different layers: only in first {sorted(set(a) - set(b))}, "
                     f"only in second {sorted(set(b) - set(a))}")
  rng = np.random.default_rng(seed)
  out = {}
  for path in a:
    x, y = a[path], b[path]
    if facts_of(x) != facts_of(y):
      raise CalibrationError(f"merge_stats: layer {path}: dataflow facts differ (different models?)")
    if x.absmax.shape != y.absmax.shape:
      raise CalibrationError(f"merge_stats: layer {path}: absmax shapes differ {x.absmax.shape} vs {y.absmax.shape}")
    samples = _merge_samples(np.asarray(x.samples), int(x.tokens), np.asarray(y.samples), int(y.tokens),
                             num_samples, rng)
    out[path] = dataclasses.replace(x, absmax=jnp.maximum(x.absmax, y.absmax), tokens=x.tokens + y.tokens,
                                    samples=jnp.asarray(samples))
  return out


def _stats_file(file):
  """np.savez appends ".npz" to a name without it; load the same name back."""
  if isinstance(file, (str, os.PathLike)):
    f = os.fspath(file)
    if not f.endswith(".npz") and not os.path.exists(f) and os.path.exists(f + ".npz"):
      return f + ".npz"
    return f
  return file


def save_stats(stats: Stats, file) -> None:
  """Save to a .npz file (arrays) with the dataflow facts as JSON inside. A name without
  ".npz" gets it (numpy's rule); load_stats takes either name."""
  arrays, meta = {}, {}
  for i, (path, s) in enumerate(stats.items()):
    arrays[f"{i}_absmax"], arrays[f"{i}_tokens"], arrays[f"{i}_samples"] = (
        np.asarray(s.absmax), np.asarray(s.tokens), np.asarray(s.samples))
    meta[path] = dict(index=i, **facts_of(s))
  np.savez(file, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)


def load_stats(file) -> Stats:
  """Read a save_stats file. Raises StatsFileError (a ValueError) on anything else."""
  file = _stats_file(file)
  try:
    with np.load(file, allow_pickle=False) as z:
      if not hasattr(z, "files") or "__meta__" not in z.files:
        raise StatsFileError(f"load_stats: {file} is not a calibration stats file (no metadata)")
      meta = json.loads(bytes(z["__meta__"]).decode())
      out = {}
      for path, m in meta.items():
        i = m.pop("index")
        for f in ("contract", "out", "producers", "fold_params"):
          if f in m:
            m[f] = tuple(m[f])
        out[path] = LayerStats(jnp.asarray(z[f"{i}_absmax"]), jnp.asarray(z[f"{i}_tokens"]),
                               jnp.asarray(z[f"{i}_samples"]), **m)
  except StatsFileError:
    raise
  except FileNotFoundError:
    raise
  except Exception as e:  # zip, JSON, key and type errors of a damaged file
    raise StatsFileError(f"load_stats: {file} is not a readable calibration stats file "
                         f"({type(e).__name__}: {e}); save it again with aq.save_stats") from e
  check_stats(out, "load_stats")
  return out


def check_stats(stats: Stats, where: str = "stats") -> None:
  for path, s in stats.items():
    if not isinstance(s, LayerStats):
      raise QuantizationTypeError(f"{where}: layer {path}: expected LayerStats, got {type(s).__name__}")
    if s.reason:
      continue
    a = np.asarray(s.absmax)
    if not np.all(np.isfinite(a)):
      raise CalibrationError(f"{where}: layer {path}: absmax contains NaN/Inf")
    if s.layers:
      if math.prod(a.shape) == 0 or a.shape[:1] != (s.layers,) or a.ndim != 2:
        raise CalibrationError(f"{where}: layer {path}: absmax of a stack of {s.layers} layers must be a non-empty "
                               f"({s.layers}, K) array, got {a.shape}")
    elif math.prod(a.shape) == 0 or a.ndim != 1:
      raise CalibrationError(f"{where}: layer {path}: absmax must be a non-empty (K,) vector, got {a.shape}")
