"""Train the small Llama-architecture model shipped in examples/llm/model/ (the default of
examples/llm/run.py), from nothing, on the documentation inside CPython (corpus.py).

  python examples/llm/train.py                      # 15 min (wall clock) on 2 CPU cores
  python examples/llm/train.py --minutes 2 --out /tmp/m   # a quick look

Steps: a byte-level BPE tokenizer (2048 tokens, `tokenizers`) trained on the train split;
the model (LlamaForCausalLM: GQA, SwiGLU, RoPE, RMSNorm, tied embeddings) trained with
optax AdamW on random 128-token windows for a wall-clock budget (warmup + cosine decay
over the budget: the machine is shared, so the step count is what fits); the held-out perplexity measured; weights saved as bf16 safetensors
with config.json and tokenizer.json, plus examples/llm/data/{calibration,heldout}.txt
(text from the train / held-out splits, so run.py does not depend on this Python's
stdlib). Nothing is planted: whatever activation outliers the model has come from training.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from actquant_jax.models import llama as L  # noqa: E402
from examples.llm import corpus  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIG = L.LlamaConfig(vocab_size=2048, hidden_size=192, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=48,
                       intermediate_size=512, rms_norm_eps=1e-5, rope_theta=10000.0, max_position=1024,
                       tie_word_embeddings=True)


def train_tokenizer(texts, vocab_size: int):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[corpus.EOS],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer)
  return tok


def encode_documents(tok, texts) -> np.ndarray:
  """All documents as one token stream, EOS between them."""
  eos = tok.token_to_id(corpus.EOS)
  ids = []
  for e in tok.encode_batch(texts):
    ids += e.ids + [eos]
  return np.asarray(ids, np.int32)


def perplexity(apply, params, stream: np.ndarray, seq: int = 256, batch: int = 8) -> float:
  """exp(mean next-token NLL) over non-overlapping `seq`-token windows of the stream."""
  n = (len(stream) - 1) // seq
  x = stream[:n * seq].reshape(n, seq)
  y = stream[1:n * seq + 1].reshape(n, seq)

  @jax.jit
  def nll(p, xb, yb):
    logp = jax.nn.log_softmax(apply(p, xb), axis=-1)
    return -jnp.take_along_axis(logp, yb[..., None], axis=-1).sum()

  total = 0.0
  for i in range(0, n, batch):
    total += float(nll(params, jnp.asarray(x[i:i + batch]), jnp.asarray(y[i:i + batch])))
  return math.exp(total / (n * seq))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--minutes", type=float, default=15.0, help="training time budget (wall clock)")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: the time budget)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default=str(HERE / "model"))
  ap.add_argument("--data", default=str(HERE / "data"))
  args = ap.parse_args()
  log = lambda s: print(s, flush=True)
  t0 = time.perf_counter()

  train_texts, held_texts = corpus.split_documents()
  tok = train_tokenizer(train_texts, CONFIG.vocab_size)
  train_ids, held_ids = encode_documents(tok, train_texts), encode_documents(tok, held_texts)
  log(f"corpus: {len(train_texts)} train documents ({sum(map(len, train_texts))} chars, {len(train_ids)} tokens), "
      f"{len(held_texts)} held-out ({len(held_ids)} tokens); tokenizer {time.perf_counter() - t0:.0f}s")

  model = L.LlamaForCausalLM(CONFIG)
  rng = np.random.default_rng(args.seed)
  params = model.init(jax.random.key(args.seed), jnp.zeros((1, args.seq), jnp.int32))
  log(f"model: {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.2f}M params")

  def loss_fn(p, x, y):
    logp = jax.nn.log_softmax(model.apply(p, x), axis=-1)
    return -jnp.take_along_axis(logp, y[..., None], axis=-1).mean()

  def make_step(opt):
    @jax.jit
    def step(p, s, x, y):
      loss, g = jax.value_and_grad(loss_fn)(p, x, y)
      upd, s = opt.update(g, s, p)
      return optax.apply_updates(p, upd), s, loss
    return step

  def batch():
    starts = rng.integers(0, len(train_ids) - args.seq - 1, args.batch)
    w = np.stack([train_ids[s:s + args.seq + 1] for s in starts])
    return jnp.asarray(w[:, :-1]), jnp.asarray(w[:, 1:])

  # The schedule runs on wall time, not steps: the machine is shared, so how many steps
  # fit in the budget is not known ahead. lr(f) for f = elapsed / budget: linear warmup
  # over the first 3%, then cosine decay to 5% of the peak; training stops at f = 1.
  def lr_at(f):
    if f < 0.03:
      return args.lr * f / 0.03
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, (f - 0.03) / 0.97))))

  make_opt = lambda learning_rate: optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adamw(learning_rate, b1=0.9, b2=0.95, weight_decay=0.1,
                  mask=lambda p: jax.tree.map(lambda x: x.ndim == 2, p)))
  opt = optax.inject_hyperparams(make_opt)(learning_rate=0.0)
  step, state = make_step(opt), opt.init(params)
  budget = args.minutes * 60
  t_train, avg, i = time.perf_counter(), None, 0
  while True:
    f = (time.perf_counter() - t_train) / budget
    if f >= 1.0 or (args.steps and i >= args.steps):
      break
    state.hyperparams["learning_rate"] = jnp.asarray(lr_at(f), jnp.float32)
    params, state, loss = step(params, state, *batch())
    i += 1
    if i % 25 == 0:
      loss = float(loss)
      avg = loss if avg is None else 0.8 * avg + 0.2 * loss
      log(f"step {i}: loss {loss:.3f} (avg {avg:.3f}), lr {lr_at(f):.2e}, {time.perf_counter() - t_train:.0f}s")
  steps = i

  # Save in bf16, and measure the held-out perplexity of what was saved.
  out = Path(args.out)
  L.save_llama(out, params, CONFIG, dtype=ml_dtypes.bfloat16, tokenizer=tok)
  lm = L.load_llama(out)
  ppl = perplexity(lm.model.apply, lm.params, held_ids, 256)
  train_ppl = perplexity(lm.model.apply, lm.params, train_ids[:len(held_ids)], 256)
  info = dict(params=sum(x.size for x in jax.tree.leaves(params)), steps=steps, batch=args.batch, seq=args.seq,
              train_tokens=int(len(train_ids)), held_out_tokens=int(len(held_ids)),
              held_out_perplexity=ppl, train_sample_perplexity=train_ppl,
              train_minutes=(time.perf_counter() - t_train) / 60, python=sys.version.split()[0])
  (out / "training.json").write_text(json.dumps(info, indent=2))
  log(f"held-out perplexity {ppl:.2f} (train sample {train_ppl:.2f}); wrote {out}")

  # The text run.py uses: calibration from the train split, evaluation from the held-out one.
  data = Path(args.data)
  data.mkdir(parents=True, exist_ok=True)
  (data / "calibration.txt").write_text(f"\n{corpus.EOS}\n".join(train_texts[::20])[:60_000])
  (data / "heldout.txt").write_text(f"\n{corpus.EOS}\n".join(held_texts))
  log(f"wrote {data}/calibration.txt, heldout.txt; total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
  main()
