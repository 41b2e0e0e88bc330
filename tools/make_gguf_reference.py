"""Reference data for a real pretrained LLM shipped as a GGUF file, made by PyTorch
`transformers` (CPU, float32, eager attention), so the Flax models can be checked for
parity on real weights. Needs torch + transformers 5.x + gguf; no jax.

  python tools/make_gguf_reference.py --gguf /path/SmolLM2-135M-Instruct.Q4_1.gguf \\
      --out tests/data/smollm2_reference.npz [--dump-state /path/hfref/smollm2]

transformers dequantizes every GGUF tensor to float32 at load time (gguf-py's numpy
`dequantize`; its legacy GGUF loader, which covers `llama` and `gemma3`), undoes
llama.cpp's q/k row permutation for `llama` files and stores Gemma norm weights as w
(the file has 1 + w). The npz then holds, for each of the PROMPTS (transformers'
tokenizer built from the GGUF metadata, default settings):

  prompts, ids_<i>                   the texts and their token ids (T,)
  top5_ids_<i>, top5_logits_<i>      (T, 5) top-5 of a no-cache forward, every position
  lse_<i>                            (T,) logsumexp of that position's logits
  probe_ids, probe_logits_<i>        a fixed random sample of vocabulary ids (P,), and
                                     every position's logits there (T, P)
  logits_last_<i>                    (n, V) full logits of the last n positions; n is
                                     --full-last, cut so that these rows take about 1 MB
                                     (where not even one row per prompt fits, only
                                     logits_last_0 with the last row)
  greedy_<i>                         (N_GREEDY,) model.generate(do_sample=False), KV cache,
                                     for the first N_GREEDY_PROMPTS prompts; EOS does not
                                     stop it
  greedy_top5_ids_<i>, greedy_top5_logits_<i>, greedy_lse_<i>
                                     each decode step's top-5 and logsumexp
  config                             model.config.to_json_string()
  transformers_version, torch_version, gguf_version, gguf_file, gguf_sha256,
  attn_implementation, add_bos, tokenizer_note

--dump-state DIR also writes the dequantized float32 state dict under transformers'
names (DIR/model.safetensors; a tied lm_head is left out, as save_pretrained does), the
config (DIR/config.json, without the GGUF quantization_config, so
`from_pretrained(DIR)` loads a plain float32 model), the tokenizer
(tokenizer.save_pretrained) and DIR/gguf_tensors.json (each GGUF tensor's name, type and
shape), to compare another dequantization against transformers' tensor by tensor.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

# Short real English texts of different lengths: one with digits, newline and
# punctuation, one letter with a blank line.
PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "Question: A train leaves at 3:15 pm and travels 120 km at 80 km/h. When does it arrive?\nAnswer:",
    "Dear Anna,\n\nThank you so much for the lovely flowers! They have brightened up the whole kitchen.",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide "
    "to make glucose and oxygen.",
)
N_GREEDY = 16
N_GREEDY_PROMPTS = 2
TOPK = 5
N_PROBE = 512
PROBE_SEED = 0
BUDGET_BYTES = 1_000_000  # raw float32 bytes allowed for the full-vocab rows (logits_last_*)


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def load(gguf: Path):
  """-> (model (eval, float32, eager attention), tokenizer) from a GGUF file."""
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer
  tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
  model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                               attn_implementation="eager").eval()
  return model, tokenizer


def _top(logits, k: int = TOPK):
  """logits (T, V) torch -> (top-k ids (T, k) int32, their logits (T, k), logsumexp (T,))."""
  import torch
  vals, ids = torch.topk(logits, k, dim=-1)
  lse = torch.logsumexp(logits, dim=-1)
  return ids.numpy().astype(np.int32), vals.numpy().astype(np.float32), lse.numpy().astype(np.float32)


def tokenizer_note(tokenizer) -> str:
  bos = tokenizer.bos_token_id
  probe = tokenizer("Hi").input_ids
  added = (f"BOS {tokenizer.bos_token!r} (id {bos}) is prepended" if bos is not None and probe and probe[0] == bos
           else "no BOS/EOS is added")
  specials = ", ".join(f"{name}={getattr(tokenizer, name + '_token')!r}/{getattr(tokenizer, name + '_token_id')}"
                       for name in ("bos", "eos", "pad", "unk"))
  return (f"ids_<i> = tokenizer(prompt).input_ids with default settings (add_special_tokens=True): {added}; "
          f"no chat template. Tokenizer {type(tokenizer).__name__} converted by transformers from the GGUF "
          f"metadata ({specials}).")


def reference(model, tokenizer, full_last: int, budget_bytes: int = BUDGET_BYTES) -> dict:
  """The npz arrays (see the module docstring)."""
  import torch
  from transformers import GenerationConfig
  vocab = model.config.vocab_size
  ids = [np.asarray(tokenizer(p).input_ids, dtype=np.int32) for p in PROMPTS]
  # Full rows: the last `full_last` positions of every prompt, as many as fit the budget; where
  # not even one row a prompt fits (Gemma's 262k vocabulary), the last row of prompt 0 alone.
  n_full = min(full_last, budget_bytes // (4 * vocab * len(PROMPTS)))
  probe = np.sort(np.random.default_rng(PROBE_SEED).choice(vocab, size=min(N_PROBE, vocab), replace=False))
  arrays = {"prompts": np.array(PROMPTS), "probe_ids": probe.astype(np.int32)}
  with torch.no_grad():
    for i, x in enumerate(ids):
      logits = model(torch.tensor(x[None], dtype=torch.long), use_cache=False).logits[0].float()
      top_ids, top_vals, lse = _top(logits)
      arrays.update({f"ids_{i}": x, f"top5_ids_{i}": top_ids, f"top5_logits_{i}": top_vals, f"lse_{i}": lse,
                     f"probe_logits_{i}": logits[:, probe].numpy().astype(np.float32)})
      if n_full or (i == 0 and full_last):
        arrays[f"logits_last_{i}"] = logits[-max(n_full, 1):].numpy().astype(np.float32)
    # Greedy decoding through transformers' KV cache, 16 tokens whatever they are.
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=N_GREEDY, eos_token_id=None,
                               pad_token_id=model.config.pad_token_id, top_k=None, top_p=None, temperature=None,
                               use_cache=True, output_logits=True, return_dict_in_generate=True)
    for i in range(N_GREEDY_PROMPTS):
      x = torch.tensor(ids[i][None], dtype=torch.long)
      out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=gen_cfg)
      new = out.sequences[0, x.shape[1]:].numpy().astype(np.int32)
      if new.shape[0] != N_GREEDY:
        raise RuntimeError(f"generate stopped after {new.shape[0]} of {N_GREEDY} tokens")
      step_logits = torch.stack([s[0].float() for s in out.logits])  # (N_GREEDY, V), before any processor
      top_ids, top_vals, lse = _top(step_logits)
      if not np.array_equal(top_ids[:, 0], new):
        raise RuntimeError("greedy tokens are not the argmax of the step logits")
      # Check the cached decode against a no-cache forward of the whole sequence.
      full = model(out.sequences, use_cache=False).logits[0, x.shape[1] - 1:-1].float()
      print(f"prompt {i}: greedy {tokenizer.decode(new)!r}; cached vs no-cache step logits max |diff| "
            f"{float((full - step_logits).abs().max()):.2e}", file=sys.stderr)
      arrays.update({f"greedy_{i}": new, f"greedy_top5_ids_{i}": top_ids, f"greedy_top5_logits_{i}": top_vals,
                     f"greedy_lse_{i}": lse})
  return arrays


def dump_state(model, tokenizer, gguf: Path, out_dir: Path) -> None:
  """Dequantized float32 weights (HF names) + config.json + tokenizer + gguf_tensors.json."""
  from gguf import GGUFReader
  from safetensors.torch import save_file
  out_dir.mkdir(parents=True, exist_ok=True)
  state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
  if model.config.tie_word_embeddings:
    state.pop("lm_head.weight", None)
  save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
  config = copy.deepcopy(model.config)
  if hasattr(config, "quantization_config"):
    del config.quantization_config
  config.save_pretrained(str(out_dir))
  tokenizer.save_pretrained(str(out_dir))
  reader = GGUFReader(str(gguf))
  tensors = [{"name": t.name, "type": t.tensor_type.name, "shape": [int(s) for s in t.shape]} for t in reader.tensors]
  (out_dir / "gguf_tensors.json").write_text(json.dumps(tensors, indent=1) + "\n")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--gguf", type=Path, required=True, help="the .gguf file")
  ap.add_argument("--out", type=Path, required=True, help="the .npz to write")
  ap.add_argument("--full-last", type=int, default=4,
                  help="full-vocab logits of this many last positions per prompt, at most as many as fit "
                       f"{BUDGET_BYTES} bytes (default 4)")
  ap.add_argument("--dump-state", type=Path, default=None, metavar="DIR",
                  help="also save the dequantized state dict, config and tokenizer to DIR")
  args = ap.parse_args(argv)

  from importlib.metadata import version

  import torch
  import transformers
  torch.manual_seed(0)
  t0 = time.time()
  model, tokenizer = load(args.gguf)
  print(f"loaded {args.gguf.name} in {time.time() - t0:.0f}s", file=sys.stderr)
  arrays = reference(model, tokenizer, args.full_last)
  add_bos = bool(tokenizer.bos_token_id is not None and arrays["ids_0"][0] == tokenizer.bos_token_id)
  arrays.update(config=np.array(model.config.to_json_string()), transformers_version=np.array(transformers.__version__),
                torch_version=np.array(torch.__version__), gguf_version=np.array(version("gguf")),
                gguf_file=np.array(args.gguf.name), gguf_sha256=np.array(_sha256(args.gguf)),
                attn_implementation=np.array(model.config._attn_implementation), add_bos=np.array(add_bos),
                tokenizer_note=np.array(tokenizer_note(tokenizer)))
  args.out.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(args.out, **arrays)
  print(f"wrote {args.out} ({args.out.stat().st_size} bytes; transformers {transformers.__version__}, "
        f"torch {torch.__version__})", file=sys.stderr)
  if args.dump_state is not None:
    dump_state(model, tokenizer, args.gguf, args.dump_state)
    print(f"dumped the state dict, config and tokenizer to {args.dump_state}", file=sys.stderr)


if __name__ == "__main__":
  main()
