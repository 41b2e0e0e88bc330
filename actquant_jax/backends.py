"""Which kernel runs a W8A8 matmul: a small backend registry (vLLM's scaled-mm style).

Each backend answers one question, `why_not(problem)`: None when it can run the problem,
else a sentence saying why not. `backend="auto"` walks a preference list made from the
GPU generation and the shape, takes the first backend that can run, and remembers the
decision (made once per distinct problem, logged once on the "actquant_jax" logger,
listed by `decisions()`; `explain(problem)` shows every backend's answer).

auto, per platform (numbers in the README table, proven by `make gpu-check`):
  Hopper (sm_90)   int8, M >= 64: mosaic (IGMMA wgmma)  M < 64: triton (IMMA mma.sync:
                   wgmma needs 64-row tiles, decode would pad 4x)
                   fp8, any M: mosaic (QGMMA); triton next (QGMMA for M >= 64 too)
  Ada/Ampere       triton (IMMA); fp8 needs sm_89+ (Ada), else xla
  CPU              int8: cpu (native AVX512-VNNI GEMM) where it runs, else xla (warned
                   once); with AMX-INT8 (Sapphire Rapids and later) xla from M >= 3:
                   XLA's int8 dot (YNNPACK) then outruns the VNNI kernel (2.5x at M >= 64,
                   measured), which keeps decode's M <= 2; fp8: xla
  interpret=True   triton (the Pallas kernels run on the CPU; tests)

This module imports no kernel code: asking which backend runs loads no GPU backend.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import warnings

import jax

from actquant_jax.errors import BackendError, BackendUnavailableError

logger = logging.getLogger("actquant_jax")

NAMES = ("auto", "xla", "cpu", "triton", "mosaic")
_DECODE_M = 64  # wgmma's M per warpgroup: smaller M would be padding
_AMX_NATIVE_MAX_M = 2  # on AMX CPUs the native GEMM is faster up to here (M=1: 1.6x), XLA's beyond


@dataclasses.dataclass(frozen=True)
class Problem:
  """What the choice depends on. m: rows (tokens), None where unknown; platform: a JAX
  platform name ("gpu", "cpu", "tpu"); compute_capability: (major, minor) on CUDA."""

  k: int
  qtype: str = "int8"  # "int8" or "float8_e4m3fn"
  m: int | None = None
  n: int | None = None
  out_dtype: str = "bfloat16"
  platform: str = "cpu"
  compute_capability: tuple[int, int] | None = None
  interpret: bool = False
  cpu_amx: bool = False  # the CPU has AMX-INT8 tile instructions

  @property
  def is_fp8(self) -> bool:
    return self.qtype != "int8"

  @property
  def sm(self) -> str:
    if self.compute_capability is None:
      return "unknown"
    major, minor = self.compute_capability
    return f"sm_{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")

  def describe(self) -> str:
    where = "interpret mode" if self.interpret else (
        f"{self.platform} {self.sm}" if self.platform == "gpu" else self.platform + (" (AMX)" if self.cpu_amx else ""))
    return f"{self.qtype} M={self.m} N={self.n} K={self.k} -> {self.out_dtype} on {where}"


def _parse_cc(text) -> tuple[int, int] | None:
  try:
    major, minor = str(text).split(".")[:2]
    return int(major), int(minor)
  except (ValueError, TypeError):
    return None


def problem_for(*, k: int, qtype: str = "int8", m: int | None = None, n: int | None = None,
                out_dtype=None, interpret: bool = False, device=None) -> Problem:
  """The Problem for this process's default device (or `device`)."""
  if device is None:
    platform = jax.default_backend()
    device = jax.devices()[0] if platform == "gpu" else None
  else:
    platform = device.platform
  cc = _parse_cc(getattr(device, "compute_capability", None)) if platform == "gpu" else None
  out = "bfloat16" if out_dtype is None else jax.numpy.dtype(out_dtype).name
  return Problem(k=int(k), qtype=str(qtype), m=m, n=n, out_dtype=out, platform=platform,
                 compute_capability=cc, interpret=bool(interpret), cpu_amx=platform == "cpu" and cpu_has_amx())


@functools.cache
def cpu_has_amx() -> bool:
  """Whether this machine's CPU has AMX-INT8 (Linux: its /proc/cpuinfo flags)."""
  try:
    with open("/proc/cpuinfo") as f:
      return any(line.startswith("flags") and "amx_int8" in line.split() for line in f)
  except OSError:
    return False


def _itemsize(dtype_name: str) -> int:
  return jax.numpy.dtype(dtype_name).itemsize


_NO_GPU_FIX = ("pass interpret=True to run the Pallas kernel on the CPU (slow; for tests), or "
               "use backend='auto'")


class XlaBackend:
  name = "xla"

  def why_not(self, p: Problem) -> str | None:
    if p.interpret:
      return "interpret=True runs the Pallas kernels; it cannot be combined with backend='xla'"
    return None


class CpuBackend:
  """The native AVX512-VNNI int8 GEMM (cpu_kernels)."""
  name = "cpu"

  def why_not(self, p: Problem) -> str | None:
    if p.interpret:
      return "interpret=True runs the Pallas kernels; it cannot be combined with backend='cpu'"
    if p.is_fp8:
      return f"backend='cpu' is an int8 kernel; {p.qtype} runs on backend='xla'"
    if p.platform != "cpu":
      return f"backend='cpu' runs on the CPU platform; this process computes on {p.platform}"
    import cpu_kernels  # imported here: it may compile the kernel on first use
    if p.k > cpu_kernels.MAX_K:
      return (f"backend='cpu' takes K <= {cpu_kernels.MAX_K}, got {p.k}; backend='xla' (or 'auto') "
              "splits K and stays exact")
    if not cpu_kernels.available():
      return f"backend='cpu' is not available here: {cpu_kernels.unavailable_reason()}"
    return None


class TritonBackend:
  """The Pallas Triton GEMM (pallas_kernels/matmul.py): Ampere and later."""
  name = "triton"

  def why_not(self, p: Problem) -> str | None:
    if not p.interpret:
      if p.platform != "gpu":
        return f"backend='triton' needs a CUDA GPU and this process has none ({p.platform}); {_NO_GPU_FIX}"
      if p.compute_capability is not None and p.compute_capability < (8, 0):
        return f"backend='triton' needs sm_80 or newer, this GPU is {p.sm}"
      if p.is_fp8 and p.compute_capability is not None and p.compute_capability < (8, 9):
        return (f"{p.qtype} needs fp8 tensor cores (sm_89 Ada or sm_90 Hopper); this GPU is {p.sm}: "
                "quantize to int8 (QuantConfig(qtype='int8'))")
    return None


class MosaicBackend:
  """The Mosaic GPU wgmma GEMM (pallas_kernels/matmul_mosaic.py): Hopper only."""
  name = "mosaic"

  def why_not(self, p: Problem) -> str | None:
    if p.interpret:
      return ("Pallas interpret mode cannot run the Mosaic GPU kernel (wgmma on transposed 8-bit "
              "operands); use backend='triton' with interpret=True")
    if p.platform != "gpu":
      return f"backend='mosaic' needs a Hopper GPU and this process has none ({p.platform}); {_NO_GPU_FIX}"
    if p.compute_capability is not None and p.compute_capability[0] != 9:
      return f"backend='mosaic' runs wgmma, which only Hopper (sm_90a) has; this GPU is {p.sm}"
    if p.k % 16:
      return f"K={p.k} must be a multiple of 16 (TMA needs 16-byte-aligned 8-bit rows)"
    if p.n is not None and (p.n * _itemsize(p.out_dtype)) % 16:
      return f"N={p.n} rows of {p.out_dtype} are not 16-byte aligned for the TMA store"
    return None


REGISTRY = {b.name: b for b in (XlaBackend(), CpuBackend(), TritonBackend(), MosaicBackend())}


def preference(p: Problem) -> tuple[str, ...]:
  """backend='auto''s order of preference for a problem (the first that can run wins)."""
  if p.interpret:
    return ("triton",)
  if p.platform == "gpu":
    if p.compute_capability is not None and p.compute_capability[0] == 9:
      decode = p.m is not None and p.m < _DECODE_M
      if p.is_fp8 or not decode:
        return ("mosaic", "triton", "xla")
      return ("triton", "mosaic", "xla")
    return ("triton", "xla")
  if p.platform == "cpu" and not p.is_fp8:
    if p.cpu_amx and (p.m is None or p.m > _AMX_NATIVE_MAX_M):
      return ("xla", "cpu")
    return ("cpu", "xla")
  return ("xla",)


@dataclasses.dataclass(frozen=True)
class Choice:
  backend: str
  requested: str
  problem: Problem
  rejected: tuple[tuple[str, str], ...] = ()  # (backend, why not), in preference order

  def __str__(self):
    skipped = "; ".join(f"{b}: {why}" for b, why in self.rejected)
    return f"{self.problem.describe()}: {self.backend}" + (f" (skipped {skipped})" if skipped else "")


_lock = threading.Lock()
_decisions: dict[tuple[str, Problem], Choice] = {}
_warned: set[str] = set()


def explain(p: Problem) -> dict[str, str | None]:
  """Every backend's answer for `p`: None (can run) or why not."""
  return {name: b.why_not(p) for name, b in REGISTRY.items()}


def decisions() -> list[Choice]:
  """Every choice made in this process so far (one per distinct problem)."""
  with _lock:
    return list(_decisions.values())


def choose(requested: str, p: Problem) -> Choice:
  """The backend for `p`; raises BackendUnavailableError naming the backend and the fix."""
  if requested not in NAMES:
    raise BackendError(f"backend must be one of {NAMES}, got {requested!r}")
  key = (requested, p)
  with _lock:
    if key in _decisions:
      return _decisions[key]
  if requested != "auto":
    why = REGISTRY[requested].why_not(p)
    if why is not None:
      raise BackendUnavailableError(why)
    choice = Choice(requested, requested, p)
  else:
    rejected = []
    for name in preference(p):
      why = REGISTRY[name].why_not(p)
      if why is None:
        break
      rejected.append((name, why))
    else:
      raise BackendUnavailableError(f"no backend can run {p.describe()}: " +
                                    "; ".join(f"{b}: {w}" for b, w in rejected))
    choice = Choice(name, requested, p, tuple(rejected))
    if name == "xla" and rejected:
      _warn_once(f"actquant_jax: {rejected[0][1]}; w8a8_dot falls back to XLA's dot (slower). "
                 "See actquant_jax.backends.explain().")
  with _lock:
    if key not in _decisions:
      _decisions[key] = choice
      logger.info("w8a8 backend: %s", choice)
  return choice


def _warn_once(message: str):
  with _lock:
    if message in _warned:
      return
    _warned.add(message)
  warnings.warn(message, RuntimeWarning, stacklevel=4)
