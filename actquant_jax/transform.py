"""quantize_params(params, stats, config): a float param pytree in, a quantized one out.

Same tree structure and paths: each quantized Dense `kernel` leaf becomes one
QuantizedKernel node (int8/fp8 (N, K) values, per-output-channel scales, the static
activation scale or None, the runtime inverse-smoothing vector or None). Producers that
absorbed 1/s (LayerNorm/RMSNorm scale and bias, a Dense's output columns) are rewritten
in place in the copy. Nothing else changes, so sharding rules and checkpoint tools that
key on paths keep working.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from actquant_jax import smooth
from actquant_jax.calibrate import LayerStats, check_stats
from actquant_jax.config import QuantConfig
from actquant_jax.quant import QuantizedKernel, check_finite, quantize_kernel


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
  note: str = ""                 # why a setting differs from the config (e.g. the alpha="auto" fallback)


def _split_root(params):
  """linen variables {"params": {...}} or a bare param dict -> (root dict, rebuild)."""
  if isinstance(params, dict) and "params" in params and isinstance(params["params"], dict):
    return params["params"], lambda root: {**params, "params": root}
  if isinstance(params, dict):
    return params, lambda root: root
  raise TypeError(f"quantize_params: params must be a dict (linen variables or a param dict), "
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


def _check_inputs(params, stats, config):
  if not isinstance(config, QuantConfig):
    raise TypeError(f"quantize_params: config must be a QuantConfig, got {type(config).__name__}")
  if not isinstance(stats, dict) or not stats:
    raise ValueError("quantize_params: stats is empty; run aq.calibrate(model, params, batches) first")
  check_stats(stats, "quantize_params")
  root, rebuild = _split_root(params)
  # Every Dense-like kernel must have stats unless a rule keeps it in float.
  for p in dense_kernel_paths(root):
    if p not in stats and config.settings_for(p).quantize and not isinstance(_get(root, p)["kernel"], QuantizedKernel):
      raise ValueError(f"quantize_params: layer {p}: no calibration stats (was it called during "
                       f"calibration?). Calibrate it, or keep it in float with LayerRule({p!r}, skip=True)")
  for p, s in stats.items():
    node = _get(root, p)
    if node is None or "kernel" not in node:
      raise ValueError(f"quantize_params: layer {p}: in stats but has no kernel in params (stats from another model?)")
    k = node["kernel"]
    if isinstance(k, QuantizedKernel):
      raise ValueError(f"quantize_params: layer {p}: kernel is already quantized")
    if getattr(k, "ndim", 0) != 2:
      raise ValueError(f"quantize_params: layer {p}: kernel must be 2-D (in, out), got shape {np.shape(k)}")
    if k.shape[0] != s.absmax.shape[0]:
      raise ValueError(f"quantize_params: layer {p}: kernel {tuple(k.shape)} has {k.shape[0]} inputs but stats "
                       f"have {s.absmax.shape[0]} channels (stats from another model?)")
    check_finite(k, f"quantize_params: layer {p}: kernel")
  return root, rebuild


def smooth_params(params, stats: dict[str, LayerStats], config: QuantConfig = QuantConfig()):
  """The smoothing half of quantize_params, in float: returns (smoothed params, plans).

  For each group of Dense layers reading one input: s from the calibration absmax and
  the group's weights (alpha fixed or searched), each kernel's rows multiplied by s, and
  1/s folded into the producer when exact (plans[path].folded) -- else the layer must
  apply 1/s to its input at run time. plans: {path: LayerPlan} for every layer to be
  quantized. With every plan folded, the smoothed params compute the same function.
  """
  root, rebuild = _check_inputs(params, stats, config)
  settings = {p: config.settings_for(p) for p in stats}
  # Kernels are read on use (not cached) so no second float copy of the model is held.
  kernel_of = lambda p: np.asarray(_get(root, p)["kernel"], np.float32)
  groups: dict[str, list[str]] = {}
  for p in stats:
    groups.setdefault(stats[p].group, []).append(p)

  new_root = root
  plans: dict[str, LayerPlan] = {}
  for members in groups.values():
    quantized = [p for p in members if settings[p].quantize]
    if not quantized:
      continue
    first = settings[quantized[0]]
    for p in quantized[1:]:
      if (settings[p].alpha, settings[p].act_mode, settings[p].qtype) != (first.alpha, first.act_mode, first.qtype):
        raise ValueError(f"quantize_params: layers {quantized[0]} and {p} read the same input but their "
                         "rules give them different alpha/act_mode/qtype; they must share one smoothing")
    st = stats[quantized[0]]
    x_absmax = np.max(np.stack([np.asarray(stats[p].absmax) for p in quantized]), axis=0)
    group_kernels = [kernel_of(p) for p in quantized]
    alpha, alpha_errors, note = first.alpha, None, ""
    if alpha == "auto":
      alpha, alpha_errors, note = smooth.auto_alpha(st.samples, group_kernels, x_absmax, config.alpha_grid,
                                                    first.qtype, first.act_mode)
    s = None if alpha is None else smooth.smoothing_factors(x_absmax, smooth.weight_row_absmax(group_kernels), alpha)
    del group_kernels
    producer_node = _get(new_root, st.producer) if st.producer else None
    # Exact only if every reader of the producer's output is a quantized layer of this
    # group (a float-kept reader would see X / s).
    fold = (s is not None and st.foldable and len(quantized) == len(members)
            and smooth.can_fold(st.producer_kind, producer_node))
    if fold:
      new_root = _set(new_root, st.producer, smooth.fold_inverse(st.producer_kind, producer_node, s))
    for p in quantized:
      if s is not None:  # rows of W times s (the current kernel: a producer's fold may have hit its columns)
        node = _get(new_root, p)
        k = node["kernel"]
        new_root = _set(new_root, p, {**node, "kernel": (np.asarray(k, np.float32) * s[:, None]).astype(k.dtype)})
      plans[p] = LayerPlan(settings[p], alpha, alpha_errors, s, fold, x_absmax, stats[p], note)
  return rebuild(new_root), plans


def quantize_params(params, stats: dict[str, LayerStats], config: QuantConfig = QuantConfig(), *,
                    return_report: bool = False):
  """Quantize every calibrated Dense layer of `params` per `config`.

  Returns qparams (and a {path: LayerReport} dict with return_report=True). Pure: the
  input tree is not modified. Raises on missing or mismatched stats, non-finite weights,
  and rules that give layers sharing one input different smoothing.
  """
  smoothed, plans = smooth_params(params, stats, config)
  root, rebuild = _split_root(smoothed)
  orig_root, _ = _split_root(params)
  report: dict[str, LayerReport] = {}
  for p, st in stats.items():
    if p not in plans:
      report[p] = LayerReport(p, quantized=False, producer=st.producer, producer_kind=st.producer_kind)
  for p, plan in plans.items():
    node = _get(root, p)
    qt, mode = plan.settings.qtype, plan.settings.act_mode
    act_scale = smooth.static_act_scale(plan.x_absmax, plan.s, qt) if mode == "static" else None
    inv = None if (plan.s is None or plan.folded) else (1.0 / plan.s).astype(np.float32)
    qk = quantize_kernel(node["kernel"], qt, act_scale=act_scale, inv_smooth=inv, name=p)
    root = _set(root, p, {**node, "kernel": qk})
    if return_report:
      report[p] = _layer_report(p, np.asarray(_get(orig_root, p)["kernel"], np.float32), qk, plan)
  qparams = rebuild(root)
  return (qparams, report) if return_report else qparams


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
  lines = [head, "-" * len(head)]
  for p, r in report.items():
    if not r.quantized:
      lines.append(f"{p:40s} {'float (rule)':22s}")
      continue
    a = "-" if r.alpha is None else f"{r.alpha:.2f}"
    lines.append(f"{p:40s} {r.qtype + ' ' + r.act_mode:22s} {a:>5s} {r.smoothing:9s} "
                 f"{r.outlier_ratio_before:6.1f}->{r.outlier_ratio_after:6.1f} {r.weight_error:8.2e} {r.output_error:8.2e}"
                 + (f"  note: {r.note}" if r.note else ""))
  return "\n".join(lines)
