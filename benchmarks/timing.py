"""Timing helpers shared by the benchmarks: median wall time of jitted calls, run side by
side in one process so ratios compare like with like."""

from __future__ import annotations

import statistics
import time

import jax


def median_seconds(f, *args, reps: int = 15, warmup: int = 2, budget_s: float = 20.0) -> float:
  """Median of `reps` timed calls of f(*args) (fewer if `budget_s` runs out)."""
  for _ in range(warmup):
    jax.block_until_ready(f(*args))
  times = []
  start = time.perf_counter()
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
    if time.perf_counter() - start > budget_s and len(times) >= 3:
      break
  return statistics.median(times)


def format_table(headers, rows, *, left_first: bool = False) -> str:
  """A markdown table; numbers right-aligned (left_first: the first column left-aligned)."""
  widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
  just = lambda i, c, w: str(c).ljust(w) if left_first and i == 0 else str(c).rjust(w)
  line = lambda cells: "| " + " | ".join(just(i, c, w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
  return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def print_table(headers, rows, *, left_first: bool = False):
  """Prints format_table(headers, rows)."""
  print(format_table(headers, rows, left_first=left_first))


def interleaved_medians(fns: dict, args: dict, rounds: int = 9, warmup: int = 1, before=None) -> dict:
  """Median seconds of each fns[name](*args[name]), timed round-robin (one call of each per
  round) so slow drifts of a shared 2-core machine hit every variant alike. `before()`, if
  given, runs untimed before every timed call (e.g. to evict the caches)."""
  for name, f in fns.items():
    for _ in range(warmup):
      jax.block_until_ready(f(*args[name]))
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, f in fns.items():
      if before is not None:
        before()
      t = time.perf_counter()
      jax.block_until_ready(f(*args[name]))
      times[name].append(time.perf_counter() - t)
  return {name: statistics.median(ts) for name, ts in times.items()}
