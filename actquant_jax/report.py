"""Quantization reports: what quantize_params did to each layer (LayerReport) and the
one-line accounts of a calibration (stats_summary) and of a quantization (report_summary),
worded alike, and format_report's table."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class LayerReport:
  """What quantize_params did to one layer (every layer the calibration saw has one)."""

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


def _stacked_note(layers) -> str:
  """" (2 of them stacked weights x 3 scanned layers)" for the stack sizes (LayerStats.layers,
  0: not stacked) of some weight matmuls, or "" -- the wording of report_summary's and
  stats_summary's lines."""
  stacks: dict[int, int] = {}
  for n in layers:
    if n:
      stacks[n] = stacks.get(n, 0) + 1
  text = ", ".join(f"{c} of them stacked weights x {n} scanned layers" for n, c in stacks.items())
  return f" ({text})" if text else ""


def _float_note(floats) -> str:
  """"; float (why): a, b; float (why 2): c" for (layer, reason) pairs, grouped by reason
  in first-seen order, or "" -- the wording of report_summary's and stats_summary's lines."""
  reasons: dict[str, list] = {}
  for path, why in floats:
    reasons.setdefault(why, []).append(path)
  return "".join(f"; float ({why}): {', '.join(paths)}" for why, paths in reasons.items())


def stats_summary(stats: dict) -> str:
  """One line about a calibration: "calibrated 15 weight matmuls: 14 quantizable (10 with a
  foldable producer), 1 float; float (weight has batch axes ...): per_head". Float here
  means a layout that cannot run quantized; rules (LayerRule skip) are applied later by
  quantize_params, whose report_summary line names those."""
  floats = [(p, s.reason) for p, s in stats.items() if s.reason]
  foldable = sum(1 for s in stats.values() if not s.reason and s.foldable)
  return (f"calibrated {len(stats)} weight matmuls{_stacked_note(s.layers for s in stats.values())}: "
          f"{len(stats) - len(floats)} quantizable ({foldable} with a foldable producer), {len(floats)} float"
          + _float_note(floats))


def report_summary(report: dict[str, LayerReport]) -> str:
  """One line: "quantized 15 of 15 weight matmuls; 11 smoothing vectors folded, 4 at run time"."""
  q = [r for r in report.values() if r.quantized]
  folded = {r.path for r in q if r.smoothing == "folded"}
  runtime = {r.path for r in q if r.smoothing == "runtime"}
  line = (f"quantized {len(q)} of {len(report)} weight matmuls{_stacked_note(r.layers for r in q)}; "
          f"{len(folded)} smoothing vectors folded, {len(runtime)} at run time")
  return line + _float_note((r.path, r.reason or "rule") for r in report.values() if not r.quantized)


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
                 f"{r.outlier_ratio_before:6.1f}->{r.outlier_ratio_after:6.1f} "
                 f"{r.weight_error:8.2e} {r.output_error:8.2e}"
                 + (f"  note: {r.note}" if r.note else ""))
  return "\n".join(lines)
