"""Speed at a realistic size: a random-init Llama (Llama-3.2-1B shapes by default: hidden
2048, 16 layers, 32 heads on 8 KV heads, SwiGLU 8192, tied embeddings; vocab 32000) in
W8A8 (dynamic and static) against f32 and bf16, in one process.

  python benchmarks/bench_llm.py --layers 8 --prefill 512   # the README numbers (make bench-llm)
  python benchmarks/bench_llm.py                       # 1.04B, prefill 2048 (needs ~16 GB free)
  python benchmarks/bench_llm.py --layers 4 --prefill 256 --batches 1 8   # quick

decode: tokens/s of `--steps` greedy steps through the KV cache (one jitted scan) after a
128-token prompt, at each batch size; prefill: tokens/s of one `--prefill`-token prompt at
batch 1. Variants are timed round-robin (benchmarks/timing.interleaved_medians), so the
ratios compare like with like on a shared machine. Peak memory: the process's peak RSS
after each phase, and the bytes of each variant's params.

Every weight matmul runs in int8, the tied output head (`embed_tokens.attend`) included:
quantize_params on the whole tree, which adds only the int8 copy to memory.
"""

from __future__ import annotations

import argparse
import json
import resource
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
from benchmarks.timing import interleaved_medians, print_table  # noqa: E402


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def nbytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def add_size_args(ap, layers: int = 16):
  """The model-size options: Llama-3.2-1B shapes, `layers` decoder layers by default."""
  ap.add_argument("--hidden", type=int, default=2048)
  ap.add_argument("--layers", type=int, default=layers)
  ap.add_argument("--heads", type=int, default=32)
  ap.add_argument("--kv-heads", type=int, default=8)
  ap.add_argument("--ffn", type=int, default=8192)
  ap.add_argument("--vocab", type=int, default=32000)


def llama_config(args) -> L.LlamaConfig:
  return L.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                       num_kv_heads=args.kv_heads, head_dim=args.hidden // args.heads, intermediate_size=args.ffn,
                       rope_theta=500000.0, max_position=8192, tie_word_embeddings=True)


def calib_batches(cfg: L.LlamaConfig, n: int = 2, length: int = 128):
  return [jnp.asarray(np.random.default_rng(i).integers(0, cfg.vocab_size, (1, length)), jnp.int32) for i in range(n)]


def build_variants(cfg: L.LlamaConfig, log, t0: float, bf16: bool = True) -> dict:
  """Random-init params, calibrated on calib_batches, and the variants to time: name ->
  (apply, params, module): f32, bf16 (if `bf16`), W8A8 dynamic and static (alpha 0.5)."""
  model = L.LlamaForCausalLM(cfg)
  bf16_model = L.LlamaForCausalLM(cfg, param_dtype=jnp.bfloat16)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  log(f"random-init Llama: {cfg.num_params / 1e9:.2f}B params, f32 {nbytes(params) / 2**30:.2f} GiB "
      f"({time.perf_counter() - t0:.0f}s, peak RSS {peak_rss_gb():.1f} GiB)")
  stats = aq.calibrate(model, params, calib_batches(cfg), progress=False)
  log(f"calibrated {len(stats)} layers ({time.perf_counter() - t0:.0f}s, peak RSS {peak_rss_gb():.1f} GiB)")
  variants = {"f32": (model.apply, params, model)}
  if bf16:
    variants["bf16"] = (bf16_model.apply, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), bf16_model)
  q_apply = aq.quantized_apply(model)
  for mode in ("dynamic", "static"):
    qp, report = aq.quantize_params_with_report(params, stats, aq.QuantConfig(act_mode=mode, alpha=0.5, rotate=False))
    variants[f"W8A8 {mode}"] = (q_apply, qp, model)
    log(f"quantized W8A8 {mode}: {len(report)} weights, the tied output head included "
        f"({time.perf_counter() - t0:.0f}s, peak RSS {peak_rss_gb():.1f} GiB)")
  return variants


def decode_fns(variants: dict, ids, steps: int):
  """Each variant's prompt `ids` (B, T) prefilled into a fresh cache, and a call running
  `steps` greedy steps from there (one jitted scan) -> (tokens (B, steps), cache): the
  (fns, args) for interleaved_medians, and the prefill's last logits {name: (B, vocab)}."""
  fns, fargs, first = {}, {}, {}
  for n, (apply, p, m) in variants.items():
    cache = L.init_cache(m, ids.shape[0], ids.shape[1] + steps)
    first[n], cache = L.prefill(apply, p, cache, ids)
    fns[n] = lambda p, c, lg, apply=apply: L.decode_loop(apply, p, c, lg, jax.random.key(0), steps)
    fargs[n] = (p, cache, first[n])
  return fns, fargs, first


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_size_args(ap)
  ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
  ap.add_argument("--steps", type=int, default=8, help="decode steps timed per call")
  ap.add_argument("--prefill", type=int, default=2048, help="prefill prompt length (batch 1)")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--json", default=str(ROOT / "results" / "bench_llm.json"))
  args = ap.parse_args()
  log = lambda s: print(s, file=sys.stderr, flush=True)
  t0 = time.perf_counter()

  cfg = llama_config(args)
  variants = build_variants(cfg, log, t0)
  result = dict(config=cfg.to_hf(), params=cfg.num_params, device=jax.devices()[0].device_kind,
                param_bytes={n: nbytes(v[1]) for n, v in variants.items()}, decode={}, prefill={})

  prompt = 128
  for b in args.batches:
    ids = jnp.asarray(np.random.default_rng(b).integers(0, cfg.vocab_size, (b, prompt)), jnp.int32)
    fns, fargs, _ = decode_fns(variants, ids, args.steps)
    t = interleaved_medians(fns, fargs, rounds=args.rounds)
    result["decode"][b] = {n: b * args.steps / s for n, s in t.items()}
    del fargs
    log(f"decode batch {b}: " + ", ".join(f"{n} {v:.1f} tok/s" for n, v in result["decode"][b].items())
        + f" ({time.perf_counter() - t0:.0f}s, peak RSS {peak_rss_gb():.1f} GiB)")

  ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.prefill)), jnp.int32)
  fns, fargs = {}, {}
  for n, (apply, p, m) in variants.items():
    fns[n] = lambda p, c, x, apply=apply: L.prefill(apply, p, c, x)
    fargs[n] = (p, L.init_cache(m, 1, args.prefill), ids)
  t = interleaved_medians(fns, fargs, rounds=args.rounds)
  result["prefill"] = {n: args.prefill / s for n, s in t.items()}
  result["peak_rss_gib"] = peak_rss_gb()
  log(f"prefill {args.prefill}: " + ", ".join(f"{n} {v:.0f} tok/s" for n, v in result["prefill"].items())
      + f" ({time.perf_counter() - t0:.0f}s, peak RSS {peak_rss_gb():.1f} GiB)")

  names = list(variants)
  print(f"random-init Llama {cfg.num_params / 1e9:.2f}B (hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
        f"{cfg.num_heads} heads / {cfg.num_kv_heads} kv, ffn {cfg.intermediate_size}, vocab {cfg.vocab_size}), "
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; peak RSS {result['peak_rss_gib']:.1f} GiB")
  rows = [[n, f"{result['param_bytes'][n] / 2**30:.2f}"]
          + [f"{result['decode'][b][n]:.1f} ({result['decode'][b][n] / result['decode'][b]['f32']:.2f}x f32, "
             f"{result['decode'][b][n] / result['decode'][b]['bf16']:.2f}x bf16)" for b in args.batches]
          + [f"{result['prefill'][n]:.0f} ({result['prefill'][n] / result['prefill']['f32']:.2f}x f32, "
             f"{result['prefill'][n] / result['prefill']['bf16']:.2f}x bf16)"]
          for n in names]
  print_table(["variant", "params GiB"] + [f"decode tok/s, batch {b}" for b in args.batches]
              + [f"prefill {args.prefill} tok/s"], rows)
  Path(args.json).parent.mkdir(parents=True, exist_ok=True)
  Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
