"""Calibration: run the float model over batches and record, for every Dense layer, its
per-input-channel absmax (max over all batches), the tokens seen, a sample of input rows
(for choosing alpha), and the dataflow facts folding needs: which op produced the layer's
input and whether anything else reads that tensor.

The dataflow comes from the traced jaxpr, not from names: LayerNorm / RMSNorm / Dense
output and every Dense input passes through a named identity `jit` (a tag), so in the
jaxpr the producer of a Dense input is either such a tag or a plain op (gelu, a residual
add, ...), and the consumers of that tensor
are exactly the equations that read its variable.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from typing import Any, Callable, Iterable

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from actquant_jax import _hooks

FOLDABLE_KINDS = ("layernorm", "rmsnorm", "dense")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerStats:
  """Calibration facts of one Dense layer (a pytree: arrays are leaves, the rest static).

  absmax:   (K,) f32, max |x_j| over every token of every batch.
  tokens:   () int64, tokens (rows of x) seen.
  samples:  (S, K) f32, a uniform sample of input rows (S <= num_samples).
  group:    path of the first Dense reading the same input tensor; layers with the same
            group share one smoothing vector.
  producer: module path of the op that made the input, or "" for a plain op.
  producer_kind: "layernorm", "rmsnorm", "dense" or "op" (anything else).
  exclusive: True when the input tensor is read by Dense layers of `group` only (no
            residual add, no other op, not a model output) -- the condition for folding.
  """

  absmax: jax.Array
  tokens: jax.Array
  samples: jax.Array
  group: str = dataclasses.field(default="", metadata=dict(static=True))
  producer: str = dataclasses.field(default="", metadata=dict(static=True))
  producer_kind: str = dataclasses.field(default="op", metadata=dict(static=True))
  exclusive: bool = dataclasses.field(default=False, metadata=dict(static=True))

  @property
  def foldable(self) -> bool:
    return self.exclusive and self.producer_kind in FOLDABLE_KINDS


Stats = dict  # {module path: LayerStats}


# ---------------------------------------------------------------- dataflow

@dataclasses.dataclass(frozen=True)
class DataflowFacts:
  group: str
  producer: str
  producer_kind: str
  exclusive: bool


def _tag(x, name: str):
  def ident(v):
    return v
  ident.__name__ = name
  return jax.jit(ident)(x)


def trace_dataflow(run: Callable, variables, batch) -> dict[str, DataflowFacts]:
  """Trace run(variables, batch) once and read each Dense input's producer and consumers
  from the jaxpr."""
  calls: list[tuple[str, str]] = []  # index -> (path, kind)
  dense_inputs: dict[str, list[str]] = {}  # dense path -> tag names of its inputs

  def on_dense(path, module, x, call):
    name = f"aq_in_{len(calls)}"
    calls.append((path, "dense-input"))
    dense_inputs.setdefault(path, []).append(name)
    return call(_tag(x, name))

  def on_output(path, kind, out):
    # Only the ops folding understands are tagged; a container module's output is left
    # alone so the op inside that made it (a LayerNorm, an add) stays visible.
    if kind not in FOLDABLE_KINDS or not isinstance(out, jax.Array):
      return out
    name = f"aq_out_{len(calls)}"
    calls.append((path, kind))
    return _tag(out, name)

  hooked = _hooks.hooked_forward(*run, _hooks.Hooks(on_dense, on_output))
  jaxpr = jax.make_jaxpr(hooked)(variables, batch).jaxpr

  producer_of: dict[Any, Any] = {}
  consumers: dict[Any, list] = {}
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      producer_of[v] = eqn
    for v in eqn.invars:
      if not isinstance(v, jax.extend.core.Literal):
        consumers.setdefault(v, []).append(eqn)
  outvars = {v for v in jaxpr.outvars if not isinstance(v, jax.extend.core.Literal)}
  tag_eqn = {eqn.params.get("name"): eqn for eqn in jaxpr.eqns if eqn.primitive.name in ("jit", "pjit")}
  kind_of = {f"aq_out_{i}": (path, kind) for i, (path, kind) in enumerate(calls) if kind != "dense-input"}
  dense_of_tag = {t: p for p, ts in dense_inputs.items() for t in ts}

  facts: dict[str, DataflowFacts] = {}
  for path, tags in dense_inputs.items():
    per_call = []
    for t in tags:
      eqn = tag_eqn.get(t)
      if eqn is None:  # inside a nested jaxpr (scan, remat, ...): no facts, never folded
        per_call.append(None)
        continue
      v = eqn.invars[0]
      prod = producer_of.get(v)
      pname = prod.params.get("name") if prod is not None and prod.primitive.name in ("jit", "pjit") else None
      ppath, pkind = kind_of.get(pname, ("", "op"))
      readers = consumers.get(v, [])
      reader_dense = [dense_of_tag.get(r.params.get("name")) if r.primitive.name in ("jit", "pjit") else None
                      for r in readers]
      exclusive = v not in outvars and all(d is not None for d in reader_dense)
      group = min((d for d in reader_dense if d is not None), key=lambda d: _first_call(calls, d))
      per_call.append(DataflowFacts(group, ppath, pkind, exclusive))
    first = per_call[0]
    if first is None or any(f != first for f in per_call):
      # Called from several places with different inputs (or untraceable): no shared
      # smoothing, no folding.
      facts[path] = DataflowFacts(path, "", "op", False)
    else:
      facts[path] = first
  # A producer module called more than once cannot be folded (its params serve every call).
  call_count: dict[str, int] = {}
  for p, k in calls:
    if k != "dense-input":
      call_count[p] = call_count.get(p, 0) + 1
  for path, f in facts.items():
    if f.producer and call_count.get(f.producer, 0) > 1:
      facts[path] = dataclasses.replace(f, exclusive=False)
  return facts


def _first_call(calls, path):
  return next(i for i, (p, k) in enumerate(calls) if p == path and k == "dense-input")


# ---------------------------------------------------------------- statistics

def _batch_stats_fn(run, num_samples: int):
  collected_paths: list[str] = []

  def stats(variables, batch):
    out: dict[str, dict] = {}

    def on_dense(path, module, x, call):
      x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
      finite = jnp.isfinite(x2)
      absmax = jnp.max(jnp.where(finite, jnp.abs(x2), 0.0), axis=0)
      rows = x2.shape[0]
      idx = np.linspace(0, rows - 1, min(rows, num_samples)).round().astype(np.int32)
      entry = dict(absmax=absmax, nonfinite=jnp.sum(~finite), tokens=jnp.int32(rows), samples=x2[idx])
      if path in out:  # a layer called more than once per forward
        prev = out[path]
        entry = dict(absmax=jnp.maximum(prev["absmax"], absmax), nonfinite=prev["nonfinite"] + entry["nonfinite"],
                     tokens=prev["tokens"] + rows, samples=jnp.concatenate([prev["samples"], entry["samples"]]))
      out[path] = entry
      return call(x)

    _hooks.hooked_forward(*run, _hooks.Hooks(on_dense=on_dense))(variables, batch)
    collected_paths[:] = list(out)  # call order (the jitted dict comes back key-sorted)
    return out

  return jax.jit(stats), collected_paths


def _merge_samples(a, ta, b, tb, cap, rng):
  """Keep `cap` rows of a (standing for ta tokens) and b (tb tokens) in proportion."""
  if a is None:
    return b if len(b) <= cap else b[np.sort(rng.choice(len(b), cap, replace=False))]
  n_a = min(len(a), int(round(cap * ta / max(ta + tb, 1))))
  n_b = min(len(b), cap - n_a)
  n_a = min(len(a), cap - n_b)
  pick = lambda x, n: x[np.sort(rng.choice(len(x), n, replace=False))]
  return np.concatenate([pick(a, n_a), pick(b, n_b)])


def calibrate(model, params, batches: Iterable, *, forward: Callable | None = None,
              num_samples: int = 512, progress: bool | None = None, seed: int = 0) -> Stats:
  """Run the float model over `batches` and return {Dense module path: LayerStats}.

  model: a linen Module (params: its variables from init) or an nnx Module (params
  ignored, pass None). batches: an iterable of arrays, tuples or dicts of arrays (called
  as model(x), model(*b), model(**b)); forward(variables, batch) (linen) or
  forward(module, batch) (nnx) overrides how a batch is fed. Each batch runs jitted;
  batches of one shape compile once. progress: print a line per batch to stderr (default:
  when there are more than 4 batches).

  Raises ValueError on an empty iterable, NaN/Inf in any Dense input (naming the layer
  and batch), and a model with no Dense layer.
  """
  run = (model, forward)
  variables = _hooks.model_variables(model, params)
  try:
    total = len(batches)  # type: ignore[arg-type]
  except TypeError:
    total = None
  show = progress if progress is not None else (total is None or total > 4)
  rng = np.random.default_rng(seed)
  stats_fn, call_order = _batch_stats_fn(run, num_samples)
  acc: dict[str, dict] = {}
  facts = None
  t0 = time.perf_counter()
  n = 0
  for n, batch in enumerate(batches, start=1):
    if facts is None:
      facts = trace_dataflow(run, variables, batch)
      if not facts:
        raise ValueError("calibrate: the model called no Dense (nn.Dense / nnx.Linear) layer")
    out = jax.device_get(stats_fn(variables, batch))
    for path in call_order:  # in call order, so a NaN is reported where it first appears
      e = out[path]
      if int(e["nonfinite"]):
        raise ValueError(f"calibrate: layer {path}: input has {int(e['nonfinite'])} NaN/Inf values "
                         f"in batch {n}")
      a = acc.get(path)
      samples = np.asarray(e["samples"], np.float32)
      t_new = int(e["tokens"])
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
    raise ValueError("calibrate: got no batches (empty iterable)")
  return {
      path: LayerStats(jnp.asarray(a["absmax"], jnp.float32), jnp.asarray(a["tokens"], jnp.int64)
                       if jax.config.jax_enable_x64 else jnp.asarray(a["tokens"], jnp.int32),
                       jnp.asarray(a["samples"], jnp.float32), **dataclasses.asdict(facts[path]))
      for path, a in sorted(acc.items())}


# ---------------------------------------------------------------- merge, save, load

def merge_stats(a: Stats, b: Stats, *, num_samples: int = 512, seed: int = 0) -> Stats:
  """Stats of two calibration runs of the same model, as if over all their batches."""
  if set(a) != set(b):
    raise ValueError(f"merge_stats: different layers: only in first {sorted(set(a) - set(b))}, "
                     f"only in second {sorted(set(b) - set(a))}")
  rng = np.random.default_rng(seed)
  out = {}
  for path in a:
    x, y = a[path], b[path]
    if (x.group, x.producer, x.producer_kind, x.exclusive) != (y.group, y.producer, y.producer_kind, y.exclusive):
      raise ValueError(f"merge_stats: layer {path}: dataflow facts differ (different models?)")
    if x.absmax.shape != y.absmax.shape:
      raise ValueError(f"merge_stats: layer {path}: absmax shapes differ {x.absmax.shape} vs {y.absmax.shape}")
    samples = _merge_samples(np.asarray(x.samples), int(x.tokens), np.asarray(y.samples), int(y.tokens),
                             num_samples, rng)
    out[path] = dataclasses.replace(x, absmax=jnp.maximum(x.absmax, y.absmax), tokens=x.tokens + y.tokens,
                                    samples=jnp.asarray(samples))
  return out


def save_stats(stats: Stats, file) -> None:
  """Save to a .npz file (arrays) with the dataflow facts as JSON inside."""
  arrays, meta = {}, {}
  for i, (path, s) in enumerate(stats.items()):
    arrays[f"{i}_absmax"], arrays[f"{i}_tokens"], arrays[f"{i}_samples"] = (
        np.asarray(s.absmax), np.asarray(s.tokens), np.asarray(s.samples))
    meta[path] = dict(index=i, group=s.group, producer=s.producer, producer_kind=s.producer_kind,
                      exclusive=s.exclusive)
  np.savez(file, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)


def load_stats(file) -> Stats:
  with np.load(file) as z:
    if "__meta__" not in z:
      raise ValueError(f"load_stats: {file} is not a calibration stats file (no metadata)")
    meta = json.loads(bytes(z["__meta__"]).decode())
    out = {}
    for path, m in meta.items():
      i = m.pop("index")
      out[path] = LayerStats(jnp.asarray(z[f"{i}_absmax"]), jnp.asarray(z[f"{i}_tokens"]),
                             jnp.asarray(z[f"{i}_samples"]), **m)
  return out


def check_stats(stats: Stats, where: str = "stats") -> None:
  for path, s in stats.items():
    if not isinstance(s, LayerStats):
      raise TypeError(f"{where}: layer {path}: expected LayerStats, got {type(s).__name__}")
    a = np.asarray(s.absmax)
    if not np.all(np.isfinite(a)):
      raise ValueError(f"{where}: layer {path}: absmax contains NaN/Inf")
    if math.prod(a.shape) == 0 or a.ndim != 1:
      raise ValueError(f"{where}: layer {path}: absmax must be a non-empty (K,) vector, got {a.shape}")
