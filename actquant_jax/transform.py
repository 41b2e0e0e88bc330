"""quantize_params(params, stats, config): a float param pytree in, a quantized one out.

Same tree structure and paths: each quantized weight leaf (a Dense `kernel`, an Einsum
or raw param, a tied embedding) becomes one QuantizedKernel node (int8/fp8 (N, K) values
with the contraction it serves, per-output-channel scales, the static activation scale or
None, the runtime inverse-smoothing vector or None). Producers that absorbed 1/s (a
norm's scale and bias, a Dense's output columns) are rewritten in place in the copy. Nothing else changes, so sharding rules and checkpoint tools that
key on paths keep working.

A weight stacked over the L layers of a scan (LayerStats.layers = L) becomes one
QuantizedKernel with a leading layer axis on every array (values (L, N, K), scale (L, N),
act_scale (L,), inv_smooth (L, K)): each layer has its own smoothing, scales and static
activation scale; 1/s folds per layer into producers stacked by the same scan.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from actquant_jax import smooth
from actquant_jax._capture import layer_name
from actquant_jax.calibrate import DataflowFacts, LayerStats, check_stats, layer_dataflow
from actquant_jax.config import QuantConfig
from actquant_jax.errors import QuantizationError, QuantizationTypeError
from actquant_jax.quant import (QuantizedKernel, check_finite, quantize_kernel,
                                weight_from_matrix, weight_matrix)


@dataclasses.dataclass(frozen=True)
class LayerReport:
  path: str
  quantized: bool
  qtype: str | None = None
  act_mode: str | None = None
  alpha: Any = None              # the alpha used (None: no smoothing)
  smoothing: str = "none"        # "folded" (into producer), "runtime" (vector in quantize pass), "none"
  producer: str = ""
  producer_kind: str = ""
  act_scale: float | None = None
  outlier_ratio_before: float = 0.0
  outlier_ratio_after: float = 0.0
  weight_error: float = 0.0      # ||dq(W') - W'|| / ||W'||
  output_error: float = 0.0      # ||y_q - y|| / ||y|| on calibration rows (this layer alone)
  alpha_errors: dict | None = None  # "auto": error of each grid value (group total)
  reason: str = ""               # why a layer stays float ("rule", or an unsupported layout)
  note: str = ""                 # why a setting differs from the config (e.g. the alpha="auto" fallback)
  layers: int = 0                # a stack of L scanned layers: errors and ratios are the worst layer's,
                                 # act_scale the largest, alpha a tuple when the layers' differ


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


def _rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  d = float(np.linalg.norm(b))
  return float(np.linalg.norm(a - b)) / d if d > 0 else 0.0


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


def weight_path(layer: str, st: LayerStats) -> str:
  """The param path of a layer's weight (stats from before the capture layer: `kernel`)."""
  return st.param or f"{layer}/kernel"


def _check_inputs(params, stats, config):
  if not isinstance(config, QuantConfig):
    raise QuantizationTypeError(f"quantize_params: config must be a QuantConfig, got {type(config).__name__}")
  if not isinstance(stats, dict) or not stats:
    raise QuantizationError("quantize_params: stats is empty; run aq.calibrate(model, params, batches) first")
  check_stats(stats, "quantize_params")
  fps = {s.fingerprint for s in stats.values()}
  if len(fps) > 1:
    raise QuantizationError("quantize_params: stats mix calibrations of different model structures (their fingerprints "
                     "differ); calibrate the model once and use those stats")
  root, rebuild = _split_root(params)
  weights = {weight_path(p, s) for p, s in stats.items()}
  # Every Dense-like kernel must have stats unless a rule keeps it in float.
  for p in dense_kernel_paths(root):
    if (f"{p}/kernel" not in weights and config.settings_for(p).quantize
        and not isinstance(_get(root, p)["kernel"], QuantizedKernel)):
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
    check_finite(k, f"quantize_params: layer {p}: kernel")
  return root, rebuild


def _matrix(root, p, st):
  """The layer's weight as its (K, N) matrix, float32 numpy ((L, K, N) for a layer stack)."""
  w = np.asarray(_get(root, weight_path(p, st)), np.float32)
  if st.layers:
    return np.stack([weight_matrix(w[i], st.contract, st.out) for i in range(st.layers)])
  return weight_matrix(w, st.contract, st.out)


def _smoothed_weight(w, s, st):
  """The weight with its contracted (input) channels multiplied by s, in its own layout
  and dtype (per layer for a layer stack: s (L, K))."""
  w32 = np.asarray(w, np.float32)
  one = lambda v, s_: weight_from_matrix(weight_matrix(v, st.contract, st.out) * s_[:, None], np.shape(v),
                                         st.contract, st.out)
  m = np.stack([one(w32[i], s[i]) for i in range(st.layers)]) if st.layers else one(w32, s)
  return m.astype(np.asarray(w).dtype)


def _stack_smoothing(first, config, st, kernels, x_absmax):
  """alpha, alpha_errors, note and s (L, K) of a layer stack's group: each layer its own
  (alpha="auto" searched per layer on that layer's calibration rows)."""
  alphas, errors, notes, ss = [], [], [], []
  samples = np.asarray(st.samples)
  for i in range(st.layers):
    ks = [k[i] for k in kernels]
    a, e, note = first.alpha, None, ""
    if a == "auto":
      a, e, note = smooth.auto_alpha(samples[i], ks, x_absmax[i], config.alpha_grid, first.qtype, first.act_mode)
    alphas.append(a)
    errors.append(e)
    notes.append(note)
    ss.append(None if a is None else smooth.smoothing_factors(x_absmax[i], smooth.weight_row_absmax(ks), a))
  s = None if all(v is None for v in ss) else np.stack(
      [np.ones(x_absmax.shape[-1], np.float32) if v is None else v for v in ss])
  alpha = alphas[0] if len(set(alphas)) == 1 else tuple(alphas)
  alpha_errors = None if any(e is None for e in errors) else {a: sum(e[a] for e in errors) for a in errors[0]}
  return alpha, alpha_errors, next((n for n in notes if n), ""), s


def _fold(kind, producer_params, s, names, layers):
  """smooth.fold_inverse; per layer for a layer stack (s (L, K), the producer's params
  stacked by the same scan)."""
  if not layers:
    return smooth.fold_inverse(kind, producer_params, s, names)
  out = dict(producer_params)
  for n in names or smooth.FOLD_PARAMS[kind]:
    if n in out:
      v = out[n]
      out[n] = jax.numpy.stack([smooth.fold_inverse(kind, {n: v[i]}, s[i], (n,))[n] for i in range(layers)])
  return out


def _can_fold(kind, producer_params, names, layers):
  if not smooth.can_fold(kind, producer_params, names):
    return False
  return not layers or all(np.shape(producer_params[n])[:1] == (layers,)
                           for n in (names or smooth.FOLD_PARAMS[kind]) if n in producer_params)


def smooth_params(params, stats: dict[str, LayerStats], config: QuantConfig = QuantConfig()):
  """The smoothing half of quantize_params, in float: returns (smoothed params, plans).

  For each group of layers reading one input: s from the calibration absmax and the
  group's weights (alpha fixed or searched), each weight's contracted (input) channels
  multiplied by s, and 1/s folded into the producer of every call when exact
  (plans[path].folded) -- else the layer must apply 1/s to its input at run time.
  plans: {path: LayerPlan} for every layer to be quantized. With every plan folded, the
  smoothed params compute the same function.
  """
  root, rebuild = _check_inputs(params, stats, config)
  live = {p: s for p, s in stats.items() if not s.reason}
  settings = {p: config.settings_for(p) for p in live}
  groups: dict[str, list[str]] = {}
  for p in live:
    groups.setdefault(live[p].group, []).append(p)

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
    x_absmax = np.max(np.stack([np.asarray(live[p].absmax) for p in quantized]), axis=0)
    # Kernels are read on use (not cached) so no second float copy of the model is held.
    group_kernels = [_matrix(new_root, p, live[p]) for p in quantized]
    alpha, alpha_errors, note = first.alpha, None, ""
    if st.layers:  # a scan's layer stack: one smoothing per layer
      alpha, alpha_errors, note, s = _stack_smoothing(first, config, st, group_kernels, x_absmax)
    else:
      if alpha == "auto":
        alpha, alpha_errors, note = smooth.auto_alpha(st.samples, group_kernels, x_absmax, config.alpha_grid,
                                                      first.qtype, first.act_mode)
      s = None if alpha is None else smooth.smoothing_factors(x_absmax, smooth.weight_row_absmax(group_kernels),
                                                              alpha)
    del group_kernels
    # Exact only if, at every call, every reader of the producer's output is a quantized
    # layer of this group (a float-kept reader would see X / s), and every producer can take it.
    producers = sorted({q for p in quantized for q in (live[p].producers or (live[p].producer,))})
    names = st.fold_params or smooth.FOLD_PARAMS.get(st.producer_kind, ())
    fold = (s is not None and len(quantized) == len(members) and all(live[p].foldable for p in quantized)
            and all(q and _can_fold(st.producer_kind, _get(new_root, q), names, st.layers) for q in producers))
    if fold:
      for q in producers:
        new_root = _set(new_root, q, _fold(st.producer_kind, _get(new_root, q), s, names, st.layers))
    for p in quantized:
      if s is not None:  # input channels of W times s (the current weight: a producer's fold may have hit it)
        wp = weight_path(p, live[p])
        new_root = _set(new_root, wp, _smoothed_weight(_get(new_root, wp), s, live[p]))
      plans[p] = LayerPlan(settings[p], alpha, alpha_errors, s, fold, x_absmax, live[p], note)
  return rebuild(new_root), plans


def quantize_params(params, stats: dict[str, LayerStats], config: QuantConfig = QuantConfig(), *,
                    return_report: bool = False):
  """Quantize every calibrated weight matmul of `params` per `config`.

  Returns qparams (and a {layer: LayerReport} dict with return_report=True; every layer
  the calibration saw is in it, quantized or float with a reason; report_summary(report)
  is the one-line account). Pure: the input tree is not modified. Raises on missing or
  mismatched stats, non-finite weights, and rules that give layers sharing one input
  different smoothing.
  """
  smoothed, plans = smooth_params(params, stats, config)
  root, rebuild = _split_root(smoothed)
  orig_root, _ = _split_root(params)
  report: dict[str, LayerReport] = {}
  for p, st in stats.items():
    if p not in plans:
      report[p] = LayerReport(p, quantized=False, producer=st.producer, producer_kind=st.producer_kind,
                              reason=st.reason or "rule")
  group_sizes: dict[str, int] = {}
  for plan in plans.values():
    group_sizes[plan.stats.group] = group_sizes.get(plan.stats.group, 0) + 1
  for p, plan in plans.items():
    st = plan.stats
    wp = weight_path(p, st)
    qt, mode = plan.settings.qtype, plan.settings.act_mode
    if st.layers:
      qk = _quantize_stack(_get(root, wp), plan, p)
    else:
      act_scale = smooth.static_act_scale(plan.x_absmax, plan.s, qt) if mode == "static" else None
      inv = None if (plan.s is None or plan.folded) else (1.0 / plan.s).astype(np.float32)
      qk = quantize_kernel(_get(root, wp), qt, act_scale=act_scale, inv_smooth=inv, name=p, contract=st.contract,
                           out=st.out)
    # Other readers (a tied embedding's lookup) keep the original float weight: the int8
    # copy alone carries the smoothing.
    # Layers smoothed together (one input, one s, one static scale) share its quantization.
    qk = dataclasses.replace(qk, act_group=st.group if group_sizes[st.group] > 1 else "",
                             kept=jax.numpy.asarray(_get(orig_root, wp)) if st.keep_float else None,
                             folded_into=tuple(sorted(set(st.producers or (st.producer,)))) if plan.folded else (),
                             dataflow=layer_dataflow(DataflowFacts(st.group, st.producer, st.producer_kind,
                                                                   st.exclusive, st.producers, st.fold_params),
                                                     st.contract, st.out) if st.producers else "")
    root = _set(root, wp, qk)
    if return_report:
      report[p] = (_stack_report if st.layers else _layer_report)(p, _matrix(orig_root, p, st), qk, plan)
  qparams = rebuild(root)
  return (qparams, report) if return_report else qparams


def _quantize_stack(w, plan: LayerPlan, p: str) -> QuantizedKernel:
  """A layer stack's weight (L, ...) quantized layer by layer into one QuantizedKernel
  with a leading layer axis on every array."""
  st, qt, mode = plan.stats, plan.settings.qtype, plan.settings.act_mode
  per = []
  for i in range(st.layers):
    s = None if plan.s is None else plan.s[i]
    act_scale = smooth.static_act_scale(plan.x_absmax[i], s, qt) if mode == "static" else None
    inv = None if (s is None or plan.folded) else (1.0 / s).astype(np.float32)
    per.append(quantize_kernel(w[i], qt, act_scale=act_scale, inv_smooth=inv, name=f"{p}[{i}]", contract=st.contract,
                               out=st.out))
  stack = lambda f: None if getattr(per[0], f) is None else jax.numpy.stack([getattr(q, f) for q in per])
  act_scale, inv = stack("act_scale"), stack("inv_smooth")
  return dataclasses.replace(per[0], values=stack("values"), scale=stack("scale"), act_scale=act_scale,
                             inv_smooth=inv,
                             param_shape=tuple(np.shape(w)))


def _stack_report(p, kernels, qk, plan: LayerPlan) -> LayerReport:
  """The report of a layer stack: each layer's, the worst layer's errors and ratios."""
  rs = []
  for i in range(plan.stats.layers):
    one = dataclasses.replace(jax.tree_util.tree_map(lambda a: a[i], qk), param_shape=tuple(qk.param_shape)[1:])
    st = dataclasses.replace(plan.stats, absmax=plan.stats.absmax[i], samples=plan.stats.samples[i], layers=0)
    rs.append(_layer_report(p, kernels[i], one, dataclasses.replace(
        plan, s=None if plan.s is None else plan.s[i], x_absmax=plan.x_absmax[i], stats=st)))
  worst = {f: max(getattr(r, f) for r in rs)
           for f in ("outlier_ratio_before", "outlier_ratio_after", "weight_error", "output_error")}
  return dataclasses.replace(rs[0], act_scale=None if qk.act_scale is None else float(np.max(qk.act_scale)),
                             layers=plan.stats.layers, **worst)


def report_summary(report: dict[str, LayerReport]) -> str:
  """One line: "quantized 15 of 15 weight matmuls; 11 smoothing vectors folded, 4 at run time"."""
  q = [r for r in report.values() if r.quantized]
  folded = {r.path for r in q if r.smoothing == "folded"}
  runtime = {r.path for r in q if r.smoothing == "runtime"}
  stacks: dict[int, int] = {}
  for r in q:
    if r.layers:
      stacks[r.layers] = stacks.get(r.layers, 0) + 1
  scanned = ", ".join(f"{n} of them stacked weights x {k} scanned layers" for k, n in stacks.items())
  scanned = f" ({scanned})" if scanned else ""
  line = (f"quantized {len(q)} of {len(report)} weight matmuls{scanned}; {len(folded)} smoothing vectors folded, "
          f"{len(runtime)} at run time")
  reasons = {}
  for r in report.values():
    if not r.quantized:
      reasons.setdefault(r.reason or "rule", []).append(r.path)
  for why, paths in reasons.items():
    line += f"; float ({why}): {', '.join(paths)}"
  return line


def _layer_report(p, kernel, qk, plan: LayerPlan) -> LayerReport:
  from actquant_jax.ops import w8a8_dot
  s, qt, mode = plan.s, plan.settings.qtype, plan.settings.act_mode
  w_s = kernel if s is None else kernel * s[:, None]
  deq = np.asarray(qk.values, np.float32).T * np.asarray(qk.scale)[None, :]
  samples = np.asarray(plan.stats.samples, np.float32)
  y_err = 0.0
  if samples.shape[0]:
    # The layer alone on calibration rows, 1/s applied in the quantize pass (equal to a
    # folded producer's output up to float rounding).
    qk_run = smooth.quantize_smoothed(kernel, plan.x_absmax, s, qt, mode, runtime_inv=True, name=p)
    y_err = _rel_err(w8a8_dot(jax.numpy.asarray(samples), qk_run, backend="xla"), samples @ kernel)
  return LayerReport(
      p, True, qt, mode, plan.alpha,
      smoothing="none" if s is None else ("folded" if plan.folded else "runtime"),
      producer=plan.stats.producer, producer_kind=plan.stats.producer_kind,
      act_scale=None if qk.act_scale is None else float(qk.act_scale),
      outlier_ratio_before=smooth.outlier_ratio(plan.x_absmax),
      outlier_ratio_after=smooth.outlier_ratio(plan.x_absmax, s),
      weight_error=_rel_err(deq, w_s), output_error=y_err, alpha_errors=plan.alpha_errors, note=plan.note)


def format_report(report: dict[str, LayerReport]) -> str:
  """A fixed-width table of the report, one line per layer."""
  head = f"{'layer':40s} {'mode':22s} {'alpha':>5s} {'smoothing':9s} {'outlier x':>15s} {'w err':>8s} {'y err':>8s}"
  lines = [report_summary(report), head, "-" * len(head)]
  for p, r in report.items():
    if not r.quantized:
      lines.append(f"{p:40s} {'float (' + (r.reason or 'rule') + ')':22s}")
      continue
    a = "-" if r.alpha is None else ("var" if isinstance(r.alpha, tuple) else f"{r.alpha:.2f}")
    p = f"{p} (x{r.layers})" if r.layers else p
    lines.append(f"{p:40s} {r.qtype + ' ' + r.act_mode:22s} {a:>5s} {r.smoothing:9s} "
                 f"{r.outlier_ratio_before:6.1f}->{r.outlier_ratio_after:6.1f} {r.weight_error:8.2e} {r.output_error:8.2e}"
                 + (f"  note: {r.note}" if r.note else ""))
  return "\n".join(lines)
