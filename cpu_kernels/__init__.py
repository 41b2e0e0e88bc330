"""Native CPU kernels for W8A8 off the GPU (s8_gemm.cc), called from jitted code as XLA
FFI custom calls: an int8 GEMM with AVX512-VNNI or AVX2 (s8_gemm), the dynamic per-row
int8 quantize pass (quantize_rows: one read of x where XLA makes a reduction and an
elementwise fusion, each recomputing x's producer), and the non-finite-row scan of an
int8 x (marked_rows).

XLA's own int8 dot on CPU reaches only about 1.3-1.7x its f32 GEMM rate with VNNI, and
less than its f32 rate on AVX2-only CPUs (measured on a Zen 1: a 1 x 576 x 49152 GEMV
7x slower than f32); vpdpbusd does 4x the multiply-adds of an f32 FMA per instruction,
AVX2's vpmaddubsw + vpmaddwd 2x. Both paths compute exactly what
`pallas_kernels.reference.accumulate_ref` (XLA's int8 dot) computes; `int8_isa()` says
which one runs.

The shared library is built with the package (setup.py: `cpu_kernels/_s8_gemm*.so`,
against the build env's jaxlib FFI headers, whose version is compiled in). Where that
library is missing or was built against another jaxlib, it is compiled on first use with
the system C++ compiler (`$CXX`, else c++ / g++) and cached under `$ACTQUANT_CACHE_DIR`
(default ~/.cache/actquant_jax) keyed by the source, jaxlib and compiler. Where neither
works, the CPU is not x86-64 or lacks AVX2, `available()` is False and
`unavailable_reason()` says why; w8a8_dot then uses XLA's dot and warns once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.errors import BackendUnavailableError, KernelArgumentError, KernelTypeError

_SOURCE = Path(__file__).with_name("s8_gemm.cc")
_TARGET = "actquant_s8_gemm"
_MARKED_TARGET = "actquant_marked_rows"
_QUANTIZE_TARGET = "actquant_quantize_rows"
_ATTENTION_TARGETS = {jnp.dtype(jnp.int8): "actquant_decode_attention_s8",
                      jnp.dtype(jnp.float32): "actquant_decode_attention_f32"}
MAX_K = 65536  # the u8-offset intermediate 255 * 128 * K stays below 2^31


def _cache_dir() -> Path:
  return Path(os.environ.get("ACTQUANT_CACHE_DIR", Path.home() / ".cache" / "actquant_jax"))


def _compiler() -> str | None:
  for c in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if c and shutil.which(c):
      return c
  return None


def _jaxlib_version() -> str:
  return importlib.metadata.version("jaxlib")


def _prebuilt() -> Path | None:
  """The library built with the package (setup.py), if there is one.
  ACTQUANT_IGNORE_PREBUILT=1 acts as if there were none (tests of the fallbacks)."""
  if os.environ.get("ACTQUANT_IGNORE_PREBUILT") == "1":
    return None
  found = sorted(Path(__file__).parent.glob("_s8_gemm*.so"))
  return found[0] if found else None


def _stamp(lib, symbol: str) -> str:
  try:
    fn = getattr(lib, symbol)
  except AttributeError:
    return "unknown"
  fn.restype = ctypes.c_char_p
  return fn().decode()


def _build() -> Path:
  """The compiled library, compiling it if this source/jaxlib pair has not been built."""
  cxx = _compiler()
  if cxx is None:
    raise BackendUnavailableError("cpu_kernels: no C++ compiler found to build s8_gemm.cc; install one "
                                  "(c++ / g++ / clang++) or set $CXX")
  src = _SOURCE.read_bytes()
  jaxlib_version = _jaxlib_version()
  key = hashlib.sha256(src + jax.__version__.encode() + jaxlib_version.encode() + cxx.encode()).hexdigest()[:16]
  lib = _cache_dir() / f"s8_gemm-{key}.so"
  if lib.exists():
    return lib
  lib.parent.mkdir(parents=True, exist_ok=True)
  # Built under a temporary name and renamed: concurrent builders (pytest -n) never see a
  # half-written library.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
  os.close(fd)
  cmd = [cxx, "-O3", "-std=c++17", "-fopenmp-simd", "-fPIC", "-shared", "-w", f"-I{jax.ffi.include_dir()}",
         f'-DACTQUANT_JAXLIB_VERSION="{jaxlib_version}"', str(_SOURCE), "-o", tmp]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    os.unlink(tmp)
    raise BackendUnavailableError(f"compiling {_SOURCE.name} failed:\n{' '.join(cmd)}\n{proc.stderr[-2000:]}")
  os.replace(tmp, lib)
  return lib


def _open_library() -> tuple[ctypes.CDLL, str]:
  """(library, how it was obtained): the install-time build when it matches this jaxlib,
  else a first-use build; a mismatched install-time build only as the last resort."""
  prebuilt = _prebuilt()
  stale = None
  if prebuilt is not None:
    lib = ctypes.cdll.LoadLibrary(str(prebuilt))
    built = _stamp(lib, "actquant_built_against_jaxlib")
    same_source = _stamp(lib, "actquant_source_sha256") == hashlib.sha256(_SOURCE.read_bytes()).hexdigest()
    if built == _jaxlib_version() and same_source:
      return lib, f"built at install time ({prebuilt.name}, jaxlib {built})"
    stale = (lib, built)
  try:
    path = _build()
  except RuntimeError as e:
    if stale is None:
      raise
    import warnings
    warnings.warn(f"cpu_kernels: using {prebuilt.name}, built against jaxlib {stale[1]} while jaxlib "
                  f"{_jaxlib_version()} runs (rebuilding failed: {str(e).splitlines()[0]})", RuntimeWarning)
    return stale[0], f"built at install time against jaxlib {stale[1]} (mismatch)"
  return ctypes.cdll.LoadLibrary(str(path)), f"built on first use ({path})"


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
  """(the library, "") or (None, why not); registers the kernels any x86-64 CPU runs."""
  if platform.machine().lower() not in ("x86_64", "amd64"):
    return None, f"not an x86-64 CPU ({platform.machine()})"
  global _how
  try:
    lib, _how = _open_library()
  except (OSError, RuntimeError) as e:
    return None, str(e)
  jax.ffi.register_ffi_target(_ATTENTION_TARGETS[jnp.dtype(jnp.int8)], jax.ffi.pycapsule(lib.ActquantDecodeAttentionS8),
                              platform="cpu")
  jax.ffi.register_ffi_target(_ATTENTION_TARGETS[jnp.dtype(jnp.float32)],
                              jax.ffi.pycapsule(lib.ActquantDecodeAttentionF32), platform="cpu")
  return lib, ""


@functools.cache
def _load() -> tuple[bool, str]:
  """The int8 GEMM kernels: the library, and AVX512-VNNI or AVX2."""
  lib, why = _library()
  if lib is None:
    return False, why
  if not lib.actquant_cpu_int8_isa():
    return False, "the CPU has neither AVX512-VNNI (avx512f/bw/vl/vnni) nor AVX2 + FMA"
  jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.ActquantS8Gemm), platform="cpu")
  jax.ffi.register_ffi_target(_MARKED_TARGET, jax.ffi.pycapsule(lib.ActquantMarkedRows), platform="cpu")
  jax.ffi.register_ffi_target(_QUANTIZE_TARGET, jax.ffi.pycapsule(lib.ActquantQuantizeRows), platform="cpu")
  return True, ""


_how = ""


def library_origin() -> str:
  """How the native library was obtained ("built at install time (...)" or "built on
  first use (...)"); "" when it is not available."""
  _library()
  return _how


def available() -> bool:
  """True where s8_gemm can run: x86-64 with AVX512-VNNI or AVX2, and the library built."""
  return _load()[0]


def int8_isa() -> str:
  """The instructions the int8 kernels run on here: "avx512-vnni", "avx2" (also where
  ACTQUANT_CPU_NO_VNNI=1 was set when the library loaded: tests), or "" (unavailable)."""
  lib = _library()[0]
  return {2: "avx512-vnni", 1: "avx2"}.get(lib.actquant_cpu_int8_isa(), "") if _load()[0] else ""


def unavailable_reason() -> str:
  """Why available() is False ("" when it is True)."""
  return _load()[1]


def s8_gemm(xq: jax.Array, wq: jax.Array, layer: jax.Array | int | None = None) -> tuple[jax.Array, jax.Array]:
  """(acc, marked): acc = xq (M, K) int8 @ wq (N, K)^T as (M, N) int32, exact (K <= MAX_K);
  marked (M,) f32 = NaN for rows of xq holding reference.NONFINITE_MARK (-128), else 0.
  wq may be a stack (L, N, K) of scanned layers' weights with `layer` (an int32 scalar,
  traced or not) the one to use: read in place (an XLA slice of it is a copy of the
  weight, every step of a scan). A layer out of range is an error of the call. CPU only."""
  (acc,), marked = s8_gemm_group(xq, (wq,), layer)
  return acc, marked


def s8_gemm_group(xq: jax.Array, wqs, layer: jax.Array | int | None = None) -> tuple[tuple[jax.Array, ...], jax.Array]:
  """s8_gemm of one xq with several weights (q/k/v, gate/up) in one native call: ((acc_g
  (M, N_g) int32 for each wq_g), marked). At a few rows their work shares one parallel
  loop. Every wq_g is (N_g, K), or every one a stack (L, N_g, K) read at `layer`."""
  wqs = tuple(wqs)
  if not wqs:
    raise KernelArgumentError("s8_gemm_group: expected at least one weight")
  for wq in wqs:
    if xq.ndim != 2 or wq.ndim not in (2, 3) or xq.shape[1] != wq.shape[-1]:
      raise KernelArgumentError(f"s8_gemm: expected xq (M, K) and wq (N, K) or (L, N, K), got {xq.shape} and "
                                f"{wq.shape}: reshape xq to 2-D and pass the weight as (N, K) with the same K")
    if (wq.ndim == 3) != (layer is not None):
      raise KernelArgumentError(f"s8_gemm: a stacked wq (L, N, K) needs layer=, a 2-D one none; got wq {wq.shape} "
                                f"and layer={layer!r}")
    if xq.dtype != jnp.int8 or wq.dtype != jnp.int8:
      raise KernelTypeError(f"s8_gemm: expected int8 operands xq and wq, got {xq.dtype} and {wq.dtype}; "
                            "quantize them first (quantize_rows, actquant_jax.quantize_kernel)")
  if xq.shape[1] > MAX_K:
    raise KernelArgumentError(f"s8_gemm: K = {xq.shape[1]} > {MAX_K} could overflow the int32 accumulator; "
                              "split K, or use actquant_jax.w8a8_dot (exact chunks)")
  ok, why = _load()
  if not ok:
    raise BackendUnavailableError(f"s8_gemm is not available here: {why}; check cpu_kernels.available() "
                                  "first, or use actquant_jax.w8a8_dot (backend='auto')")
  if layer is not None and not jnp.issubdtype(jnp.result_type(layer), jnp.integer):
    raise KernelTypeError(f"s8_gemm: layer must be an integer (the scan's index), got {jnp.result_type(layer)}")
  layer = jnp.asarray(0 if layer is None else layer, jnp.int32)
  if layer.shape != ():
    raise KernelArgumentError(f"s8_gemm: layer must be a scalar, got shape {layer.shape}")
  out = (jax.ShapeDtypeStruct((xq.shape[0],), jnp.float32),
         *(jax.ShapeDtypeStruct((xq.shape[0], wq.shape[-2]), jnp.int32) for wq in wqs))
  marked, *accs = jax.ffi.ffi_call(_TARGET, out, vmap_method="sequential")(xq, layer, *wqs)
  return tuple(accs), marked


def marked_rows(xq: jax.Array) -> jax.Array:
  """(M,) f32: NaN for rows of int8 xq (M, K) holding reference.NONFINITE_MARK, else 0 --
  s8_gemm's second output alone, for an xq that another GEMM consumes. CPU only."""
  if xq.ndim != 2 or xq.dtype != jnp.int8:
    raise KernelArgumentError(f"marked_rows: expected an int8 (M, K) array xq, got {xq.dtype} {xq.shape}")
  ok, why = _load()
  if not ok:
    raise BackendUnavailableError(f"marked_rows is not available here: {why}; check cpu_kernels.available() "
                                  "first, or use reference.marked_rows_ref")
  return jax.ffi.ffi_call(_MARKED_TARGET, jax.ShapeDtypeStruct(xq.shape[:1], jnp.float32),
                          vmap_method="sequential")(xq)


def quantize_rows(x: jax.Array, inv_smooth: jax.Array | None = None,
                  rotation: tuple[jax.Array, jax.Array] | None = None,
                  scale: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Per-row int8 quantization of f32 x (M, K), one native pass over memory: (xq (M, K)
  int8, sx (M,) f32), bit for bit reference.quantize_rows_ref(x, inv_smooth, scale=scale)
  (int8): dynamic per row (scale None) or static (scale: a scalar; a row beyond it gets
  its own). A row holding NaN or Inf gets sx = NaN and every element
  reference.NONFINITE_MARK. CPU only.

  rotation: (signs (K,), hm (m, m)) f32, m dividing K: each row x * inv_smooth is first
  multiplied by R = diag(signs) (hm kron H_p / sqrt(p)), p = K / m, H_p Sylvester's
  Hadamard matrix (actquant_jax.rotation's R; the same up to f32 rounding)."""
  if x.ndim != 2 or x.dtype != jnp.float32:
    raise KernelArgumentError(f"quantize_rows: expected a float32 (M, K) array x, got {x.dtype} {x.shape}; "
                              "pass x.reshape(-1, K).astype(jnp.float32)")
  if inv_smooth is None:
    inv_smooth = jnp.ones(x.shape[1:], jnp.float32)  # |1| / 127 and 1 * (1 / sx): the same numbers
  elif inv_smooth.shape != x.shape[1:] or inv_smooth.dtype != jnp.float32:
    raise KernelArgumentError(f"quantize_rows: inv_smooth must be float32 ({x.shape[1]},), got {inv_smooth.dtype} "
                     f"{inv_smooth.shape}")
  if rotation is None:
    signs, hm = jnp.zeros((0,), jnp.float32), jnp.zeros((0, 0), jnp.float32)
  else:
    signs, hm = (jnp.asarray(a, jnp.float32) for a in rotation)
    m = hm.shape[0] if hm.ndim == 2 else 0
    p = x.shape[1] // m if m else 0
    if signs.shape != x.shape[1:] or hm.shape != (m, m) or m == 0 or m * p != x.shape[1] or p & (p - 1):
      raise KernelArgumentError(f"quantize_rows: rotation must be (signs ({x.shape[1]},), hm (m, m)) with "
                                f"K = {x.shape[1]} = m * 2^j; got signs {signs.shape}, hm {hm.shape}")
  if scale is None:
    scale = jnp.zeros((0,), jnp.float32)
  elif jnp.size(scale) != 1:
    raise KernelArgumentError(f"quantize_rows: scale must be one static scale (a scalar), got shape {jnp.shape(scale)}")
  else:
    scale = jnp.asarray(scale, jnp.float32).reshape(1)
  ok, why = _load()
  if not ok:
    raise BackendUnavailableError(f"quantize_rows is not available here: {why}; check cpu_kernels.available() "
                                  "first, or use reference.quantize_rows_ref")
  out = (jax.ShapeDtypeStruct(x.shape, jnp.int8), jax.ShapeDtypeStruct(x.shape[:1], jnp.float32))
  return tuple(jax.ffi.ffi_call(_QUANTIZE_TARGET, out, vmap_method="sequential")(x, inv_smooth, signs, hm, scale))


def attention_available() -> bool:
  """True where decode_attention can run: x86-64 with the library built (any vector ISA)."""
  return _library()[0] is not None


def attention_unavailable_reason() -> str:
  return _library()[1]


def decode_attention(q: jax.Array, kt: jax.Array, v: jax.Array, k_scale: jax.Array | None,
                     v_scale: jax.Array | None, pos: jax.Array, window, *, scale: float,
                     softcap: float | None = None, layer=None) -> jax.Array:
  """Softmax attention of one query token per sequence over its KV cache, the cache read
  once in its own dtype: q (B, KV, G, D) f32, keys kt (B, KV, D, S) and values v (B, KV,
  S, D), int8 (with k_scale / v_scale (B, KV, S) f32: a scale per key / value vector) or
  f32 (scales None); pos (B,) the query's position (keys 0..pos seen); window: keys >
  pos - window only (None, or an int / int32 scalar; <= 0 or past any position: none).
  Scores are q . k * scale, soft-capped tanh(s / softcap) * softcap if softcap. layer:
  the cache arrays carry a leading layer axis (L, ...) and this (int / int32 scalar) one is
  read, in place. -> the normalized context (B, KV, G, D) f32. CPU only."""
  if layer is None:
    kt, v = kt[None], v[None]
    k_scale, v_scale = (None if a is None else a[None] for a in (k_scale, v_scale))
    layer = 0
  dt = jnp.dtype(kt.dtype)
  if dt not in _ATTENTION_TARGETS or v.dtype != dt or q.dtype != jnp.float32:
    raise KernelTypeError(f"decode_attention: q must be float32 and kt/v int8 or float32 (both the same), got "
                          f"{q.dtype}, {kt.dtype}, {v.dtype}")
  b, kv, g, d = q.shape
  n, s = kt.shape[0], kt.shape[-1]
  if kt.shape != (n, b, kv, d, s) or v.shape != (n, b, kv, s, d) or pos.shape != (b,):
    raise KernelArgumentError(f"decode_attention: expected q (B, KV, G, D), kt ([L,] B, KV, D, S), v ([L,] B, KV, "
                              f"S, D), pos (B,); got {q.shape}, {kt.shape}, {v.shape}, {pos.shape}")
  if (k_scale is None) != (dt == jnp.float32) or (v_scale is None) != (dt == jnp.float32):
    raise KernelArgumentError("decode_attention: k_scale and v_scale: pass both for int8 kt/v, neither for float32")
  if not attention_available():
    raise BackendUnavailableError(f"decode_attention is not available here: {attention_unavailable_reason()}")
  empty = jnp.zeros((0,), jnp.float32)
  ks = empty if k_scale is None else k_scale.astype(jnp.float32)
  vs = empty if v_scale is None else v_scale.astype(jnp.float32)
  w = jnp.asarray(0 if window is None else window, jnp.int32).reshape(())
  call = jax.ffi.ffi_call(_ATTENTION_TARGETS[dt], jax.ShapeDtypeStruct(q.shape, jnp.float32),
                          vmap_method="sequential")
  return call(q, kt, ks, v, vs, pos.astype(jnp.int32), w, jnp.asarray(layer, jnp.int32).reshape(()),
              scale=np.float32(scale), softcap=np.float32(softcap or 0.0))
