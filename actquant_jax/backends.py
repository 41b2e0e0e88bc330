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
  CPU              int8: cpu (native GEMM, AVX512-VNNI or AVX2) where it runs, else xla (warned
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
from pallas_kernels import reference as numerics  # the formulas (no kernel code)

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
  act: str = "dynamic"  # the activations' scale: "dynamic" (per token) or "static" (per tensor)

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
    return f"{self.qtype} {self.act} M={self.m} N={self.n} K={self.k} -> {self.out_dtype} on {where}"


def _parse_cc(text) -> tuple[int, int] | None:
  try:
    major, minor = str(text).split(".")[:2]
    return int(major), int(minor)
  except (ValueError, TypeError):
    return None


def problem_for(*, k: int, qtype: str = "int8", m: int | None = None, n: int | None = None,
                out_dtype=None, interpret: bool = False, act: str = "dynamic", device=None) -> Problem:
  """The Problem for this process's default device (or `device`)."""
  if device is None:
    platform = jax.default_backend()
    device = jax.devices()[0] if platform == "gpu" else None
  else:
    platform = device.platform
  cc = _parse_cc(getattr(device, "compute_capability", None)) if platform == "gpu" else None
  out = "bfloat16" if out_dtype is None else jax.numpy.dtype(out_dtype).name
  return Problem(k=int(k), qtype=str(qtype), m=m, n=n, out_dtype=out, platform=platform,
                 compute_capability=cc, interpret=bool(interpret), cpu_amx=platform == "cpu" and cpu_has_amx(),
                 act=act)


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


def _native_cpu() -> tuple[bool, str]:
  """(whether the native CPU library runs here, why not)."""
  import cpu_kernels  # imported here: it may compile the library on first use
  return cpu_kernels.available(), cpu_kernels.unavailable_reason()


_NO_GPU_FIX = ("pass interpret=True to run the Pallas kernel on the CPU (slow; for tests), or "
               "use backend='auto'")


def _k_limit(p: Problem, name: str, max_k: int, fix: str) -> str | None:
  if p.k > max_k:
    return f"backend='{name}' takes K <= {max_k}, got {p.k}{fix}"
  return None


class XlaBackend:
  """XLA's own int8 / fp8 dot: runs anywhere. K beyond numerics.K_CHUNK is split into
  exact int32 chunks, up to numerics.MAX_K."""
  name = "xla"
  max_k = numerics.MAX_K

  def why_not(self, p: Problem) -> str | None:
    if p.interpret:
      return "interpret=True runs the Pallas kernels; it cannot be combined with backend='xla'"
    return _k_limit(p, self.name, self.max_k, ": the exact int8 accumulation of this library stops there")


class CpuBackend:
  """The native int8 GEMM (cpu_kernels; AVX512-VNNI or AVX2): one int32 accumulator per
  call; a scanned layer's weight read in place from the stack."""
  name = "cpu"
  max_k = 65536  # cpu_kernels.MAX_K: its u8-offset intermediate 255 * 128 * K stays below 2^31

  def why_not(self, p: Problem) -> str | None:
    if p.interpret:
      return "interpret=True runs the Pallas kernels; it cannot be combined with backend='cpu'"
    if p.is_fp8:
      return f"backend='cpu' is an int8 kernel; {p.qtype} runs on backend='xla'"
    if p.platform != "cpu":
      return f"backend='cpu' runs on the CPU platform; this process computes on {p.platform}"
    why = _k_limit(p, self.name, self.max_k, "; backend='xla' (or 'auto') splits K and stays exact")
    if why:
      return why
    ok, reason = _native_cpu()
    return None if ok else f"backend='cpu' is not available here: {reason}"


class TritonBackend:
  """The Pallas Triton GEMM (pallas_kernels/matmul.py): Ampere and later. int8 beyond
  numerics.K_CHUNK: its raw accumulators per K chunk, combined exactly."""
  name = "triton"
  max_k = numerics.MAX_K

  def why_not(self, p: Problem) -> str | None:
    if not p.interpret:
      if p.platform != "gpu":
        return f"backend='triton' needs a CUDA GPU and this process has none ({p.platform}); {_NO_GPU_FIX}"
      if p.compute_capability is not None and p.compute_capability < (8, 0):
        return f"backend='triton' needs sm_80 or newer, this GPU is {p.sm}"
      if p.is_fp8 and p.compute_capability is not None and p.compute_capability < (8, 9):
        return (f"{p.qtype} needs fp8 tensor cores (sm_89 Ada or sm_90 Hopper); this GPU is {p.sm}: "
                "quantize to int8 (QuantConfig(qtype='int8'))")
    return _k_limit(p, self.name, self.max_k, ": the exact int8 accumulation of this library stops there")


class MosaicBackend:
  """The Mosaic GPU wgmma GEMM (pallas_kernels/matmul_mosaic.py): Hopper only."""
  name = "mosaic"
  max_k = numerics.MAX_K

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
    return _k_limit(p, self.name, self.max_k, ": the exact int8 accumulation of this library stops there")


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


_QUANTIZERS = {"xla": "the reference formulas as XLA fusions", "cpu": "the native one-pass quantize",
               "triton": "the Pallas quantize kernel"}
_MARKS = {"scale": "a NaN row scale from the quantize pass",
          "gemm": "marked elements, flagged by the native GEMM as it reads x"}


def _stages(backend: str, requested: str, p: Problem) -> tuple[str, str]:
  """(quantizer, marks) that go with a GEMM backend.

  Pallas GEMMs take the Pallas quantize pass (Triton's: a memory-bound row pass, which
  the Mosaic path uses too). On a CPU with the native library (unless backend='xla',
  which is XLA only): int8, dynamic or static, is quantized by the native pass (XLA
  splits it into a reduction and an elementwise fusion, each recomputing x's producer:
  an erf GELU three times over on MiniLM, 10x the native pass's time; and a rotation as
  XLA einsums). Rows holding NaN/Inf: the native GEMM flags the marked rows while it
  reads x; under XLA's GEMM the native pass's NaN scale; otherwise (XLA's pass) the
  scale too."""
  if backend in ("triton", "mosaic"):
    return "triton", "scale"
  native = p.platform == "cpu" and not p.is_fp8 and requested != "xla" and _native_cpu()[0]
  quantizer = "cpu" if native else "xla"
  return quantizer, "gemm" if backend == "cpu" else "scale"


def _zero_flags(xq):
  return jax.numpy.zeros(xq.shape[:1], jax.numpy.float32)


@dataclasses.dataclass(frozen=True)
class W8A8Kernel:
  """The W8A8 matmul chosen for one problem: what runs each of its stages. Every
  platform decision is made here, once (choose); callers compose the public stages.

    quantize(x, inv_smooth, scale) -> (xq, sx)         x (M, K) float
    accumulate(xq, wq) -> (acc, flags)                  wq (N, K); acc int32 (K <= K_CHUNK) or f32
    accumulate_group(xq, wqs) -> ((acc, ...), flags)     one xq, several weights (one native call)
    epilogue(acc, sx + flags, sw, bias, out_dtype) -> y
    scaled_matmul(xq, sx, wq, sw, bias, out_dtype) -> y  accumulate + epilogue, fused where the backend fuses

  backend: the GEMM ("xla", "cpu", "triton", "mosaic"). quantizer: the activation pass
  ("xla", "cpu" native, "triton" Pallas). marks: how a row holding NaN/Inf gets a NaN
  output row ("scale": its sx is NaN; "gemm": its elements are quantized to
  numerics.NONFINITE_MARK and accumulate's flags are NaN for it).
  """

  backend: str
  quantizer: str
  marks: str
  requested: str
  problem: Problem
  rejected: tuple[tuple[str, str], ...] = ()  # (backend, why not), in preference order

  def __str__(self):
    skipped = "; ".join(f"{b}: {why}" for b, why in self.rejected)
    return (f"{self.problem.describe()}: {self.backend} GEMM, quantize by {_QUANTIZERS[self.quantizer]}, "
            f"NaN/Inf rows by {_MARKS[self.marks]}" + (f" (skipped {skipped})" if skipped else ""))

  @property
  def dtype(self):
    return jax.numpy.dtype(jax.numpy.int8 if self.problem.qtype == "int8" else jax.numpy.float8_e4m3fn)

  # -- stage 1: x -> xq, sx
  def quantize(self, x, inv_smooth=None, scale=None, *, rotate: bool = False, k_axis: str | None = None):
    """x (M, K) float -> (xq (M, K) 8-bit, sx (M,) f32) by numerics.quantize_rows_ref's
    formulas: per token (scale None) or the static scale, after multiplying by
    inv_smooth -- and, rotate=True, by the Hadamard rotation R of K (rotation.py; inside
    the native pass, else XLA ops before it). k_axis: the mesh axis x's K is split over
    (inside shard_map): row maxima and sums are reduced over it (the XLA formulas: the
    native and Pallas passes see one shard)."""
    if (scale is None) != (self.problem.act == "dynamic"):
      raise BackendError(f"this kernel was chosen for {self.problem.act} activations; "
                         f"got scale={'None' if scale is None else 'a static scale'}")
    if rotate:
      if k_axis is not None:
        raise BackendError("a rotated layer needs its whole rows: shard its K over no mesh axis")
      from actquant_jax import rotation
      if self.quantizer == "cpu":  # rotated inside the native pass (XLA's einsums: ~10 us a row at decode)
        import cpu_kernels
        inv = None if inv_smooth is None else inv_smooth.astype(jax.numpy.float32)
        signs, hm, _ = rotation.parts(x.shape[-1])
        return cpu_kernels.quantize_rows(x.astype(jax.numpy.float32), inv, rotation=(signs, hm), scale=scale)
      x = rotation.rotate_rows(x if inv_smooth is None else x.astype(jax.numpy.float32) * inv_smooth)
      inv_smooth = None
    if k_axis is not None:
      return numerics.quantize_rows_ref(x, inv_smooth, dtype=self.dtype, scale=scale,
                                        row_max=lambda v: jax.lax.pmax(v, k_axis),
                                        row_sum=lambda v: jax.lax.psum(v, k_axis))
    if self.quantizer == "cpu":
      import cpu_kernels
      inv = None if inv_smooth is None else inv_smooth.astype(jax.numpy.float32)
      return cpu_kernels.quantize_rows(x.astype(jax.numpy.float32), inv, scale=scale)
    if self.quantizer == "xla":
      return numerics.quantize_rows_ref(x, inv_smooth, dtype=self.dtype, scale=scale,
                                        nonfinite="scale" if self.marks == "scale" else "mark")
    from pallas_kernels import quantize
    return quantize.quantize_rows(x, inv_smooth, scale=scale, dtype=self.dtype, interpret=self.problem.interpret)

  # -- stage 2: xq, wq -> acc
  def _chunk(self, xq, wq, w_k_axis: int = 1):
    """One exact int32 (fp8: f32) accumulator, K <= K_CHUNK."""
    if self.backend == "xla":
      return numerics.accumulate_ref(xq, wq, w_k_axis)
    if w_k_axis != 1:
      raise BackendError(f"backend='{self.backend}' takes the weight as (N, K) (w_k_axis=1); got w_k_axis={w_k_axis}")
    if self.backend == "cpu":
      import cpu_kernels
      return cpu_kernels.s8_gemm(xq, wq)[0]
    from pallas_kernels import matmul  # the raw accumulator is the Triton kernel's (Mosaic's always scales)
    return matmul.scaled_matmul(xq, wq, None, None, backend="triton", interpret=self.problem.interpret)

  def flags(self, xq):
    """(M,) f32 added to sx: NaN for rows of xq holding numerics.NONFINITE_MARK where
    this kernel marks them (else 0)."""
    if self.marks == "scale":
      return _zero_flags(xq)
    import cpu_kernels
    return cpu_kernels.marked_rows(xq)

  def accumulate(self, xq, wq, *, w_k_axis: int = 1, k_axis: str | None = None, layer=None):
    """(acc, flags): acc = xq (M, K) @ wq (N, K)^T, int8 -> the exact integer sum (int32
    for K <= numerics.K_CHUNK, else rounded once to f32: int32 chunks combined exactly),
    fp8 -> f32; flags: see `flags`. w_k_axis=0: wq is (K, N) (XLA only; the alpha search
    contracts a weight in its own layout). k_axis: the mesh axis K is split over (inside
    shard_map): the partial sums are psum'd (as int32 halves when they could overflow),
    for an xq from quantize(..., k_axis=k_axis) (which flags rows in sx: flags are 0).
    layer: wq is a stack (L, ...) of scanned layers' weights and this is layer `layer` (a
    traced int): the native GEMM reads it in place, the others take the slice (in XLA a
    copy of the weight, every step of the scan)."""
    if layer is not None:
      if self.backend == "cpu" and w_k_axis == 1 and k_axis is None:
        import cpu_kernels
        return cpu_kernels.s8_gemm(xq, wq, layer)
      wq = wq[layer]
    chunk = functools.partial(self._chunk, w_k_axis=w_k_axis)
    if k_axis is not None:
      if self.dtype == jax.numpy.int8 and self.problem.k > numerics.K_CHUNK:
        hi, lo = numerics.accumulate_halves(xq, wq, chunk, w_k_axis=w_k_axis)
        acc = numerics.combine_acc(jax.lax.psum(hi, k_axis), jax.lax.psum(lo, k_axis))
      else:
        acc = jax.lax.psum(numerics.accumulate_chunked(xq, wq, chunk, w_k_axis=w_k_axis), k_axis)
      return acc, _zero_flags(xq)
    if self.backend == "cpu" and w_k_axis == 1:  # (K <= its max_k = K_CHUNK) it flags marked rows as it reads x
      import cpu_kernels
      return cpu_kernels.s8_gemm(xq, wq)
    return numerics.accumulate_chunked(xq, wq, chunk, w_k_axis=w_k_axis), self.flags(xq)

  def accumulate_group(self, xq, wqs, *, layer=None):
    """((acc_g for each wq_g), flags): accumulate of one xq with several weights (a group
    reading one input: q/k/v, gate/up). The native GEMM runs them as one call (at a few
    rows one parallel loop over all of them); other backends one accumulate each."""
    if self.backend == "cpu":
      import cpu_kernels
      return cpu_kernels.s8_gemm_group(xq, wqs, layer)
    accs = [self.accumulate(xq, wq, layer=layer) for wq in wqs]
    return tuple(a for a, _ in accs), accs[0][1]

  # -- stage 3: acc -> y
  @staticmethod
  def epilogue(acc, sx, sw, bias, out_dtype):
    """y = cast((acc * sw[n]) * sx[m] + bias[n], out_dtype), in f32."""
    return numerics.epilogue_ref(acc, sx, sw, bias, out_dtype)

  def scaled_matmul(self, xq, sx, wq, sw, bias=None, out_dtype=jax.numpy.float32, *, layer=None):
    """epilogue(accumulate(xq, wq)) -- one fused kernel where the backend has one.
    layer: wq is a stack of scanned layers' weights (see accumulate); sw is the layer's."""
    if self.backend == "cpu":
      acc, flags = self.accumulate(xq, wq, layer=layer)
      return self.epilogue(acc, sx + flags, sw, bias, out_dtype)
    if layer is not None:
      wq = wq[layer]
    if self.backend == "xla":
      if xq.shape[0] == 1 and self.problem.platform == "cpu":
        # XLA CPU's int8 matrix-vector product is ~15x slower than its GEMM at two rows.
        y = numerics.scaled_matmul_ref(jax.numpy.pad(xq, ((0, 1), (0, 0))), wq, jax.numpy.pad(sx, (0, 1)), sw,
                                       bias, out_dtype)
        return y[:1]
      # (Row blocks for big outputs, so the int32 accumulator stays in cache, were
      # measured: +0-10% on a lone GEMM, but -4% and +60% peak memory inside MiniLM.)
      return numerics.scaled_matmul_ref(xq, wq, sx, sw, bias, out_dtype)
    if self.dtype == jax.numpy.int8 and self.problem.k > numerics.K_CHUNK:
      # (the fused Pallas kernels keep one int32 accumulator: past K_CHUNK their raw
      # accumulators are taken per chunk and combined, then the same epilogue)
      return self.epilogue(self.accumulate(xq, wq)[0], sx, sw, bias, out_dtype)
    from pallas_kernels import matmul
    return matmul.scaled_matmul(xq, wq, sx, sw, bias, out_dtype=out_dtype, backend=self.backend,
                                interpret=self.problem.interpret)

  def dot(self, x, qk, bias=None, out_dtype=jax.numpy.float32):
    """The whole matmul of x (M, K) with a QuantizedKernel: quantize, then scaled_matmul."""
    xq, sx = self.quantize(x, qk.inv_smooth, qk.act_scale, rotate=qk.rotated)
    return self.scaled_matmul(xq, sx, qk.values, qk.scale, bias, out_dtype)


_lock = threading.Lock()
_decisions: dict[tuple[str, Problem], W8A8Kernel] = {}
_warned: set[str] = set()


def explain(p: Problem) -> dict[str, str | None]:
  """Every backend's answer for `p`: None (can run) or why not."""
  return {name: b.why_not(p) for name, b in REGISTRY.items()}


def decisions() -> list[W8A8Kernel]:
  """Every kernel chosen in this process so far (one per distinct problem)."""
  with _lock:
    return list(_decisions.values())


def choose(requested: str, p: Problem) -> W8A8Kernel:
  """The kernel for `p`; raises BackendUnavailableError naming the backend and the fix."""
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
    name, rejected = requested, ()
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
    rejected = tuple(rejected)
    if name == "xla" and rejected:
      _warn_once(f"actquant_jax: {rejected[0][1]}; w8a8_dot falls back to XLA's dot (slower). "
                 "See actquant_jax.backends.explain().")
  kernel = W8A8Kernel(name, *_stages(name, requested, p), requested, p, rejected)
  with _lock:
    if key not in _decisions:
      _decisions[key] = kernel
      logger.info("w8a8 kernel: %s", kernel)
  return _decisions[key]


def _warn_once(message: str):
  with _lock:
    if message in _warned:
      return
    _warned.add(message)
  warnings.warn(message, RuntimeWarning, stacklevel=4)
