"""KV-cache greedy decode of a random-init Llama on the CPU: actquant-jax (f32, W8A8
dynamic and static) against what CPU users run today, PyTorch `transformers` in fp32 and
`torch.ao.quantization.quantize_dynamic` (qint8 Linear, the default per-tensor qconfig),
every system with the same weights, in one process.

  pip install torch==2.13.0    # the CPU build; transformers: pip install -e '.[hf]'
  python benchmarks/bench_llm_peers.py --layers 8   # the README numbers (Llama-3.2-1B shapes, 8 layers)
  python benchmarks/bench_llm_peers.py --layers 8 --batches 1 8 --threads 2

The model is bench_llm.py's (llama_config, build_variants: random init, W8A8 SmoothQuant
0.5 calibrated on two random 128-token batches, every weight matmul int8, the tied head too); the HF
`LlamaForCausalLM` gets the same weights (models.llama.params_to_hf, LlamaConfig.to_hf).
Every system prefills the same `--prompt` random token ids once (untimed), then a timed
call runs `--steps` greedy steps from that cache: ours one jitted scan (bench_llm's
decode_fns), torch a Python loop of forwards through its DynamicCache (cropped back to
the prompt at the start of each call) under torch.inference_mode, torch limited to
--threads threads (XLA's CPU client uses every core). Systems are timed round-robin
(benchmarks/timing.interleaved_medians, medians of --rounds rounds, a 0.1 s pause before
each call so the previous system's spinning worker threads have stopped); tokens/s is over the
batch. Accuracy: the share of greedy tokens identical to ours f32's (once a sequence
differs, it continues from a different prefix), and the max abs difference of the
prefill's last logits to ours f32's (torch fp32: the two implementations agree).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from actquant_jax.models import llama as L  # noqa: E402
from benchmarks.bench_llm import add_size_args, build_variants, decode_fns, llama_config  # noqa: E402
from benchmarks.bench_peers import PAUSE_S  # noqa: E402
from benchmarks.timing import interleaved_medians, print_table  # noqa: E402


def torch_llama(cfg: L.LlamaConfig, params):
  """HF transformers' PyTorch LlamaForCausalLM (fp32, eval) holding `params`."""
  import torch
  import transformers
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf())).eval()
  sd = {k: torch.from_numpy(v) for k, v in L.params_to_hf(params, cfg).items()}
  if cfg.tie_word_embeddings:
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
  model.load_state_dict(sd, strict=True)
  return model


def torch_decoder(model, ids: np.ndarray, steps: int):
  """Prefill ids (B, T) into a DynamicCache -> (the last logits (B, vocab), a call that
  runs `steps` greedy steps from the prefilled cache -> tokens (B, steps))."""
  import torch
  from transformers import DynamicCache
  x, cache = torch.from_numpy(ids.astype(np.int64)), DynamicCache()
  with torch.inference_mode():
    first = model(input_ids=x, past_key_values=cache, use_cache=True).logits[:, -1]

  def run():
    with torch.inference_mode():
      cache.crop(ids.shape[1])
      logits, toks = first, []
      for _ in range(steps):
        toks.append(logits.argmax(-1, keepdim=True))
        logits = model(input_ids=toks[-1], past_key_values=cache, use_cache=True).logits[:, -1]
      return torch.cat(toks, 1).numpy()

  return first.numpy(), run


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_size_args(ap, layers=8)
  ap.add_argument("--batches", type=int, nargs="+", default=[1])
  ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (random ids), prefilled untimed")
  ap.add_argument("--steps", type=int, default=32, help="greedy decode steps timed per call")
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
  args = ap.parse_args()
  missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
  if missing:
    raise SystemExit(f"bench_llm_peers needs {' and '.join(missing)}: pip install torch==2.13.0 (the CPU build, "
                     "e.g. --index-url https://download.pytorch.org/whl/cpu) and pip install -e '.[hf]'")
  import torch
  import transformers
  torch.set_num_threads(args.threads)
  log = lambda s: print(s, file=sys.stderr, flush=True)
  t0 = time.perf_counter()

  cfg = llama_config(args)
  ours = {f"ours {n}": v for n, v in build_variants(cfg, log, t0, bf16=False).items()}
  params = ours["ours f32"][1]
  peers = {"torch fp32": torch_llama(cfg, params)}
  peers["torch quantize_dynamic qint8"] = torch.ao.quantization.quantize_dynamic(
      peers["torch fp32"], {torch.nn.Linear}, dtype=torch.qint8)
  log(f"torch models ready ({time.perf_counter() - t0:.0f}s)")
  names = list(ours) + list(peers)

  tps, agree, diff, loads = {}, {}, {}, []
  for b in args.batches:
    ids = np.random.default_rng(b).integers(0, cfg.vocab_size, (b, args.prompt)).astype(np.int32)
    fns, fargs, first = decode_fns(ours, jnp.asarray(ids), args.steps)
    first = {n: np.asarray(v) for n, v in first.items()}
    for n, m in peers.items():
      first[n], fns[n] = torch_decoder(m, ids, args.steps)
      fargs[n] = ()
    toks = {n: np.asarray(fns[n](*fargs[n])[0] if n in ours else fns[n]()) for n in names}
    agree[b] = {n: float(np.mean(toks[n] == toks["ours f32"])) for n in names}
    diff[b] = {n: float(np.max(np.abs(first[n] - first["ours f32"]))) for n in names}
    loads.append(os.getloadavg()[0])
    t = interleaved_medians(fns, fargs, rounds=args.rounds, before=lambda: time.sleep(PAUSE_S))
    loads.append(os.getloadavg()[0])
    tps[b] = {n: b * args.steps / s for n, s in t.items()}
    del fargs
    log(f"decode batch {b}: " + ", ".join(f"{n} {v:.1f} tok/s" for n, v in tps[b].items())
        + f"; torch fp32 vs ours f32: first logits max abs diff {diff[b]['torch fp32']:.2e}, "
        f"tokens {agree[b]['torch fp32']:.0%} identical ({time.perf_counter() - t0:.0f}s)")

  print(f"random-init Llama {cfg.num_params / 1e9:.2f}B (hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
        f"{cfg.num_heads} heads / {cfg.num_kv_heads} kv, ffn {cfg.intermediate_size}, vocab {cfg.vocab_size}): "
        f"{args.steps} greedy decode steps after a {args.prompt}-token prompt, medians of {args.rounds} round-robin "
        f"rounds, torch {args.threads} threads; load average {loads[0]:.2f} before / {loads[-1]:.2f} after")
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}")
  speed = lambda b, n: (f"{tps[b][n]:.1f} ({tps[b][n] / tps[b]['ours f32']:.2f}x ours f32, "
                        f"{tps[b][n] / tps[b]['torch fp32']:.2f}x torch fp32)")
  rows = [[n] + [c for b in args.batches for c in (speed(b, n), f"{agree[b][n]:.1%}", f"{diff[b][n]:.1e}")]
          for n in names]
  print_table(["system"] + [h for b in args.batches for h in (
      f"decode tok/s, batch {b}", f"tokens = ours f32, batch {b}", f"first logits max abs diff, batch {b}")],
      rows, left_first=True)


if __name__ == "__main__":
  main()
