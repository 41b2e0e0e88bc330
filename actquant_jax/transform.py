"""quantize_params(params, stats, config): a float param pytree in, a quantized one out.

Same tree structure and paths: each quantized weight leaf (a Dense `kernel`, an Einsum
or raw param, a tied embedding) becomes one QuantizedKernel node (int8/fp8 (N, K) values
with the contraction it serves, per-output-channel scales, the static activation scale or
None, the runtime inverse-smoothing vector or None). A tied embedding keeps no float
copy: its lookup reads the int8 table (a row's values times that row's scale, the head's
per-output-channel scale), so it is not smoothed (the table must hold the weight itself).
Producers that absorbed 1/s (a norm's scale and bias, a Dense's output columns) are
rewritten in place in the copy. Nothing else changes, so sharding rules and checkpoint
tools that key on paths keep working.

A weight stacked over the L layers of a scan (LayerStats.layers = L) becomes one
QuantizedKernel with a leading layer axis on every array (values (L, N, K), scale (L, N),
act_scale (L,), inv_smooth (L, K)): each layer has its own smoothing, scales and static
activation scale; 1/s folds per layer into producers stacked by the same scan. A stack
is planned and quantized layer by layer, each layer's slice read by the same functions as
an unstacked weight (below), so its numbers are exactly the unrolled model's.

Memory and placement: quantize_params holds no float copy of the model. Smoothing is
planned on the host from (K,) vectors (calibration absmax, each weight's row absmax,
reduced on its devices); every weight is then read once by a function jitted per shape
that applies its smoothing and quantizes it where it lives, so the peak is the float
params plus the int8 copy plus one layer's temporaries, and a sharded weight is quantized
shard by shard into a QuantizedKernel sharded the same way (values with the weight's spec
transposed, scales with its output axis's), never gathered to one device or the host.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from actquant_jax import gptq, rotation, smooth
from actquant_jax._capture import layer_name
from actquant_jax._dataflow import DataflowFacts, layer_dataflow
from actquant_jax.calibrate import LayerStats, check_stats
from actquant_jax.config import QuantConfig
from actquant_jax.errors import QuantizationError, QuantizationTypeError
from actquant_jax.quant import QuantizedKernel, check_finite
from actquant_jax.report import LayerReport
from actquant_jax.sharding import kernel_axes, put_like, to_host
from pallas_kernels import reference as numerics


def _split_root(params):
  """linen variables {"params": {...}} or a bare param dict -> (root dict, rebuild)."""
  if isinstance(params, dict) and "params" in params and isinstance(params["params"], dict):
    return params["params"], lambda root: {**params, "params": root}
  if isinstance(params, dict):
    return params, lambda root: root
  raise QuantizationTypeError(f"quantize_params: params must be a dict (linen variables or a param dict), "
                  f"got {type(params).__name__}")


def _key(d: dict, part: str):
  if part in d:
    return part
  if part.isdigit() and int(part) in d:
    return int(part)
  return None


def _get(root: dict, path: str):
  node = root
  for part in path.split("/"):
    k = _key(node, part) if isinstance(node, dict) else None
    if k is None:
      return None
    node = node[k]
  return node


def _set(root: dict, path: str, value) -> dict:
  """A copy of root with the node at path replaced (dicts along the path copied)."""
  parts = path.split("/")
  k = _key(root, parts[0])
  new = dict(root)
  new[k] = value if len(parts) == 1 else _set(root[k], "/".join(parts[1:]), value)
  return new


def dense_kernel_paths(root: dict, prefix: str = "") -> list[str]:
  """Module paths of every dict holding a 2-D float `kernel` (Dense-like)."""
  out = []
  for k, v in root.items():
    p = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, dict):
      out += dense_kernel_paths(v, p)
    elif k == "kernel" and getattr(v, "ndim", 0) == 2:
      out.append(prefix)
  return out


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """What smoothing decided for one quantized layer."""

  settings: Any            # LayerSettings
  alpha: Any               # the alpha used (None: no smoothing)
  alpha_errors: dict | None
  s: np.ndarray | None     # smoothing vector (K,) or None
  folded: bool             # 1/s folded into the producer (else applied at run time)
  x_absmax: np.ndarray     # calibration absmax of the (unsmoothed) input
  stats: LayerStats
  note: str = ""
  rotated: bool = False    # R^T W quantized, x rotated at run time (QuantConfig.rotate)
  act_scale: Any = None    # static: the group's scale (smooth.static_act_scale; (L,) for a stack)
  gptq: bool = False       # weight rounded by GPTQ against stats.samples (else nearest)


def weight_path(layer: str, st: LayerStats) -> str:
  """The param path of a layer's weight (stats from before the capture layer: `kernel`)."""
  return st.param or f"{layer}/kernel"


def _check_inputs(params, stats, config):
  if not isinstance(config, QuantConfig):
    raise QuantizationTypeError(f"quantize_params: config must be a QuantConfig, got {type(config).__name__}")
  if not isinstance(stats, dict) or not stats:
    raise QuantizationError("quantize_params: stats is empty; run aq.calibrate(model, params, batches) first")
  with jax.transfer_guard("allow"):  # the (K,) absmax vectors are checked on the host
    check_stats(stats, "quantize_params")
  fps = {s.fingerprint for s in stats.values()}
  if len(fps) > 1:
    raise QuantizationError("quantize_params: stats mix calibrations of different model structures (their fingerprints "
                     "differ); calibrate the model once and use those stats")
  root, rebuild = _split_root(params)
  weights = {weight_path(p, s) for p, s in stats.items()}
  # Every Dense-like kernel must have stats unless a rule keeps it in float.
  for p in dense_kernel_paths(root):
    kp, p = (f"{p}/kernel", p) if p else ("kernel", "kernel")  # (a Dense at the root: layer "kernel")
    if (kp not in weights and config.settings_for(p).quantize
        and not isinstance(_get(root, kp), QuantizedKernel)):
      raise QuantizationError(f"quantize_params: layer {p}: no calibration stats (its kernel was not used by any matmul "
                       f"during calibration). Calibrate it, or keep it in float with LayerRule({p!r}, skip=True)")
  for p, s in stats.items():
    wp = weight_path(p, s)
    k = _get(root, wp)
    if k is None or isinstance(k, dict) or (s.param and layer_name(s.param) != p):
      raise QuantizationError(f"quantize_params: layer {p}: in stats but has no kernel (weight {wp}) in params "
                       "(stats from another model?)")
    if isinstance(k, QuantizedKernel):
      raise QuantizationError(f"quantize_params: layer {p}: kernel is already quantized")
    if s.reason:
      continue
    shape = tuple(np.shape(k))
    if s.layers:
      if shape[:1] != (s.layers,):
        raise QuantizationError(f"quantize_params: layer {p}: the stats are for a stack of {s.layers} scanned layers, "
                                f"but weight {wp} has shape {shape} (stats from another model?)")
      shape = shape[1:]
    if not s.param and len(shape) != 2:
      raise QuantizationError(f"quantize_params: layer {p}: kernel must be 2-D (in, out), got shape {shape}")
    if max(s.contract + s.out) >= len(shape):
      raise QuantizationError(f"quantize_params: layer {p}: weight {wp} has shape {shape}, but the stats contract axes "
                       f"{s.contract} / output axes {s.out} (stats from another model?)")
    kdim = int(np.prod([shape[a] for a in s.contract]))
    if kdim != s.absmax.shape[-1]:
      raise QuantizationError(f"quantize_params: layer {p}: kernel {shape} has {kdim} inputs but stats "
                       f"have {s.absmax.shape[-1]} channels (stats from another model?)")
    dtype = k.dtype if hasattr(k, "dtype") else np.asarray(k).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
      raise QuantizationTypeError(f"{p}: expected a floating-point kernel, got {dtype}")
    _check_finite(k, f"quantize_params: layer {p}: kernel")
  return root, rebuild


@jax.jit
def _all_finite(x):
  return jnp.all(jnp.isfinite(x))


def _check_finite(x, what: str):
  """check_finite, reduced on the array's own devices (one bool to the host; the host
  copy is made only to count the bad values of a failing weight)."""
  if isinstance(x, jax.Array) and bool(to_host(_all_finite(x))):
    return
  check_finite(x if getattr(x, "is_fully_addressable", True) else to_host(x), what)  # (counts the bad values)


def _host(x) -> np.ndarray:
  """A stats vector on the host (an explicit transfer)."""
  return np.asarray(to_host(x))


def _layer(x, i):
  """Layer i of something stacked over a scan's L layers: an array's slice; a WeightRef's
  slice with its pending updates' vectors for that layer (a stack's updates are (L, K) /
  (L, N); a (K,) / (N,) one, from an unstacked group, applies to every layer); a
  LayerPlan's smoothing, absmax and stats; a LayerStats' absmax and samples; a
  QuantizedKernel's arrays; each item of a list, tuple or dict; None as is."""
  if x is None:
    return None
  if isinstance(x, smooth.WeightRef):
    return smooth.WeightRef(x.leaf[i], x.contract, x.out,
                            tuple((kind, v[i] if np.ndim(v) == 2 else v) for kind, v in x.ops))
  if isinstance(x, LayerPlan):
    return dataclasses.replace(x, s=_layer(x.s, i), x_absmax=x.x_absmax[i], stats=_layer(x.stats, i),
                               act_scale=_layer(x.act_scale, i))
  if isinstance(x, LayerStats):
    return dataclasses.replace(x, absmax=x.absmax[i], samples=x.samples[i], layers=0)
  if isinstance(x, QuantizedKernel):
    return dataclasses.replace(jax.tree.map(lambda a: a[i], x), param_shape=tuple(x.param_shape)[1:])
  if isinstance(x, (list, tuple)):
    return type(x)(_layer(v, i) for v in x)
  if isinstance(x, dict):
    return {k: _layer(v, i) for k, v in x.items()}
  return x[i]


def _per_layer(layers: int, fn, *stacked) -> list:
  """[fn(*layer i of each of `stacked`) for each of a scan's L layers]: a layer stack is
  handled one layer at a time (one layer's temporaries), each layer's slice read by the
  same functions as an unstacked weight, so its numbers are exactly the unrolled model's."""
  return [fn(*(_layer(x, i) for x in stacked)) for i in range(layers)]


def _stacked(layers: int, fn, *stacked):
  """_per_layer's results (arrays, or pytrees of them) stacked along a leading layer axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *_per_layer(layers, fn, *stacked))


def _smoothing(first, grid, rotate, samples, refs, x_absmax):
  """(alpha, alpha_errors, note, s) of a group: alpha fixed, or searched on the calibration
  rows (alpha="auto"; with the group's rotation)."""
  alpha, errors, note = first.alpha, None, ""
  if alpha == "auto":
    alpha, errors, note = smooth.auto_alpha(samples, refs, x_absmax, grid, first.qtype, first.act_mode, rotate)
  s = None if alpha is None else smooth.smoothing_factors(x_absmax, smooth.weight_row_absmax(refs), alpha)
  return alpha, errors, note, s


def _stack_smoothing(per, k: int):
  """A layer stack's (alpha, alpha_errors, note, s (L, K)) from its layers' _smoothing:
  alpha a tuple when the layers' differ, errors summed, s = 1 for a layer not smoothed."""
  alphas, errors, notes, ss = zip(*per)
  s = None if all(v is None for v in ss) else np.stack([np.ones(k, np.float32) if v is None else v for v in ss])
  alpha = alphas[0] if len(set(alphas)) == 1 else alphas
  alpha_errors = None if any(e is None for e in errors) else {a: sum(e[a] for e in errors) for a in errors[0]}
  return alpha, alpha_errors, next((n for n in notes if n), ""), s


def _fold(kind, producer_params, s, names, layers):
  """smooth.fold_inverse; per layer for a layer stack (s (L, K), the producer's params
  stacked by the same scan)."""
  if not layers:
    return smooth.fold_inverse(kind, producer_params, s, names)
  folded = {n: producer_params[n] for n in names or smooth.FOLD_PARAMS[kind] if n in producer_params}
  return {**producer_params,
          **_stacked(layers, lambda p, si: smooth.fold_inverse(kind, p, si, tuple(folded)), folded, s)}


def _can_fold(kind, producer_params, names, layers):
  if not smooth.can_fold(kind, producer_params, names):
    return False
  return not layers or all(np.shape(producer_params[n])[:1] == (layers,)
                           for n in (names or smooth.FOLD_PARAMS[kind]) if n in producer_params)


def _plan(params, stats, config):
  """Smoothing decided from (K,) vectors, no weight updated: (rebuild, new_root, updates,
  plans). new_root: the params' root with the small producer params (norm scales, biases)
  that absorb 1/s updated; updates: {weight path: ((kind, vector), ...)} the pending
  updates of every weight to be quantized (smooth.WeightRef), in the order smoothing
  made them; plans: {path: LayerPlan}."""
  root, rebuild = _check_inputs(params, stats, config)
  live = {p: s for p, s in stats.items() if not s.reason}
  settings = {p: config.settings_for(p) for p in live}
  groups: dict[str, list[str]] = {}
  for p in live:
    groups.setdefault(live[p].group, []).append(p)
  # Weights that will be quantized are never rewritten in float: their updates wait in
  # `updates` and are applied inside the jitted quantizer.
  lazy = {weight_path(p, live[p]) for p in live if settings[p].quantize}
  updates: dict[str, list] = {}
  ref = lambda p: smooth.WeightRef(_get(root, weight_path(p, live[p])), live[p].contract, live[p].out,
                                   tuple(updates.get(weight_path(p, live[p]), ())))

  new_root = root
  plans: dict[str, LayerPlan] = {}
  for members in groups.values():
    quantized = [p for p in members if settings[p].quantize]
    if not quantized:
      continue
    first = settings[quantized[0]]
    for p in quantized[1:]:
      if (settings[p].alpha, settings[p].act_mode, settings[p].qtype) != (first.alpha, first.act_mode, first.qtype):
        raise QuantizationError(f"quantize_params: layers {quantized[0]} and {p} read the same input but their "
                         "rules give them different alpha/act_mode/qtype; they must share one smoothing")
    st = live[quantized[0]]
    x_absmax = np.max(np.stack([_host(live[p].absmax) for p in quantized]), axis=0)
    refs = [ref(p) for p in quantized]
    alpha, alpha_errors, note = first.alpha, None, ""
    tied = [weight_path(p, live[p]) for p in quantized if live[p].keep_float]
    # (a lookup reading a rotated table rotates its rows back: one contracted axis)
    multi = [weight_path(p, live[p]) for p in quantized if live[p].keep_float and len(live[p].contract) != 1]
    rotate = config.rotate and not multi and rotation.factors(x_absmax.shape[-1]) is not None
    rotate_note = ("" if rotate or not config.rotate else "not rotated: " + (
        f"{', '.join(multi)} is read by a lookup over several contracted axes" if multi
        else rotation.why_not(x_absmax.shape[-1])))
    if tied and alpha is not None:
      # A weight other ops read too (a tied embedding's lookup) is served from its int8
      # table, which must then hold the weight itself, not diag(s) W: not smoothed.
      alpha, s = None, None
      note = (f"not smoothed: {', '.join(tied)} is also read outside its matmuls (a tied embedding's lookup "
              "reads the int8 table)")
    elif st.layers:  # a scan's layer stack: one smoothing per layer (alpha="auto" searched per layer)
      alpha, alpha_errors, note, s = _stack_smoothing(
          _per_layer(st.layers, functools.partial(_smoothing, first, config.alpha_grid, rotate), st.samples, refs,
                     x_absmax),
          x_absmax.shape[-1])
    else:
      alpha, alpha_errors, note, s = _smoothing(first, config.alpha_grid, rotate, st.samples, refs, x_absmax)
    # Exact only if, at every call, every reader of the producer's output is a quantized
    # layer of this group (a float-kept reader would see X / s), and every producer can take it.
    producers = sorted({q for p in quantized for q in (live[p].producers or (live[p].producer,))})
    names = st.fold_params or smooth.FOLD_PARAMS.get(st.producer_kind, ())
    fold = (s is not None and len(quantized) == len(members) and all(live[p].foldable for p in quantized)
            and all(q and _can_fold(st.producer_kind, _get(new_root, q), names, st.layers) for q in producers))
    if fold:
      inv = (1.0 / s).astype(np.float32)
      for q in producers:
        eager = tuple(n for n in names if f"{q}/{n}" not in lazy)
        if eager:
          new_root = _set(new_root, q, _fold(st.producer_kind, _get(new_root, q), s, eager, st.layers))
        for n in names:
          if f"{q}/{n}" in lazy and n in _get(new_root, q):  # a quantized Dense producer's output columns
            updates.setdefault(f"{q}/{n}", []).append(("cols", inv))
    act_scale, sink_note = _static_scale(st, s, first, rotate) if first.act_mode == "static" else (None, "")
    for p in quantized:
      if s is not None:  # input channels of W times s (per layer for a stack: s (L, K))
        updates.setdefault(weight_path(p, live[p]), []).append(("rows", s))
      use_gptq, rounding_note = _rounding(config.weight_rounding, live[p], weight_path(p, live[p]))
      plans[p] = LayerPlan(settings[p], alpha, alpha_errors, s, fold, x_absmax, live[p],
                           "; ".join(n for n in (note, rotate_note, sink_note, rounding_note) if n), rotate, act_scale,
                           use_gptq)
  return rebuild, new_root, {wp: tuple(u) for wp, u in updates.items()}, plans


def _rounding(rounding: str, st: LayerStats, wp: str):
  """(GPTQ or not, note) of one layer (QuantConfig.weight_rounding)."""
  if rounding == "nearest":
    return False, ""
  if st.keep_float:  # the lookup's rows would carry the matmul's error compensation
    return False, f"rounded to nearest, not by GPTQ: {wp} is also read by a lookup (a tied embedding)"
  rows, k = np.shape(st.samples)[-2:]
  if rows < gptq.min_rows(k):
    return False, (f"rounded to nearest, not by GPTQ: {rows} calibration rows for K = {k} (GPTQ needs >= "
                   f"{gptq.min_rows(k)}: calibrate more tokens, or with a larger num_samples)")
  return True, ""


def _static_scale(st: LayerStats, s, settings, rotate: bool):
  """(act_scale, note) of a static group: smooth.static_scale_of_rows of its first layer's
  calibration rows (per layer for a stack), one scale for the whole group (it shares one
  quantized input); the note says how many calibration rows were beyond it -- scaled on
  their own at run time -- and how many of those were sinks."""
  def one(samples, si):
    return smooth.static_scale_of_rows(samples, si, settings.qtype, rotate)
  if st.layers:
    per = _per_layer(st.layers, one, st.samples, s)
    scale = np.array([p[0] for p in per], np.float32)
    beyond, sinks, rows = max(p[1] for p in per), max(p[2] for p in per), per[0][3]
  else:
    scale, beyond, sinks, rows = one(st.samples, s)
  where = " (in the worst layer)" if st.layers else ""
  note = (f"static: {beyond} of {rows} calibration rows{where} beyond the scale, scaled on their own at run time"
          + (f"; {sinks} of them sink tokens (row max > {smooth.SINK_RATIO:g}x the median row's)" if sinks else "")
          if beyond else "")
  return scale, note


def smooth_params(params, stats: dict[str, LayerStats], config: QuantConfig = QuantConfig()):
  """The smoothing half of quantize_params, in float: returns (smoothed params, plans).

  For each group of layers reading one input: s from the calibration absmax and the
  group's weights (alpha fixed or searched), each weight's contracted (input) channels
  multiplied by s, and 1/s folded into the producer of every call when exact
  (plans[path].folded) -- else the layer must apply 1/s to its input at run time.
  plans: {path: LayerPlan} for every layer to be quantized. With every plan folded, the
  smoothed params compute the same function.
  """
  rebuild, new_root, updates, plans = _plan(params, stats, config)
  layouts = {weight_path(p, pl.stats): pl.stats for p, pl in plans.items()}
  for wp, ups in updates.items():
    st = layouts[wp]
    ref = smooth.WeightRef(_get(new_root, wp), st.contract, st.out, ups)
    w = _stacked(st.layers, smooth.apply_updates, ref) if st.layers else smooth.apply_updates(ref)
    new_root = _set(new_root, wp, w)
  return rebuild(new_root), plans


def quantize_params(params, stats: dict[str, LayerStats], config: QuantConfig = QuantConfig()):
  """Quantize every calibrated weight matmul of `params` per `config`: returns qparams.

  Pure: the input tree is not modified. Raises on missing or mismatched stats, non-finite
  weights, and rules that give layers sharing one input different smoothing.
  quantize_params_with_report also returns what was done to each layer.
  """
  return _quantize(params, stats, config)[0]


def quantize_params_with_report(params, stats: dict[str, LayerStats], config: QuantConfig = QuantConfig()):
  """quantize_params, and its report: (qparams, {layer: LayerReport}). Every layer the
  calibration saw is in the report, quantized or float with a reason; report_summary(report)
  is the one-line account, format_report(report) the table."""
  qparams, plans = _quantize(params, stats, config)
  orig_root, qroot = _split_root(params)[0], _split_root(qparams)[0]
  report = {p: LayerReport(p, quantized=False, producer=st.producer, producer_kind=st.producer_kind,
                           reason=st.reason or "rule") for p, st in stats.items() if p not in plans}
  for p, plan in plans.items():
    st = plan.stats
    wp = weight_path(p, st)
    ref = smooth.WeightRef(_get(orig_root, wp), st.contract, st.out)
    report[p] = (_stack_report if st.layers else _layer_report)(p, ref, _get(qroot, wp), plan)
  return qparams, report


def _quantize(params, stats, config):
  """(qparams, plans): every planned weight quantized, read once where it lives."""
  rebuild, root, updates, plans = _plan(params, stats, config)
  orig_root, _ = _split_root(params)
  group_sizes: dict[str, int] = {}
  for plan in plans.values():
    group_sizes[plan.stats.group] = group_sizes.get(plan.stats.group, 0) + 1
  for p, plan in plans.items():
    st = plan.stats
    wp = weight_path(p, st)
    ref = smooth.WeightRef(_get(orig_root, wp), st.contract, st.out, updates.get(wp, ()))
    qk = _quantize_stack(ref, plan, p) if st.layers else _quantize_layer(ref, plan, p)
    # Layers smoothed together (one input, one s, one static scale) share its quantization.
    # No float copy is kept: other readers of the weight (a tied embedding's lookup) read
    # the int8 table (not smoothed, see _plan), rows dequantized on the fly.
    qk = dataclasses.replace(qk, act_group=st.group if group_sizes[st.group] > 1 else "",
                             folded_into=tuple(sorted(set(st.producers or (st.producer,)))) if plan.folded else (),
                             dataflow=layer_dataflow(DataflowFacts(st.group, st.producer, st.producer_kind,
                                                                   st.exclusive, st.producers, st.fold_params),
                                                     st.contract, st.out) if st.producers else "")
    root = _set(root, wp, qk)
  return rebuild(root), plans


def _quantize_layer(ref: smooth.WeightRef, plan: LayerPlan, name: str) -> QuantizedKernel:
  """One weight (its smoothing updates applied inside the jitted quantizer) as a
  QuantizedKernel, on the weight's devices: what quantize_kernel(diag(s) W, ...) gives.
  act_group is set by quantize_params."""
  qt, mode = plan.settings.qtype, plan.settings.act_mode
  act_scale = plan.act_scale if mode == "static" else None
  if act_scale is not None and not 0 < float(act_scale) <= numerics.MAX_SCALE:
    raise QuantizationError(f"{name}: act_scale must be in (0, 2^126] (its reciprocal multiplies x), "
                            f"got {float(act_scale)}")
  inv = None if (plan.s is None or plan.folded) else (1.0 / plan.s).astype(np.float32)
  values, scale = smooth.quantize_weight(ref, qt, plan.rotated, plan.stats.samples if plan.gptq else None, plan.s)
  leaf = ref.leaf
  sharding = getattr(leaf, "sharding", None)
  k_axis = (kernel_axes(sharding.spec, leaf.ndim, ref.contract, ref.out)[0]
            if isinstance(sharding, NamedSharding) else None)
  return QuantizedKernel(values=values, scale=scale,
                         act_scale=None if act_scale is None else put_like(act_scale, leaf),
                         inv_smooth=None if inv is None else put_like(inv, leaf, P(k_axis)),
                         qtype=qt, contract=tuple(ref.contract), out=tuple(ref.out),
                         param_shape=tuple(np.shape(leaf)), param_dtype=jnp.dtype(leaf.dtype).name,
                         rotated=plan.rotated)


def _quantize_stack(ref: smooth.WeightRef, plan: LayerPlan, name: str) -> QuantizedKernel:
  """A scan's layer stack (L, ...) quantized layer by layer (_quantize_layer on each
  layer's slice and smoothing: exactly an unstacked layer's kernel) into one
  QuantizedKernel with a leading layer axis on every array. A stack with a NamedSharding
  is placed as quantized_partition_specs places it (its layer axis's spec first)."""
  layers = plan.stats.layers
  qk = _stacked(layers, lambda r, pl, i: _quantize_layer(r, pl, f"{name}[{i}]"), ref, plan, np.arange(layers))
  qk = dataclasses.replace(qk, param_shape=tuple(np.shape(ref.leaf)))
  sharding = getattr(ref.leaf, "sharding", None)
  if isinstance(ref.leaf, jax.Array) and isinstance(sharding, NamedSharding):
    rank = ref.leaf.ndim
    spec = tuple(sharding.spec) + (None,) * (rank - len(tuple(sharding.spec)))
    layer = spec[:1]
    k_axis, n_axis = kernel_axes(spec[1:], rank - 1, ref.contract, ref.out)
    at = lambda *s: NamedSharding(sharding.mesh, P(*layer, *s))
    qk = dataclasses.replace(
        qk, values=jax.device_put(qk.values, at(n_axis, k_axis)), scale=jax.device_put(qk.scale, at(n_axis)),
        act_scale=None if qk.act_scale is None else jax.device_put(qk.act_scale, at()),
        inv_smooth=None if qk.inv_smooth is None else jax.device_put(qk.inv_smooth, at(k_axis)))
  return qk


def _stack_report(p, ref: smooth.WeightRef, qk, plan: LayerPlan) -> LayerReport:
  """The report of a layer stack: each layer's, the worst layer's errors and ratios."""
  rs = _per_layer(plan.stats.layers, functools.partial(_layer_report, p), ref, qk, plan)
  worst = {f: max(getattr(r, f) for r in rs)
           for f in ("outlier_ratio_before", "outlier_ratio_after", "weight_error", "output_error")}
  return dataclasses.replace(rs[0], act_scale=None if rs[0].act_scale is None else max(r.act_scale for r in rs),
                             layers=plan.stats.layers, **worst)


def _layer_report(p, weight: smooth.WeightRef, qk, plan: LayerPlan) -> LayerReport:
  """The report of one quantized layer: its errors measured on its calibration rows."""
  s, qt, mode = plan.s, plan.settings.qtype, plan.settings.act_mode
  weight_error, output_error = smooth.layer_errors(weight, qk.values, qk.scale, s, plan.stats.samples, plan.act_scale,
                                                   qt, mode, plan.rotated)
  return LayerReport(
      p, True, qt, mode, plan.alpha,
      smoothing="none" if s is None else ("folded" if plan.folded else "runtime"),
      producer=plan.stats.producer, producer_kind=plan.stats.producer_kind,
      act_scale=float(plan.act_scale) if mode == "static" else None,
      outlier_ratio_before=smooth.outlier_ratio(plan.x_absmax),
      outlier_ratio_after=smooth.outlier_ratio(plan.x_absmax, s),
      weight_error=weight_error, output_error=output_error, alpha_errors=plan.alpha_errors, note=plan.note)
