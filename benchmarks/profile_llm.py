"""Where an LLM decode step's time goes, by op class, from XLA's own profiler.

  python benchmarks/profile_llm.py                       # SmolLM2, batch 1, f32 and W8A8
  python benchmarks/profile_llm.py --batch 8 --ops 25    # + the 25 costliest ops
  python benchmarks/profile_llm.py --prefill 512         # one 512-token prompt's prefill instead

Runs --steps greedy steps through the KV cache (one jitted loop, after a --prompt-token
prompt) under `jax.profiler`, reads each thunk's time and classifies the top-level ops of
the compiled HLO (benchmarks/profile_minilm's trace reading) by what they compute: the
native custom calls by target, int8 dots, f32 dots, the copies a scan makes of a layer's
weight slice (dynamic-slice fusions that produce a weight), the cache writes, RMSNorm
(rsqrt), RoPE (sin/cos), the rest. The decode loop and scan containers (while ops) are
left out: their bodies' ops are counted. Milliseconds per step (the profiler adds some).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import actquant_jax as aq  # noqa: E402
from actquant_jax.models import llama as L  # noqa: E402
from benchmarks.profile_minilm import by_class, print_classes, profile  # noqa: E402
from examples.llm.run import DATA, load_model, windows  # noqa: E402

CLASSES = ["int8 GEMM (native)", "int8 GEMM (XLA)", "f32 GEMM (XLA)", "weight slice copies (scan)",
           "attention over the cache (native)", "attention (XLA)", "KV cache write", "quantize to 8 bits",
           "online Hadamard (rotation)", "GEMM epilogue, SiLU, residual", "RMSNorm", "RoPE", "sampling (argmax)",
           "other"]


def classify(shape: str, opcode: str, line: str, ops) -> str:
  target = re.search(r'custom_call_target="([^"]*)"', line)
  target = target.group(1) if target else ""
  meta = re.search(r'op_name="([^"]*)"', line)
  meta = meta.group(1) if meta else ""
  if "s8_gemm" in target:
    return "int8 GEMM (native)"
  if "decode_attention" in target:
    return "attention over the cache (native)"
  if "quantize_rows" in target or "marked_rows" in target or shape.startswith(("s8[", "f8e4m3fn[")) and (
      "dynamic_slice" not in meta):
    return "quantize to 8 bits"
  if "dynamic_slice" in meta and ops["dynamic-slice"] and not ops["dot"]:
    return "weight slice copies (scan)"
  if "hadamard" in meta or "rotat" in meta:
    return "online Hadamard (rotation)"
  if ops["dot"] or opcode == "dot" or "ynn" in line:
    if shape.startswith("s32["):
      return "int8 GEMM (XLA)"
    if ops["exponential"] or "attention" in meta or "attend" in meta:
      return "attention (XLA)"
    return "f32 GEMM (XLA)"
  if "scatter" in meta or "dynamic_update_slice" in meta or ops["scatter"]:
    return "KV cache write"
  if "argmax" in meta or "sample" in meta:
    return "sampling (argmax)"
  if ops["rsqrt"]:
    return "RMSNorm"
  if ops["sine"] or ops["cosine"]:
    return "RoPE"
  if ops["exponential"]:
    return "attention (XLA)" if "silu" not in meta and "logistic" not in meta else "GEMM epilogue, SiLU, residual"
  if ops["multiply"] or ops["add"] or ops["convert"] or ops["logistic"]:
    return "GEMM epilogue, SiLU, residual"
  return "other"


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="smollm2")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--prompt", type=int, default=128)
  ap.add_argument("--steps", type=int, default=16)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--ops", type=int, default=0, help="also list the N costliest ops of each variant")
  ap.add_argument("--prefill", type=int, default=0, help="profile the prefill of one prompt of this many "
                  "tokens (batch 1) instead of the decode steps")
  args = ap.parse_args()
  lm = load_model(args.model)
  calib = windows(lm, (DATA / "calibration.txt").read_text(), 8)
  stats = aq.calibrate(lm.model, lm.params, [jnp.asarray(calib[i:i + 4, :-1]) for i in range(0, 8, 4)],
                       progress=False)
  model, q_apply = lm.model, aq.quantized_apply(lm.model)
  variants = {"f32": (model.apply, lm.params),
              "W8A8 dynamic": (q_apply, aq.quantize_params(lm.params, stats, aq.QuantConfig(alpha=0.5, rotate=False))),
              "W8A8 dynamic, rotated": (q_apply, aq.quantize_params(lm.params, stats,
                                                                    aq.QuantConfig(alpha=0.5, rotate=True)))}
  ids = jnp.asarray(np.random.default_rng(0).integers(100, lm.cfg.vocab_size, (args.batch, args.prompt)), jnp.int32)
  table = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, (apply, params) in variants.items():
      if args.prefill:
        prompt = jnp.asarray(np.random.default_rng(0).integers(100, lm.cfg.vocab_size, (1, args.prefill)), jnp.int32)
        fn = jax.jit(lambda p, c, x, apply=apply: L.prefill(apply, p, c, x)[0])
        fargs, per = (params, L.init_cache(model, 1, args.prefill), prompt), 1
      else:
        cache = L.init_cache(model, args.batch, args.prompt + args.steps)
        first, cache = L.prefill(apply, params, cache, ids)
        fn = jax.jit(lambda p, c, lg, apply=apply: L.decode_loop(apply, p, c, lg, jax.random.key(0), args.steps))
        fargs, per = (params, cache, first), args.steps
      ms, hlo = profile(fn, fargs, args.reps, Path(tmp) / name.replace(" ", "_"))
      # (the loops' containers, while ops, are left out: their bodies' ops are counted)
      table[name] = by_class(ms, hlo, classify, args.ops, name, scale=1 / per, skip=("while",))
  what = (f"prefill of a {args.prefill}-token prompt: ms" if args.prefill else
          f"decode step, batch {args.batch}, {args.prompt}-token prompt: ms per step")
  print(f"\n{args.model} {what} by op class (jax.profiler, {args.reps} x "
        f"{1 if args.prefill else args.steps} {'prefills' if args.prefill else 'steps'}; jax {jax.__version__})")
  print_classes(table, CLASSES)


if __name__ == "__main__":
  main()
