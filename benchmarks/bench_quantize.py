"""quantize_params at LLM size: wall time and peak memory, fixed alpha against alpha="auto".

  python benchmarks/bench_quantize.py              # ~270M random-init Llama (the README numbers)
  python benchmarks/bench_quantize.py --size 1b    # Llama-3.2-1B shapes, 1.04B (3.9 GiB f32;
                                                   # its one-off preparation peaks near 10 GB)
  python benchmarks/bench_quantize.py --variants 0.5 auto --act-mode static

A random-init Llama (270m: hidden 1024, 16 heads, SwiGLU 4096, 14 layers, tied
embeddings, vocab 32000: 268M params; 1b: hidden 2048, 32 heads on 8 KV heads, SwiGLU
8192, 16 layers) is built and calibrated once on `--calib` random (1, 128) batches (512
tokens: the 512 sample rows alpha="auto" searches on), in a child process; params (one
.npy per leaf) and stats are cached under --cache. Each variant then runs in a fresh
child process that loads them and calls quantize_params twice:

  cold s:  the first call (compiles included: what a one-shot quantization costs)
  warm s:  the second call (the first call's output deleted first)
  peak / f32:  the process's peak RSS during the first call (VmHWM, reset through
           /proc/self/clear_refs once params and stats are loaded: transient peaks of the
           loading do not count, what stays resident -- params, stats, the jax runtime --
           does) over the f32 param bytes
  extra / f32: (that peak - the RSS just before the call) over the f32 param bytes: what
           quantize_params adds on top of what the caller holds (the int8 copy it
           returns is ~0.25x)
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {
    "270m": dict(hidden=1024, layers=14, heads=16, kv_heads=16, ffn=4096, vocab=32000),
    "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192, vocab=32000),
}


def _status_kib(field: str) -> int:
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1])
  raise KeyError(field)


def _reset_peak():
  Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS (Linux >= 4.0)


def _llama_config(size: str, layers: int | None):
  from actquant_jax.models import llama as L
  d = dict(SIZES[size])
  if layers:
    d["layers"] = layers
  return L.LlamaConfig(vocab_size=d["vocab"], hidden_size=d["hidden"], num_layers=d["layers"], num_heads=d["heads"],
                       num_kv_heads=d["kv_heads"], head_dim=d["hidden"] // d["heads"], intermediate_size=d["ffn"],
                       rope_theta=500000.0, max_position=8192, tie_word_embeddings=True)


def prepare(cache: Path, size: str, layers: int | None, calib: int):
  """Child: random-init params and calibration stats, written to `cache`."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  import actquant_jax as aq
  from actquant_jax.models import llama as L
  cfg = _llama_config(size, layers)
  model = L.LlamaForCausalLM(cfg)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  batches = [jnp.asarray(np.random.default_rng(i).integers(0, cfg.vocab_size, (1, 128)), jnp.int32)
             for i in range(calib)]
  stats = aq.calibrate(model, params, batches, progress=False)
  (cache / "params").mkdir(parents=True, exist_ok=True)
  names = []
  for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0]):
    np.save(cache / "params" / f"{i}.npy", np.asarray(leaf))
    names.append(jax.tree_util.keystr(path))
  treedef = jax.tree_util.tree_structure(params)
  with open(cache / "meta.pkl", "wb") as f:
    pickle.dump(dict(treedef=treedef, names=names, num_params=cfg.num_params,
                     stats=jax.tree.map(np.asarray, stats)), f)


def measure(cache: Path, alpha, act_mode: str, report: bool):
  """Child: load params and stats, quantize twice; print one JSON line."""
  import gc

  import jax
  import jax.numpy as jnp
  import numpy as np

  import actquant_jax as aq
  rss0 = _status_kib("VmRSS")
  with open(cache / "meta.pkl", "rb") as f:
    meta = pickle.load(f)
  leaves = []
  for i in range(len(meta["names"])):
    a = np.load(cache / "params" / f"{i}.npy")
    leaves.append(jnp.asarray(a))
    del a
  params = jax.tree_util.tree_unflatten(meta["treedef"], jax.block_until_ready(leaves))
  del leaves
  stats = jax.tree.map(jnp.asarray, meta.pop("stats"))
  f32_bytes = sum(x.size * 4 for x in jax.tree.leaves(params))
  cfg = aq.QuantConfig(alpha=alpha, act_mode=act_mode, rotate=False)
  quantize = aq.quantize_params_with_report if report else aq.quantize_params
  gc.collect()
  rss_before = _status_kib("VmRSS")
  _reset_peak()
  t = time.perf_counter()
  out = jax.block_until_ready(quantize(params, stats, cfg))
  cold = time.perf_counter() - t
  peak = _status_kib("VmHWM")
  q = out[0] if report else out
  is_qk = lambda x: isinstance(x, aq.QuantizedKernel)
  n_q = sum(is_qk(x) for x in jax.tree.leaves(q, is_leaf=is_qk))
  alphas = sorted({str(r.alpha) for r in out[1].values()}) if report else None
  q_bytes = sum(x.nbytes for x in jax.tree.leaves(q))
  del out, q
  gc.collect()
  t = time.perf_counter()
  jax.block_until_ready(quantize(params, stats, cfg))
  warm = time.perf_counter() - t
  kib = 1024
  print(json.dumps(dict(alpha=str(alpha), act_mode=act_mode, report=report, params=meta["num_params"],
                        f32_gib=f32_bytes / 2**30, quantized=n_q, qparams_gib=q_bytes / 2**30, cold_s=cold,
                        warm_s=warm, peak_gib=peak * kib / 2**30, baseline_gib=rss_before * kib / 2**30,
                        runtime_gib=rss0 * kib / 2**30, peak_x=peak * kib / f32_bytes,
                        extra_x=(peak - rss_before) * kib / f32_bytes, alphas=alphas)))


def _child(args: list[str]) -> dict:
  r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
  if r.returncode != 0:
    raise SystemExit(f"child {args} failed ({r.returncode}):\n{r.stderr[-4000:]}")
  return json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else {}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", choices=sorted(SIZES), default="270m")
  ap.add_argument("--layers", type=int, default=None, help="override the size's layer count")
  ap.add_argument("--calib", type=int, default=4, help="random (1, 128) calibration batches")
  ap.add_argument("--variants", nargs="+", default=["0.5", "auto"], help="alpha values: a float, auto or none")
  ap.add_argument("--act-mode", default="dynamic", choices=("dynamic", "static"))
  ap.add_argument("--report", action="store_true", help="quantize_params_with_report: the report as well")
  ap.add_argument("--cache", default="/tmp/actquant_bench_quantize")
  ap.add_argument("--json", default=str(ROOT / "results" / "bench_quantize.json"))
  ap.add_argument("--_prepare", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  cache = Path(args.cache) / f"{args.size}-{args.layers or SIZES[args.size]['layers']}L-{args.calib}b"
  if args._prepare:
    return prepare(cache, args.size, args.layers, args.calib)
  if args._measure is not None:
    m = args._measure.lower()
    return measure(cache, "auto" if m == "auto" else None if m == "none" else float(m), args.act_mode, args.report)

  common = ["--size", args.size, "--calib", str(args.calib), "--cache", args.cache, "--act-mode", args.act_mode]
  common += ["--layers", str(args.layers)] if args.layers else []
  common += ["--report"] if args.report else []
  if not (cache / "meta.pkl").exists():
    t = time.perf_counter()
    _child(common + ["--_prepare"])
    print(f"prepared {cache} ({time.perf_counter() - t:.0f}s)", file=sys.stderr)
  rows, results = [], []
  for v in args.variants:
    r = _child(common + ["--_measure", v])
    results.append(r)
    print(json.dumps(r), file=sys.stderr, flush=True)
    rows.append([f"alpha={v} {args.act_mode}", f"{r['cold_s']:.1f}", f"{r['warm_s']:.1f}",
                 f"{r['peak_gib']:.2f}", f"{r['peak_x']:.2f}x", f"{r['extra_x']:.2f}x"])
  from benchmarks.timing import print_table
  r0 = results[0]
  print(f"quantize_params on a random-init Llama, {r0['params'] / 1e6:.0f}M params ({r0['f32_gib']:.2f} GiB f32, "
        f"{r0['quantized']} weight matmuls); resident before the call {r0['baseline_gib']:.2f} GiB")
  print_table(["variant", "cold s", "warm s", "peak RSS GiB", "peak / f32", "extra / f32"], rows, left_first=True)
  Path(args.json).parent.mkdir(parents=True, exist_ok=True)
  Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
