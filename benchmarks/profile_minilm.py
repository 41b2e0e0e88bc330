"""Where MiniLM's forward time goes, by op class, from XLA's own profiler.

  python benchmarks/profile_minilm.py                       # fp32 and the W8A8 modes
  python benchmarks/profile_minilm.py --modes dynamic-auto --ops 30   # + the 30 costliest ops

Runs the jitted forward of 64 sentences x 128 tokens (the speed batch of `make demo`)
under `jax.profiler` for --reps calls per mode, reads the trace's per-thunk times and
classifies each top-level op of the compiled HLO by what it computes: its output type,
the opcodes inside its fusion, its custom-call target. XLA CPU duplicates elementwise
producers into their consumer fusions: a fusion that writes int8 is quantize time even
where it recomputes the GELU before it (static mode), and any other fusion holding an erf
is GELU time (the base's absmax fusions recomputed it). Thunks that XLA runs concurrently
(a native custom call beside a GEMM) both count their wall time. Milliseconds per forward
(the profiler adds a few percent).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import actquant_jax as aq  # noqa: E402
from benchmarks.timing import print_table  # noqa: E402
from examples.minilm.run import batched, read_sentences  # noqa: E402

MODES = {
    "fp32": None,
    "dynamic-none": aq.QuantConfig(act_mode="dynamic", alpha=None, rotate=False),
    "dynamic-auto": aq.QuantConfig(act_mode="dynamic", alpha="auto", rotate=False),
    "static-none": aq.QuantConfig(act_mode="static", alpha=None, rotate=False),
    "static-auto": aq.QuantConfig(act_mode="static", alpha="auto", rotate=False),
}
CLASSES = ["int8 GEMM", "f32 GEMM (Dense)", "attention (QK^T, softmax, PV)", "attention mask/scale broadcast",
           "quantize to 8 bits (scale, round)", "row absmax (dynamic scale)", "non-finite row check",
           "GEMM epilogue (dequant, bias)", "GELU (erf)", "LayerNorm", "layout copies", "embeddings, pooling, other"]

_INST = re.compile(r"(?:ROOT )?%([\w.\-]+) = (\([^)]*\)|\S+) ([\w\-]+)\(")


def parse_hlo(text: str):
  """-> (instructions: name -> (shape, opcode, line), computations: name -> lines)."""
  comps, cur = {}, None
  for line in text.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m and not line.startswith(" "):
      cur = m.group(1)
      comps[cur] = []
    elif line.startswith("}"):
      cur = None
    elif cur:
      comps[cur].append(line.strip())
  inst = {}
  for lines in comps.values():
    for l in lines:
      m = _INST.match(l)
      if m:
        inst[m.group(1)] = (m.group(2), m.group(3), l)
  return inst, comps


def opcodes(comps, comp, depth=0) -> collections.Counter:
  """Opcodes inside a computation (and what it calls), plus "erf" if any op came from an erf."""
  ops = collections.Counter()
  for l in comps.get(comp, []):
    m = _INST.match(l)
    if m:
      ops[m.group(3)] += 1
      if re.search(r'op_name="[^"]*/erfc?"', l):
        ops["erf"] += 1
      if depth < 3:
        for called in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", l):
          ops.update(opcodes(comps, called, depth + 1))
  return ops


def classify(shape: str, opcode: str, line: str, ops) -> str:
  target = re.search(r'custom_call_target="([^"]*)"', line)
  target = target.group(1) if target else ""
  meta = re.search(r'op_name="([^"]*)"', line)
  meta = meta.group(1) if meta else ""
  rank = shape.split("{")[0].count(",") + 1 if "[" in shape else 0
  if "s8_gemm" in target:
    return "int8 GEMM"
  if "marked_rows" in target:
    return "non-finite row check"
  if "quantize_rows" in target:
    return "quantize to 8 bits (scale, round)"
  if shape.startswith(("s8[", "f8e4m3fn[")):
    return "quantize to 8 bits (scale, round)"
  if ops["dot"] or opcode == "dot":
    if shape.startswith("s32["):
      return "int8 GEMM"
    if ops["dot"] >= 2 or ops["exponential"] or rank == 4:
      return "attention (QK^T, softmax, PV)"
    return "f32 GEMM (Dense)"
  if ops["erf"] or "erf" in meta:
    return "GELU (erf)"
  if ops["exponential"]:
    return "attention (QK^T, softmax, PV)"
  if ops["reduce"] and ops["maximum"] and not ops["rsqrt"] and rank == 1:
    return "row absmax (dynamic scale)"
  if ops["abs"] and ops["select"] and not ops["round-nearest-even"]:
    return "row absmax (dynamic scale)"
  if ops["rsqrt"]:
    return "LayerNorm"
  if rank == 4 and (set(ops) <= {"parameter", "broadcast", "constant", "convert", "subtract", "multiply"}):
    return "attention mask/scale broadcast"
  if ops["transpose"] or ops["copy"] or opcode in ("copy", "transpose"):
    return "layout copies"
  if ops["convert"] and ops["multiply"] or set(ops) <= {"parameter", "convert"}:
    return "GEMM epilogue (dequant, bias)"
  return "embeddings, pooling, other"


def profile(apply, args, reps: int, workdir: Path):
  """-> ({op name: ms per call}, hlo text)."""
  hlo = apply.lower(*args).compile().as_text()
  for _ in range(3):
    jax.block_until_ready(apply(*args))
  shutil.rmtree(workdir, ignore_errors=True)
  jax.profiler.start_trace(str(workdir), create_perfetto_trace=True)
  for _ in range(reps):
    jax.block_until_ready(apply(*args))
  jax.profiler.stop_trace()
  trace = json.load(gzip.open(glob.glob(str(workdir / "plugins/profile/*/perfetto_trace.json.gz"))[0]))
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  inst, _ = parse_hlo(hlo)
  ms = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in inst:
      ms[e["name"]] += e["dur"] / 1e3 / reps
  return ms, hlo


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--ops", type=int, default=0, help="also list the N costliest ops of each mode")
  args = ap.parse_args()
  from actquant_jax.models.bert import load_minilm
  mm = load_minilm()
  stats = aq.calibrate(mm.model, mm.params, batched(mm, read_sentences("calibration.txt")), progress=False)
  batch = mm.tokenize((read_sentences("evaluation.txt") * 2)[:64], max_len=128, pad_to=128)
  float_apply, q_apply = jax.jit(mm.model.apply), jax.jit(aq.quantized_apply(mm.model))
  table = {}
  with tempfile.TemporaryDirectory() as tmp:
    for mode in args.modes.split(","):
      cfg = MODES[mode]
      apply, params = (float_apply, mm.params) if cfg is None else (q_apply, aq.quantize_params(mm.params, stats, cfg))
      ms, hlo = profile(apply, (params, batch["input_ids"], batch["attention_mask"]), args.reps, Path(tmp) / mode)
      table[mode] = by_class(ms, hlo, classify, args.ops, mode)
  print(f"\nMiniLM forward, 64 x 128 tokens, ms per call by op class (jax.profiler, {args.reps} calls; "
        f"jax {jax.__version__})")
  print_classes(table, CLASSES, digits=1)


def by_class(ms, hlo: str, classify, ops: int = 0, title: str = "", scale: float = 1.0, skip=()) -> collections.Counter:
  """{op class: ms} from profile()'s per-op times, each op classified by classify(shape,
  opcode, line, opcodes inside it) and its time times `scale`; ops whose opcode is in
  `skip` are left out. ops > 0: also prints the `ops` costliest, under `title`."""
  inst, comps = parse_hlo(hlo)
  per_class, listed = collections.Counter(), []
  for name, t in ms.most_common():
    shape, opcode, line = inst[name]
    if opcode in skip:
      continue
    called = re.findall(r"calls=%([\w.\-]+)", line)
    cls = classify(shape, opcode, line, opcodes(comps, called[0]) if called else collections.Counter())
    per_class[cls] += t * scale
    listed.append((name, t * scale, cls, shape))
  if ops:
    print(f"\n{title}: the {ops} costliest ops (ms)")
    print_table(["op", "ms", "class", "output"], [[n, f"{t:.3f}", c, s.split("{")[0]] for n, t, c, s in listed[:ops]],
                left_first=True)
  return per_class


def print_classes(table: dict, classes, digits: int = 2):
  """One column per variant of table ({variant: {class: ms}}), a row per class, a total."""
  names = list(table)
  rows = [[c] + [f"{table[n][c]:.{digits}f}" for n in names] for c in classes if any(table[n][c] for n in names)]
  rows.append(["total"] + [f"{sum(table[n].values()):.{digits}f}" for n in names])
  print_table(["op class"] + names, rows, left_first=True)


if __name__ == "__main__":
  main()
