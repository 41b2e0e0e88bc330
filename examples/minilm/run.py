"""The main job: all-MiniLM-L6-v2 (real pretrained weights) quantized in every mode, with
its accuracy, weight bytes and CPU speed against FP32, measured in one run.

  python examples/minilm/run.py                 # what `make demo` runs
  python examples/minilm/run.py --eval 100 --calib 64 --no-speed   # a quick look

Prints one table; writes results/minilm_w8a8.json (a record per mode),
results/minilm_outliers.png (per-channel input absmax of one FFN layer before/after
smoothing), and the table with this run's command, date and machine into
docs/results/minilm.md and README's headline block (benchmarks/results_md.py). Columns:
  mean / worst cos   cosine similarity of each sentence embedding to its FP32 embedding
  top-1 agree        for each evaluation sentence, is its nearest other sentence (cosine)
                     the same as with FP32 embeddings?
  weight bytes       all Dense layers (kernels, scales, vectors, biases) vs FP32
  speed vs FP32      jitted forward of a batch of 64 sentences x 128 tokens on this CPU:
                     median time of FP32 / median time of the mode, the two timed
                     round-robin (7 rounds) right after each other in this process
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import actquant_jax as aq  # noqa: E402
from actquant_jax.models.bert import load_minilm  # noqa: E402
from benchmarks import results_md  # noqa: E402
from benchmarks.timing import format_table, interleaved_medians  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
FFN_LAYER = "bert/layer_3/intermediate"  # the FFN input (attention LayerNorm output) is plotted

MODES: list[tuple[str, aq.QuantConfig | None]] = [
    ("FP32", None),
    ("W8A8 dynamic per-token, no smoothing", aq.QuantConfig(act_mode="dynamic", alpha=None, rotate=False)),
    ("W8A8 dynamic per-token, SmoothQuant 0.5", aq.QuantConfig(act_mode="dynamic", alpha=0.5, rotate=False)),
    ("W8A8 dynamic per-token, auto alpha", aq.QuantConfig(act_mode="dynamic", alpha="auto", rotate=False)),
    ("W8A8 static per-tensor, no smoothing", aq.QuantConfig(act_mode="static", alpha=None, rotate=False)),
    ("W8A8 static per-tensor, SmoothQuant 0.5", aq.QuantConfig(act_mode="static", alpha=0.5, rotate=False)),
    ("W8A8 static per-tensor, auto alpha", aq.QuantConfig(act_mode="static", alpha="auto", rotate=False)),
    ("FP8 e4m3 W8A8 dynamic per-token", aq.QuantConfig(qtype="float8_e4m3fn", act_mode="dynamic", alpha=None, rotate=False)),
]


def read_sentences(name: str, n: int | None = None) -> list[str]:
  lines = (DATA / name).read_text().splitlines()
  return lines[:n] if n else lines


def batched(mm, sentences, batch_size=32, max_len=128):
  return [mm.tokenize(sentences[i:i + batch_size], max_len) for i in range(0, len(sentences), batch_size)]


def embed(apply, params, batches) -> np.ndarray:
  return np.concatenate([np.asarray(apply(params, **b)) for b in batches])


def compare(ref: np.ndarray, emb: np.ndarray) -> dict:
  """Cosine to FP32 per sentence, and top-1 nearest-neighbour agreement with FP32."""
  emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  cos = np.sum(ref * emb, axis=1)
  def top1(e):
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return np.argmax(sim, axis=1)
  return dict(mean_cos=float(cos.mean()), worst_cos=float(cos.min()),
              top1_agreement=float(np.mean(top1(ref) == top1(emb))))


def dense_bytes(params) -> int:
  is_qk = lambda x: isinstance(x, aq.QuantizedKernel)
  total = 0
  def walk(node):
    nonlocal total
    for k, v in node.items():
      if isinstance(v, dict):
        if "kernel" in v and (is_qk(v["kernel"]) or getattr(v["kernel"], "ndim", 0) == 2):
          total += sum(x.nbytes for x in jax.tree_util.tree_leaves(v))
        else:
          walk(v)
  walk(params["params"])
  return total


def speed_ratio(float_apply, params, apply, qparams, batch, rounds=7) -> float:
  """FP32 time / mode time, timed round-robin so the machine's drift hits both alike."""
  args = (batch["input_ids"], batch["attention_mask"])
  t = interleaved_medians({"fp32": float_apply, "mode": apply}, {"fp32": (params, *args), "mode": (qparams, *args)},
                          rounds=rounds)
  return t["fp32"] / t["mode"]


def run(n_calib=None, n_eval=None, speed=True, out_json=None, out_png=None, log=print, modes=MODES):
  t0 = time.perf_counter()
  mm = load_minilm()
  calib, evals = read_sentences("calibration.txt", n_calib), read_sentences("evaluation.txt", n_eval)
  log(f"loaded MiniLM ({mm.cfg.num_layers} layers, hidden {mm.cfg.hidden_size}); "
      f"{len(calib)} calibration / {len(evals)} evaluation sentences")
  stats = aq.calibrate(mm.model, mm.params, batched(mm, calib), progress=False)
  log(f"calibrated {len(stats)} Dense layers in {time.perf_counter() - t0:.1f}s")
  float_apply = jax.jit(mm.model.apply)
  q_apply = jax.jit(aq.quantized_apply(mm.model))
  eval_batches = batched(mm, evals)
  ref = embed(float_apply, mm.params, eval_batches)
  speed_batch = mm.tokenize((evals * 2)[:64], max_len=128, pad_to=128)
  fp32_bytes = dense_bytes(mm.params)
  records = []
  for name, cfg in modes:
    t = time.perf_counter()
    if cfg is None:
      params, apply, report = mm.params, float_apply, None
    else:
      params, report = aq.quantize_params_with_report(mm.params, stats, cfg)
      apply = q_apply
    rec = dict(mode=name, **compare(ref, embed(apply, params, eval_batches)),
               weight_bytes=dense_bytes(params), weight_bytes_ratio=dense_bytes(params) / fp32_bytes)
    if speed:
      rec["speed_vs_fp32"] = speed_ratio(float_apply, mm.params, apply, params, speed_batch)
    if report is not None:
      rec["alphas"] = sorted({str(r.alpha) for r in report.values()})
    records.append(rec)
    log(f"  {name}: 1 - mean cos {1 - rec['mean_cos']:.2e} ({time.perf_counter() - t:.1f}s)")
  if out_json:
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps(dict(model="sentence-transformers/all-MiniLM-L6-v2",
                                              device=jax.devices()[0].device_kind, records=records), indent=2))
  if out_png:
    plot_outliers(mm, stats, out_png)
  return records, stats


def plot_outliers(mm, stats, out_png, alpha=0.5):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  _, plans = aq.smooth_params(mm.params, stats, aq.QuantConfig(alpha=alpha, rotate=False))
  before = np.asarray(stats[FFN_LAYER].absmax)
  after = before / plans[FFN_LAYER].s
  fig, axes = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
  for ax, v, title in ((axes[0], before, "before smoothing"), (axes[1], after, f"after SmoothQuant (alpha={alpha})")):
    ax.bar(np.arange(v.size), v, width=1.0, color="tab:red" if ax is axes[0] else "tab:blue")
    ax.set_ylabel("max |x_j|")
    ax.set_title(f"{FFN_LAYER} input, per channel, {title}: max/median = {v.max() / np.median(v):.1f}")
  axes[1].set_xlabel("input channel j")
  fig.tight_layout()
  Path(out_png).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out_png, dpi=90)
  plt.close(fig)


def table_md(records) -> str:
  """The job's table, as printed and as written to docs/results/minilm.md and README."""
  cols = ["mode", "1 - mean cos", "worst cos", "top-1 agree", "weight bytes", "speed vs FP32"]
  rows = [[r["mode"], f"{1 - r['mean_cos']:.2e}", f"{r['worst_cos']:.5f}", f"{r['top1_agreement']:.1%}",
           f"{r['weight_bytes_ratio']:.3f}x", f"{r['speed_vs_fp32']:.2f}x" if "speed_vs_fp32" in r else "-"]
          for r in records]
  return format_table(cols, rows, left_first=True)


TITLE = "all-MiniLM-L6-v2 in every mode (`make demo`)"


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--calib", type=int, default=None, help="calibration sentences (default: all 320)")
  ap.add_argument("--eval", type=int, default=None, help="evaluation sentences (default: all 600)")
  ap.add_argument("--no-speed", action="store_true", help="skip the throughput column")
  ap.add_argument("--json", default=str(ROOT / "results" / "minilm_w8a8.json"))
  ap.add_argument("--png", default=str(ROOT / "results" / "minilm_outliers.png"))
  args = ap.parse_args()
  log = lambda s: print(s, file=sys.stderr, flush=True)
  records, _ = run(args.calib, args.eval, not args.no_speed, args.json, args.png, log=log)
  versions = f"jax {jax.__version__} on {jax.devices()[0].device_kind}"
  table = table_md(records)
  print(f"all-MiniLM-L6-v2, {versions}")
  print(table)
  print(f"wrote {args.json} and {args.png}")
  results_md.publish("minilm", table, title=TITLE, info=results_md.provenance(extra=[versions]), readme=True)


if __name__ == "__main__":
  main()
