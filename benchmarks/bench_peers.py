"""all-MiniLM-L6-v2 on the CPU: actquant-jax against what CPU users pick for int8 today
(ONNX Runtime's dynamic quantization, PyTorch's `quantize_dynamic`), accuracy and time
measured in one process.

  pip install -e '.[peers]' torch==2.13.0    # torch: the CPU build (make bench-peers)
  python benchmarks/bench_peers.py [--rounds 9] [--eval 600] [--threads 2]

Every system embeds the same sentences with the same tokenizer and the same weights.
Accuracy: 1 - mean cosine of each sentence embedding to the FP32 embedding (PyTorch
`transformers`, the model's own implementation; the Flax port matches it to ~1e-7) over
the evaluation sentences. Time: one forward of 64 sentences x 128 tokens, every system
timed round-robin (one call of each per round, after a 0.1 s pause; medians of --rounds
rounds), torch and
ONNX Runtime limited to --threads threads (XLA's CPU client uses every core; the
default, 2, is this machine's core count). ONNX models are exported with
`torch.onnx.export` (dynamo) and quantized with `onnxruntime.quantization.quantize_dynamic`
(QInt8 weights, per channel); ORT runs them with all graph optimizations on.
The table, with the run's command, date and machine, also goes to docs/results/bench_peers.md
and README's headline block (benchmarks/results_md.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import actquant_jax as aq  # noqa: E402
from actquant_jax.models.bert import load_minilm, minilm_dir  # noqa: E402
from benchmarks import results_md  # noqa: E402
from benchmarks.results_md import cpu_model  # noqa: E402
from benchmarks.timing import format_table  # noqa: E402
from examples.minilm.run import batched, read_sentences  # noqa: E402


# Before each timed call: the previous system's worker threads (OpenMP, ORT's pool) spin
# a while after their last task, which would tax the next system on this 2-core machine.
PAUSE_S = 0.1


def _require_peers():
  missing = [m for m in ("torch", "onnxruntime", "onnx", "onnxscript", "transformers")
             if importlib.util.find_spec(m) is None]
  if missing:
    raise SystemExit(f"bench_peers needs {', '.join(missing)}: pip install -e '.[peers]' torch==2.13.0 "
                     "(the CPU build of torch; `make bench-peers` does both)")


def torch_encoder(model_dir):
  """The HF PyTorch BertModel with the same mean pooling + L2 normalization as
  actquant_jax.models.bert.SentenceEncoder."""
  import torch
  from transformers import AutoModel

  class Encoder(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.bert = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()

    def forward(self, input_ids, attention_mask):
      h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
      m = attention_mask.unsqueeze(-1).to(h.dtype)
      pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
      return torch.nn.functional.normalize(pooled, dim=1)

  return Encoder().eval()


def onnx_models(enc, example, workdir: Path):
  """-> (fp32 path, int8 path): the encoder exported to ONNX, and ORT's dynamic int8."""
  import torch
  from onnxruntime.quantization import QuantType, quantize_dynamic
  fp32, int8 = workdir / "minilm.onnx", workdir / "minilm.int8.onnx"
  batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
  with torch.no_grad():
    torch.onnx.export(enc, (example["input_ids"], example["attention_mask"]), str(fp32), dynamo=True,
                      input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
                      dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                      external_data=False, verbose=False)
  quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
  return fp32, int8


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rounds", type=int, default=9)
  ap.add_argument("--eval", type=int, default=None, help="evaluation sentences (default: all 600)")
  ap.add_argument("--calib", type=int, default=None, help="calibration sentences (default: all 320)")
  ap.add_argument("--threads", type=int, default=os.cpu_count())
  ap.add_argument("--only", default=None, help="comma-separated row names to keep (e.g. 'ORT dynamic int8,ours static')")
  args = ap.parse_args()
  _require_peers()

  import onnxruntime as ort
  import torch
  torch.set_num_threads(args.threads)
  log = lambda s: print(s, file=sys.stderr, flush=True)

  mm = load_minilm()
  evals = read_sentences("evaluation.txt", args.eval)
  eval_batches = batched(mm, evals)
  speed = mm.tokenize((read_sentences("evaluation.txt") * 2)[:64], max_len=128, pad_to=128)
  speed_np = {k: np.asarray(v) for k, v in speed.items()}
  speed_pt = {k: torch.from_numpy(v.astype(np.int64)) for k, v in speed_np.items()}

  # name -> (embed(batch dict of numpy int32) -> (B, D) numpy, timed call on the speed batch)
  systems = {}
  enc = torch_encoder(minilm_dir())

  def torch_system(module):
    def run(b):
      with torch.inference_mode():
        return module(torch.from_numpy(np.asarray(b["input_ids"]).astype(np.int64)),
                      torch.from_numpy(np.asarray(b["attention_mask"]).astype(np.int64))).numpy()
    def timed():
      with torch.inference_mode():
        return module(speed_pt["input_ids"], speed_pt["attention_mask"])
    return run, timed

  systems["torch fp32"] = torch_system(enc)
  for name, qscheme in (("torch quantize_dynamic per-tensor", torch.per_tensor_affine),
                        ("torch quantize_dynamic per-channel", torch.per_channel_affine)):
    qconfig = (torch.ao.quantization.default_dynamic_qconfig if qscheme == torch.per_tensor_affine
               else torch.ao.quantization.per_channel_dynamic_qconfig)
    qenc = torch.ao.quantization.quantize_dynamic(torch_encoder(minilm_dir()), {torch.nn.Linear: qconfig}, dtype=torch.qint8)
    systems[name] = torch_system(qenc)

  with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    fp32_path, int8_path = onnx_models(enc, speed_pt, Path(tmp))
    log(f"exported and quantized the ONNX model in {time.perf_counter() - t:.1f}s")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for name, path in (("ORT fp32", fp32_path), ("ORT dynamic int8 (QInt8 per-channel)", int8_path)):
      sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
      feed = lambda b: {"input_ids": np.asarray(b["input_ids"]).astype(np.int64),
                        "attention_mask": np.asarray(b["attention_mask"]).astype(np.int64)}
      speed_feed = feed(speed_np)
      systems[name] = ((lambda b, s=sess: s.run(None, feed(b))[0]), (lambda s=sess: s.run(None, speed_feed)[0]))

  calib = read_sentences("calibration.txt", args.calib)
  stats = aq.calibrate(mm.model, mm.params, batched(mm, calib), progress=False)
  float_apply, q_apply = jax.jit(mm.model.apply), jax.jit(aq.quantized_apply(mm.model))

  def jax_system(apply, params):
    return ((lambda b: np.asarray(apply(params, **b))),
            (lambda: jax.block_until_ready(apply(params, speed["input_ids"], speed["attention_mask"]))))

  systems["ours fp32"] = jax_system(float_apply, mm.params)
  for name, cfg in (("ours W8A8 dynamic per-token, auto alpha", aq.QuantConfig(act_mode="dynamic", alpha="auto", rotate=False)),
                    ("ours W8A8 static per-tensor, auto alpha", aq.QuantConfig(act_mode="static", alpha="auto", rotate=False)),
                    ("ours W8A8 dynamic per-token, no smoothing", aq.QuantConfig(act_mode="dynamic", alpha=None, rotate=False)),
                    ("ours W8A8 static per-tensor, no smoothing", aq.QuantConfig(act_mode="static", alpha=None, rotate=False))):
    systems[name] = jax_system(q_apply, aq.quantize_params(mm.params, stats, cfg))

  if args.only:
    keep = [k.strip() for k in args.only.split(",")]
    systems = {k: v for k, v in systems.items() if k in ("torch fp32",) or any(s in k for s in keep)}

  ref = np.concatenate([systems["torch fp32"][0](b) for b in eval_batches])
  errors = {}
  for name, (run, _) in systems.items():
    emb = np.concatenate([run(b) for b in eval_batches])
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    errors[name] = 1.0 - float(np.mean(np.sum(ref * emb, axis=1)))
    log(f"  {name}: 1 - mean cos {errors[name]:.2e}")

  for _, timed in systems.values():  # warm up (compiles, ORT's first-run allocations)
    timed(), timed()
  times = {name: [] for name in systems}
  load = os.getloadavg()[0]
  for _ in range(args.rounds):
    for name, (_, timed) in systems.items():
      time.sleep(PAUSE_S)
      t = time.perf_counter()
      timed()
      times[name].append(time.perf_counter() - t)
  ms = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
  ort_int8 = next((ms[n] for n in ms if n.startswith("ORT dynamic int8")), None)

  setup = (f"all-MiniLM-L6-v2, 64 x 128 tokens, {args.threads} threads, medians of {args.rounds} round-robin rounds; "
           f"{len(evals)} evaluation sentences; load average {load:.2f} before / {os.getloadavg()[0]:.2f} after")
  versions = f"jax {jax.__version__}, torch {torch.__version__}, onnxruntime {ort.__version__}"
  print(setup)
  print(f"{versions}, CPU: {cpu_model()}")
  rows = [[name, f"{ms[name]:.0f}", f"{ms[name] / ort_int8:.2f}x" if ort_int8 else "-", f"{errors[name]:.1e}"]
          for name in systems]
  table = format_table(["system", "ms", "time vs ORT int8", "1 - mean cos"], rows, left_first=True)
  print(table)
  results_md.publish("bench_peers", table, readme=True, info=results_md.provenance(extra=[setup, versions]),
                     title="MiniLM against ONNX Runtime and PyTorch on the CPU (`make bench-peers`)")


if __name__ == "__main__":
  main()
