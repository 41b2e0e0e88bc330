"""MiniLM forward speed of W8A8 (dynamic and static, no smoothing) vs FP32, alone: the
speed column of `make demo` without its accuracy sweep, for A/B runs across commits.

  python benchmarks/minilm_speed.py [label]

Calibrates on 64 sentences, then times a jitted forward of 64 sentences x 128 tokens,
FP32 and the mode round-robin in one process (5 rounds), and prints FP32 time / mode time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import actquant_jax as aq  # noqa: E402
from examples.minilm.run import batched, load_minilm, read_sentences, speed_ratio  # noqa: E402


def main():
  label = sys.argv[1] if len(sys.argv) > 1 else ""
  mm = load_minilm()
  stats = aq.calibrate(mm.model, mm.params, batched(mm, read_sentences("calibration.txt", 64)), progress=False)
  batch = mm.tokenize((read_sentences("evaluation.txt", 64) * 2)[:64], max_len=128, pad_to=128)
  float_apply, q_apply = jax.jit(mm.model.apply), jax.jit(aq.quantized_apply(mm.model))
  for name, cfg in [("dynamic, no smoothing", aq.QuantConfig(alpha=None, rotate=False)),
                    ("static, no smoothing", aq.QuantConfig(alpha=None, act_mode="static", rotate=False))]:
    qparams = aq.quantize_params(mm.params, stats, cfg)
    print(f"{label} W8A8 {name}: {speed_ratio(float_apply, mm.params, q_apply, qparams, batch, rounds=5):.2f}x FP32",
          flush=True)


if __name__ == "__main__":
  main()
