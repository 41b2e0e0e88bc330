"""More than one process: JAX's own multi-controller runtime (jax.distributed) on this
machine -- two processes on localhost, each with 2 forced CPU devices, one global mesh of
4 devices over both -- runs a W8A8 Llama tensor-parallel (weights and KV cache split over
both processes) and generates what one process on one device generates.

The processes run tests/multiprocess_worker.py (the forced device count must be set before
JAX starts, so each is a subprocess): the two of the distributed run and, at the same
time, the single-process reference.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).parent / "multiprocess_worker.py"
CANNOT_START = 77  # multiprocess_worker.CANNOT_START: jax.distributed cannot start here
TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(args, devices: int, log: Path) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  with open(log, "w") as f:  # (a file, not a pipe: a full pipe would block the worker)
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=env, stdout=f,
                            stderr=subprocess.STDOUT)


def _wait_all(procs: dict, deadline: float) -> dict:
  """Exit status of each process; the first to fail (or the deadline) kills the others --
  a peer of a dead process would wait on its collectives until jax's own timeouts."""
  codes = {}
  try:
    while len(codes) < len(procs):
      for name, p in procs.items():
        if name not in codes and p.poll() is not None:
          codes[name] = p.returncode
          if p.returncode != 0:
            return codes
      if time.monotonic() > deadline:
        return codes
      time.sleep(0.2)
    return codes
  finally:
    for name, p in procs.items():
      if p.poll() is None:
        p.kill()
        p.wait()


def _run(tmp_path: Path, attempt: int):
  """The reference and the two distributed processes, all at once. -> (exit codes, logs)."""
  out = tmp_path / f"result{attempt}.json"
  coordinator = f"127.0.0.1:{_free_port()}"
  procs, logs = {}, {}
  for name, args, devices in (
      ("reference", [out.with_suffix(".reference")], 1),
      *((f"process {i}", [out, "--process-id", i, "--num-processes", 2, "--coordinator", coordinator], 2)
        for i in (0, 1))):
    logs[name] = tmp_path / f"{name.replace(' ', '')}.{attempt}.log"
    procs[name] = _launch(args, devices, logs[name])
  codes = _wait_all(procs, time.monotonic() + TIMEOUT_S)
  return out, codes, {k: v.read_text() for k, v in logs.items()}


def test_two_processes_generate_what_one_does(tmp_path):
  for attempt in range(2):  # a second try on a fresh port (another program may take the first)
    out, codes, logs = _run(tmp_path, attempt)
    distributed = [codes.get(f"process {i}") for i in (0, 1)]
    if CANNOT_START not in distributed:
      break
  else:
    why = next(line for log in logs.values() for line in log.splitlines() if "cannot start" in line)
    pytest.skip(f"jax.distributed cannot start on this machine: {why}")
  for name, code in codes.items():
    assert code == 0, f"{name} exited with {code}:\n{logs[name][-4000:]}"
  assert len(codes) == 3, f"not finished in {TIMEOUT_S} s: {codes}\n" + "\n".join(
      f"--- {k}\n{v[-2000:]}" for k, v in logs.items())

  ref = json.loads(out.with_suffix(".reference").read_text())
  one = ref["one_device"]
  runs = [json.loads(Path(f"{out}.{i}").read_text()) for i in (0, 1)]
  for i, r in enumerate(runs):
    # one run of two processes, 2 devices each; the mesh holds all 4
    assert (r["process_index"], r["process_count"], r["devices"], r["local_devices"]) == (i, 2, 4, 2), r
    assert r["device_processes"] == [0, 1]
  a, b = runs[0]["mesh"], runs[1]["mesh"]

  # The same greedy tokens as one process on one device. Logits (the prefill's and every
  # decode step's) and the keys in the cache: the int8 x int8 -> int32 sums are exact
  # however they are split; only the f32 parts around them (norms, softmax, the
  # row-parallel o/down partial sums and their all-reduce) may add in another order.
  # Measured here: 7.2e-7 on logits of magnitude ~3.8 (a few ulps); the bound is 1e-5 of
  # the largest.
  for r in (a, b):  # each process gathered the whole result
    assert r["tokens"] == one["tokens"]
    for key in ("logits", "cache_k"):
      got, want = np.asarray(r[key]), np.asarray(one[key])
      assert got.shape == want.shape, key
      diff, bound = float(np.abs(got - want).max()), 1e-5 * float(np.abs(want).max())
      assert diff <= bound, f"{key}: max |difference| {diff} > {bound}"

  # The quantized params are bit-identical to one device's (quantized from the same
  # statistics: per-channel maxima and roundings do not depend on the split). Calibration
  # on the mesh works across processes too: its absmax agrees with one device's up to f32
  # reordering.
  assert a["qparams_digest"] == b["qparams_digest"] == one["qparams_digest"]
  assert a["calibration_absmax_rel_diff"] <= 1e-5, a["calibration_absmax_rel_diff"]

  # Split as the rules say: every quantized field where quantized_partition_specs maps the
  # float spec (Megatron: q/k/v/gate/up split over their output channels, o/down over
  # their input channels, a quarter on each device, two devices on each process) ...
  assert a["wrong_shardings"] == [], a["wrong_shardings"]
  for name, w in a["weight_shards"].items():
    layers, n, k = w["shape"]
    row_parallel = name.split("/")[1] in ("o_proj", "down_proj")
    assert w["values"] == ([layers, n, k // 4] if row_parallel else [layers, n // 4, k]), (name, w)
    assert w["scale"] == ([layers, n] if row_parallel else [layers, n // 4]) and w["local"] == 2, (name, w)
  # ... and the KV cache (L, B, kv, ...) over its 4 heads, one per device, still so after
  # the decode steps.
  kv_axis = a["cache_shape"].index(4)
  assert a["cache_shard_shape"] == [1 if i == kv_axis else n for i, n in enumerate(a["cache_shape"])], a
  assert "model" in a["cache_spec_after"], a["cache_spec_after"]
