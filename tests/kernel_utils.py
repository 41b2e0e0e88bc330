"""Helpers shared by the kernel tests: CUDA lowering on a CPU-only machine."""

import jax


def lower_for_cuda(f, *args):
  """Run the real Pallas GPU lowering (Triton / Mosaic GPU) without a GPU; returns the
  StableHLO text of the lowered module."""
  structs = [None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
  return jax.jit(f).trace(*structs).lower(lowering_platforms=("cuda",)).as_text()


def pairwise(*factors):
  """Parameter tuples where every pair of values of any two factors occurs at least once
  (greedy covering array; deterministic). For interpret-mode sweeps: each interaction of
  two settings is still run, in far fewer cases than the full cartesian product."""
  import itertools
  pairs = list(itertools.combinations(range(len(factors)), 2))
  uncovered = {(i, a, j, b) for i, j in pairs for a in range(len(factors[i])) for b in range(len(factors[j]))}
  candidates = list(itertools.product(*(range(len(f)) for f in factors)))
  rows = []
  while uncovered:
    gain = lambda r: sum((i, r[i], j, r[j]) in uncovered for i, j in pairs)
    best = max(candidates, key=gain)
    rows.append(best)
    uncovered -= {(i, best[i], j, best[j]) for i, j in pairs}
  return [tuple(f[k] for f, k in zip(factors, r)) for r in rows]


def count_quantize_passes(f, *args) -> int:
  """Activation-quantize passes traced by f (calls of the kernel stage W8A8Kernel.quantize)."""
  from actquant_jax.backends import W8A8Kernel
  calls = []
  original = W8A8Kernel.quantize
  W8A8Kernel.quantize = lambda *a, **kw: calls.append(1) or original(*a, **kw)
  try:
    jax.make_jaxpr(f)(*args)
  finally:
    W8A8Kernel.quantize = original
  return len(calls)


def run_device_worker(script: str, devices: int, xla_flags: str = "", **env) -> dict:
  """Run tests/<script> in a subprocess on `devices` forced CPU devices (the count must be
  set before JAX starts) and return the JSON its last output line holds."""
  import json
  import os
  import subprocess
  import sys
  from pathlib import Path
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {xla_flags}".strip(), **env)
  r = subprocess.run([sys.executable, str(Path(__file__).parent / script)], env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])
