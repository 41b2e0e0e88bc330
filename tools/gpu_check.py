"""Deviceless GPU compile check: every kernel variant the library can pick, compiled by
XLA's real GPU pipeline to a cubin on a machine without a GPU, and checked in SASS.

  make gpu-check            # sets up .venv-gpucheck (jax + CUDA plugin + ptxas wheels)
  python tools/gpu_check.py # inside that venv, from the repository root

Per kernel config (each compiled in its own subprocess: a Triton failure is an LLVM
fatal error that kills the process) it asserts: no register spills, shared memory within
the target's opt-in limit, and the expected 8-bit tensor-core instructions in the SASS
(IGMMA / QGMMA on sm_90a, IMMA on sm_80). fp8 on sm_80 must be refused by the library's
backend registry with a clear error. It prints a table and exits non-zero on a failure.

How (shared/PALLAS_NOTES.md): compile-only devices from a GpuTargetConfigProto topology,
`jit(...).trace(structs with that device).lower().compile()`; the Triton kernel's PTX
comes from `xla_dump_to`, the Mosaic GPU kernel's from MOSAIC_GPU_DUMP_TO; ptxas -v on
that PTX gives registers/spills, cuobjdump -sass the instructions; shared memory is read
from XLA's thunk sequence (Triton) or the Mosaic launch (dynamic_shared_memory_size).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# GpuTargetConfigProto text for compile-only devices (fields XLA reads from a device;
# values as XLA's own gpu_specs for H100 SXM and A100 SXM 80GB).
_TARGET_CONFIG = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {smem_per_core} threads_per_core_limit: 2048 core_count: {cores}
  fpus_per_core: {fpus} block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bw} l2_cache_size: {l2} clock_rate_ghz: {clock}
  device_memory_size: 85000000000 shared_memory_per_block_optin: {smem_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
device_description_str: "{name}"
"""

TARGETS = {
    "sm_90a": dict(name="NVIDIA H100 80GB HBM3", major=9, minor=0, cores=132, fpus=128,
                   smem_per_core=233472, smem_optin=232448, bw=3352320000000, l2=52428800, clock=1.98),
    "sm_80": dict(name="NVIDIA A100-SXM4-80GB", major=8, minor=0, cores=108, fpus=64,
                  smem_per_core=167936, smem_optin=166912, bw=2039040000000, l2=41943040, clock=1.41),
}

# Shape classes the library's block configs are chosen for (N = K = 4096, bf16 out).
SHAPES = {"decode": 16, "medium": 128, "prefill": 2048}
N = K = 4096
QTYPES = {"int8": "int8", "fp8": "float8_e4m3fn"}


@dataclasses.dataclass(frozen=True)
class Config:
  kernel: str  # "triton" | "mosaic" | "mosaic_ws" (warp-specialized, persistent) | "quantize"
  qtype: str  # "int8" | "fp8"
  shape: str  # a SHAPES key
  target: str  # a TARGETS key

  @property
  def m(self) -> int:
    return SHAPES[self.shape]

  def label(self) -> str:
    return f"{self.kernel} {self.qtype} {self.shape} (M={self.m})"


def expected_mma(cfg: Config) -> str | None:
  """A regex the SASS's tensor-core opcodes must match (None: no tensor-core work)."""
  if cfg.kernel == "quantize":
    return None
  if cfg.target == "sm_80":
    return r"^IMMA\.16832\.S8\.S8"
  if cfg.kernel == "triton" and cfg.m < 64:
    # int8 decode: mma.sync (wgmma needs M >= 64 per warpgroup; the decode tile is 16
    # rows). fp8 decode tiles are 64 rows: a 16-row fp8 tile becomes f16 HMMA.
    if cfg.qtype == "int8":
      return r"^IMMA\.16832\.S8\.S8"
  return r"^IGMMA\.64x\d+x32\.S8\.S8" if cfg.qtype == "int8" else r"^QGMMA\.64x\d+x32\.F32\.E4M3\.E4M3"


def all_configs() -> list[Config]:
  out = []
  for target in TARGETS:
    for qtype in QTYPES:
      if target == "sm_80" and qtype == "fp8":
        continue  # refused by the registry (checked separately)
      for shape in SHAPES:
        out.append(Config("triton", qtype, shape, target))
        if target == "sm_90a":
          out.append(Config("mosaic", qtype, shape, target))
          if SHAPES[shape] >= 128:  # the warp-specialized kernel's CTA tile is 128 rows
            out.append(Config("mosaic_ws", qtype, shape, target))
      out.append(Config("quantize", qtype, "prefill", target))
  return out


# ---------------------------------------------------------------- parsing (pure, tested)

_PTXAS_FUNC = re.compile(r"Function properties for (\S+)")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str) -> dict[str, dict[str, int]]:
  """`ptxas -v` output -> {function: {registers, stack, spill_stores, spill_loads, smem}}."""
  out: dict[str, dict[str, int]] = {}
  current = None
  for line in text.splitlines():
    if m := _PTXAS_FUNC.search(line):
      current = m.group(1).strip("'")
      out[current] = dict(registers=0, stack=0, spill_stores=0, spill_loads=0, smem=0)
      continue
    if current is None:
      continue
    if m := _PTXAS_SPILL.search(line):
      out[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
    if m := _PTXAS_USED.search(line):
      out[current]["registers"] = int(m.group(1))
      if s := _PTXAS_SMEM.search(line):
        out[current]["smem"] = int(s.group(1))
  return out


_SASS_MMA = re.compile(r"\b([A-Z]*MMA(?:\.[A-Za-z0-9]+)+)")


def parse_sass_mma(text: str) -> collections.Counter:
  """`cuobjdump -sass` text -> Counter of tensor-core opcodes (HMMA, IMMA, IGMMA, QGMMA...)."""
  return collections.Counter(m.group(1) for m in _SASS_MMA.finditer(text))


_THUNK_SMEM = re.compile(r"kCustomKernel.*?\]\s+(\S+)\s+grid:.*?shared_memory:\s*(\d+)\s*bytes")


def parse_thunk_smem(text: str) -> dict[str, int]:
  """XLA's `*.thunk_sequence.txt` -> {kernel name: dynamic shared memory bytes}."""
  return {m.group(1): int(m.group(2)) for m in _THUNK_SMEM.finditer(text)}


_MOSAIC_SMEM = re.compile(r"dynamic_shared_memory_size %c(\d+)_i32")


def parse_mosaic_smem(text: str) -> int:
  """Mosaic GPU's pass log -> the dynamic shared memory its kernel launches with."""
  sizes = [int(m.group(1)) for m in _MOSAIC_SMEM.finditer(text)]
  if not sizes:
    raise ValueError("no dynamic_shared_memory_size constant in the Mosaic GPU log")
  return max(sizes)


def entry_functions(ptx: str) -> list[str]:
  return re.findall(r"\.entry\s+(\w+)\s*\(", ptx)


def check_result(cfg: Config, r: dict, smem_limit: int) -> list[str]:
  """Failures of one compiled kernel against its expectations ([] = pass)."""
  fails = []
  if r["spill_stores"] or r["spill_loads"]:
    fails.append(f"register spills: {r['spill_stores']} B stored, {r['spill_loads']} B loaded")
  if r["registers"] > 255:
    fails.append(f"{r['registers']} registers > 255")
  if r["smem"] > smem_limit:
    fails.append(f"shared memory {r['smem']} B > {smem_limit} B")
  if cfg.kernel == "mosaic_ws":
    # Warp specialization: the producer gives registers back and the consumers take
    # them (setmaxnreg); the producer loads by TMA.
    structure = r.get("structure", {})
    if not structure.get("setmaxnreg"):
      fails.append("no setmaxnreg in the PTX: not warp-specialized")
    if not structure.get("tma"):
      fails.append("no TMA (cp.async.bulk.tensor) in the PTX")
  want = expected_mma(cfg)
  mma = r.get("mma", {})
  if want is None:
    if mma:
      fails.append(f"unexpected tensor-core instructions {sorted(mma)}")
  else:
    if not any(re.match(want, op) for op in mma):
      fails.append(f"no {want.strip('^')} in the SASS (found {sorted(mma) or 'no tensor-core ops'})")
    stray = [op for op in mma if op.startswith("HMMA")]
    if stray:
      fails.append(f"16-bit tensor-core ops {stray}: 8-bit operands were converted")
  return fails


# ------------------------------------------------------------- compiling one config (child)

def _compile_child(cfg: Config, dump: Path) -> dict:
  """Runs in a fresh process with JAX_PLATFORMS=cpu: lowers and compiles one kernel for a
  compile-only device; returns where its PTX is and its shared memory."""
  import jax
  import jax.numpy as jnp
  from jax.experimental import topologies

  sys.path.insert(0, str(ROOT))
  import pallas_kernels as pk
  from pallas_kernels import matmul as tmm

  topo = topologies.get_topology_desc(cfg.target, "cuda", target_config=_TARGET_CONFIG.format(
      **TARGETS[cfg.target]), topology="1x1x1")
  sharding = jax.sharding.SingleDeviceSharding(topo.devices[0])
  dt = jnp.dtype(QTYPES[cfg.qtype])
  m = cfg.m

  def s(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  if cfg.kernel == "quantize":
    f = lambda x, inv: pk.quantize_rows(x, inv, dtype=dt)
    args = (s((m, K), jnp.bfloat16), s((K,), jnp.float32))
  elif cfg.kernel == "mosaic_ws":  # opt-in: backend="mosaic", blocks=pk.WsBlocks()
    f = lambda x, w, sx, sw, b: pk.scaled_matmul(x, w, sx, sw, b, out_dtype=jnp.bfloat16, backend="mosaic",
                                                 blocks=pk.WS_BLOCKS)
    args = (s((m, K), dt), s((N, K), dt), s((m,), jnp.float32), s((N,), jnp.float32), s((N,), jnp.float32))
  else:
    blocks = tmm.default_blocks(m, N, K, dt) if cfg.kernel == "triton" else None
    f = lambda x, w, sx, sw, b: pk.scaled_matmul(x, w, sx, sw, b, out_dtype=jnp.bfloat16,
                                                 backend=cfg.kernel, blocks=blocks)
    args = (s((m, K), dt), s((N, K), dt), s((m,), jnp.float32), s((N,), jnp.float32), s((N,), jnp.float32))
  jax.jit(f).trace(*args).lower().compile(compiler_options={"xla_dump_to": str(dump / "xla")})

  info = {}
  if cfg.kernel.startswith("mosaic"):
    ptx = sorted((dump / "mosaic").glob("*.ptx"))
    logs = sorted((dump / "mosaic").glob("*.mlir-passes.log"))
    info["smem"] = parse_mosaic_smem(logs[0].read_text(errors="replace")) if logs else -1
    for log in logs:
      log.unlink()  # ~22 MB of pass log per kernel (0.10.2)
  else:
    ptx = [p for p in sorted((dump / "xla").glob("*.ptx")) if entry_functions(p.read_text())]
    thunks = "".join(p.read_text() for p in (dump / "xla").glob("*thunk_sequence.txt"))
    smem = parse_thunk_smem(thunks)
    info["smem_by_kernel"] = smem
  if len(ptx) != 1:
    raise RuntimeError(f"expected one PTX with an entry function, found {[p.name for p in ptx]}")
  info["ptx"] = str(ptx[0])
  return info


# --------------------------------------------------------------------------- orchestration

def _tool(name: str, search: list[Path]) -> str:
  for d in search:
    if (d / name).exists():
      return str(d / name)
  found = shutil.which(name)
  if found is None:
    raise SystemExit(f"gpu_check: {name} not found (run `make gpu-check`, which installs it)")
  return found


def _cuda_bin() -> Path:
  """The ptxas wheel's bin folder (jax's cuda_path): Mosaic GPU finds ptxas on PATH and
  XLA under cuda_path; putting it first makes both use one ptxas."""
  import importlib.util
  spec = importlib.util.find_spec("nvidia.cuda_nvcc")
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit("gpu_check: nvidia-cuda-nvcc-cu12 is not installed (run `make gpu-check`)")
  return Path(list(spec.submodule_search_locations)[0]) / "bin"


def run_one(cfg: Config, work: Path, tools_dir: Path, timeout: float = 300) -> dict:
  dump = work / f"{cfg.target}-{cfg.kernel}-{cfg.qtype}-{cfg.shape}"
  (dump / "mosaic").mkdir(parents=True, exist_ok=True)
  cuda_bin = _cuda_bin()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PATH": f"{cuda_bin}{os.pathsep}{os.environ.get('PATH', '')}",
         "MOSAIC_GPU_DUMP_TO": str(dump / "mosaic"), "MOSAIC_GPU_DUMP_PTX": "1",
         "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
  t0 = time.time()
  proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(dataclasses.asdict(cfg)), str(dump)],
                        env=env, capture_output=True, text=True, timeout=timeout)
  result = dict(config=cfg, seconds=0.0, error=None)
  last = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
  if proc.returncode != 0 or not last or not last[0].startswith("{"):
    result["error"] = f"compile failed (rc={proc.returncode}): " + (proc.stderr.strip()[-1500:] or proc.stdout[-1500:])
    return result
  info = json.loads(last[0])
  ptx = Path(info["ptx"])
  arch = cfg.target
  cubin = ptx.with_suffix(".cubin")
  ptxas = subprocess.run([str(cuda_bin / "ptxas"), f"-arch={arch}", "-v", str(ptx), "-o", str(cubin)],
                         capture_output=True, text=True)
  if ptxas.returncode != 0:
    result["error"] = f"ptxas failed: {ptxas.stderr[-1500:]}"
    return result
  funcs = parse_ptxas(ptxas.stdout + ptxas.stderr)
  if len(funcs) != 1:
    result["error"] = f"expected one kernel in the PTX, ptxas reports {sorted(funcs)}"
    return result
  (name, stats), = funcs.items()
  ptx_text = ptx.read_text()
  structure = {"setmaxnreg": "setmaxnreg." in ptx_text, "tma": "cp.async.bulk.tensor" in ptx_text}
  cuobjdump = _tool("cuobjdump", [tools_dir])
  sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True,
                        env={**os.environ, "PATH": f"{Path(cuobjdump).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
  if sass.returncode != 0 or "Function" not in sass.stdout:
    result["error"] = f"cuobjdump -sass failed: {sass.stderr[-1500:]}"
    return result
  smem = info.get("smem")
  if smem is None:
    by_kernel = info.get("smem_by_kernel", {})
    smem = by_kernel.get(name, max(by_kernel.values(), default=0))
  result.update(kernel_name=name, structure=structure, smem=max(int(smem), stats["smem"]), mma=dict(parse_sass_mma(sass.stdout)),
                seconds=time.time() - t0, **{k: v for k, v in stats.items() if k != "smem"})
  return result


def registry_rows() -> list[tuple[str, str, str, str]]:
  """(target, qtype, shape, backend) that backend='auto' picks, and the sm_80 fp8 refusal
  as ("sm_80", "fp8", "triton", "refused: why")."""
  import importlib
  import types
  import warnings
  # The registry without the package's __init__ (which imports flax, absent from this venv):
  # a bare package object whose modules load from the source tree.
  if str(ROOT) not in sys.path:  # (backends.py reads pallas_kernels/reference.py's formulas)
    sys.path.insert(0, str(ROOT))
  if "actquant_jax" not in sys.modules:
    pkg = types.ModuleType("actquant_jax")
    pkg.__path__ = [str(ROOT / "actquant_jax")]
    sys.modules["actquant_jax"] = pkg
  backends = importlib.import_module("actquant_jax.backends")
  rows = []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the sm_80 fp8 fallback to XLA warns; shown in the table
    for target, t in TARGETS.items():
      for qtype, dtype in QTYPES.items():
        for shape, m in SHAPES.items():
          p = backends.Problem(k=K, qtype=dtype, m=m, n=N, platform="gpu",
                               compute_capability=(t["major"], t["minor"]))
          try:
            rows.append((target, qtype, shape, backends.choose("auto", p).backend))
          except backends.BackendUnavailableError as e:
            rows.append((target, qtype, shape, f"error: {e}"))
  p = backends.Problem(k=K, qtype="float8_e4m3fn", m=2048, n=N, platform="gpu", compute_capability=(8, 0))
  try:
    backends.choose("triton", p)
    rows.append(("sm_80", "fp8", "triton", "FAIL: the registry accepted fp8 on sm_80"))
  except backends.BackendUnavailableError as e:
    rows.append(("sm_80", "fp8", "backend='triton'", f"refused: {e}"))
  return rows


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--child", nargs=2, metavar=("CONFIG_JSON", "DUMP_DIR"), help=argparse.SUPPRESS)
  ap.add_argument("--jobs", type=int, default=2)
  ap.add_argument("--tools", default=os.environ.get("GPU_CHECK_TOOLS", str(ROOT / ".venv-gpucheck" / "cuda-tools")),
                  help="folder holding cuobjdump and nvdisasm (pip install --target)")
  ap.add_argument("--only", default="", help="substring filter on 'target kernel qtype shape'")
  ap.add_argument("--keep", help="keep the dumps in this folder")
  args = ap.parse_args(argv)

  if args.child:
    cfg = Config(**json.loads(args.child[0]))
    print(json.dumps(_compile_child(cfg, Path(args.child[1]))))
    return 0

  import jax
  t_start = time.time()
  tools_dir = Path(args.tools) / "nvidia" / "cu13" / "bin"
  configs = [c for c in all_configs() if args.only in f"{c.target} {c.kernel} {c.qtype} {c.shape}"]
  work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gpu_check_"))
  work.mkdir(parents=True, exist_ok=True)
  try:
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
      results = list(pool.map(lambda c: run_one(c, work, tools_dir), configs))
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)

  failures = 0
  print(f"\nDeviceless GPU compile check (jax {jax.__version__}; N = K = {N}, bf16 out)\n")
  print("| kernel | target | registers | spills (B) | smem (KiB) | tensor-core SASS | result |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for r in results:
    cfg = r["config"]
    if r["error"]:
      failures += 1
      print(f"| {cfg.label()} | {cfg.target} | - | - | - | - | FAIL: {r['error'].splitlines()[-1][:200]} |")
      print(r["error"], file=sys.stderr)
      continue
    fails = check_result(cfg, r, TARGETS[cfg.target]["smem_optin"])
    failures += bool(fails)
    mma = ", ".join(f"`{op}` x{n}" for op, n in sorted(r["mma"].items())) or "none (no matmul)"
    print(f"| {cfg.label()} | {cfg.target} | {r['registers']} | {r['spill_stores'] + r['spill_loads']} | "
          f"{r['smem'] / 1024:.0f} | {mma} | {'ok' if not fails else 'FAIL: ' + '; '.join(fails)} |")

  print("\nbackend='auto' per target and shape (actquant_jax/backends.py), and its kernel above:\n")
  print("| target | qtype | shape | auto picks | its kernel compiled to |")
  print("| --- | --- | --- | --- | --- |")
  by_cfg = {(r["config"].target, r["config"].kernel, r["config"].qtype, r["config"].shape): r for r in results}
  for target, qtype, shape, backend in registry_rows():
    r = by_cfg.get((target, backend, qtype, shape))
    if backend.startswith(("error", "FAIL")):
      failures += 1
      note = "FAIL"
    elif backend.startswith("refused"):
      note = "ok (the library refuses it with this error)"
    elif backend in ("triton", "mosaic"):
      if r is None and args.only:
        note = "(filtered out by --only)"
      elif r is None or r["error"] or check_result(r["config"], r, TARGETS[target]["smem_optin"]):
        failures += 1
        note = "FAIL: not compiled, or failed above"
      else:
        note = ", ".join(f"`{op}`" for op in sorted(r["mma"]))
    else:
      note = "XLA's dot (warned once)"
    print(f"| {target} | {qtype} | {shape} | {backend[:200]} | {note} |")
  print(f"\n{len(results)} kernels compiled in {time.time() - t_start:.0f} s; "
        f"{'all checks passed' if not failures else f'{failures} FAILED'}")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
