"""Run by tests/test_sharding.py in a subprocess with 8 forced CPU devices and XLA's HLO
dump on: quantize_params on params sharded over a (2, 4) mesh, every kernel split over
both its K and its N. Prints one JSON line of findings; the test asserts on them."""

import glob
import json
import os
import re
import sys

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
DUMP = os.environ["QUANTIZE_HLO_DUMP"]
assert f"--xla_dump_to={DUMP}" in os.environ["XLA_FLAGS"]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import actquant_jax as aq  # noqa: E402
from jax._src import array as jax_array  # noqa: E402
from tests import toy_models as tm  # noqa: E402

# Every read of a jax.Array on the host (np.asarray, jax.device_get, float(), ...) goes
# through ArrayImpl._value: record what is read. (On CPU jax.transfer_guard does not see
# np.asarray, whose copy is free there; on a GPU it would be the guard's to catch.)
HOST_READS = []
_value = jax_array.ArrayImpl._value


def _recorded_value(self):
  HOST_READS.append((list(self.shape), len(self.sharding.device_set)))
  return _value.fget(self)


jax_array.ArrayImpl._value = property(_recorded_value)


def specs_for(params):
  """Every kernel split over both mesh axes (column-parallel q/k/v/fc1/head: K over data,
  N over model; row-parallel o/fc2 the other way), norm scales and biases over model."""
  def rule(path, leaf):
    names = [getattr(k, "key", str(k)) for k in path]
    layer, name = names[-2], names[-1]
    if name == "kernel":
      return P("model", "data") if layer in ("o", "fc2") else P("data", "model")
    return P() if layer in ("o", "fc2") else P("model")
  return jax.tree_util.tree_map_with_path(rule, params)


def main():
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
  m = tm.TinyGPT()
  cal = tm.batches(4)  # 256 rows: alpha="auto" searches
  # jitted: one compile instead of one per eager op (seconds in a fresh process; same values)
  params = jax.jit(lambda x: tm.with_outlier_channels(m.init(jax.random.key(0), x), tm.GPT_READERS))(cal[0])
  stats = aq.calibrate(m, params, cal, progress=False)
  specs = specs_for(params)
  sharded = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                                is_leaf=lambda x: isinstance(x, P)))
  is_qk = lambda x: isinstance(x, aq.QuantizedKernel)
  out = {"configs": {}}
  # static + auto: the alpha search, static scales, folded and run-time smoothing all run
  for name, cfg in (("int8-static-auto", aq.QuantConfig(act_mode="static", alpha="auto", rotate=False)),):
    before = set(glob.glob(os.path.join(DUMP, "*after_optimizations.txt")))
    HOST_READS.clear()
    with jax.transfer_guard("disallow"):  # no implicit transfer
      q = aq.quantize_params(sharded, stats, cfg)
    host_reads = list(HOST_READS)
    modules = sorted(set(glob.glob(os.path.join(DUMP, "*after_optimizations.txt"))) - before)
    collectives = {}
    for f in modules:
      for shape, op in re.findall(r"= (\S+) (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)\(",
                                  open(f).read()):
        collectives.setdefault(op, set()).add(shape)
    # Each array where quantized_partition_specs (the float rules mapped onto the
    # QuantizedKernel's fields) says it belongs; the other params (folded norm scales
    # included) keep their float spec.
    want = aq.quantized_partition_specs(q, specs)
    wrong, kernels = [], 0
    got_leaves = jax.tree_util.tree_flatten_with_path(q, is_leaf=is_qk)[0]
    want_leaves = jax.tree_util.tree_leaves(want, is_leaf=lambda x: is_qk(x) or isinstance(x, P))
    assert len(got_leaves) == len(want_leaves) == len(jax.tree.leaves(params)), (len(got_leaves), len(want_leaves))
    for (path, got), w in zip(got_leaves, want_leaves):
      fields = ("values", "scale", "act_scale", "inv_smooth") if is_qk(got) else (None,)
      kernels += is_qk(got)
      for field in fields:
        a, spec = (getattr(got, field), getattr(w, field)) if field else (got, w)
        if a is not None and not a.sharding.is_equivalent_to(NamedSharding(mesh, spec), a.ndim):
          wrong.append(f"{jax.tree_util.keystr(path)}.{field}: {a.sharding.spec} != {spec}")
    single = aq.quantize_params(params, stats, cfg)  # one device: the same numbers
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(single)))
    out["configs"][name] = dict(kernels=kernels, wrong_shardings=wrong, equal_to_one_device=same, host_reads=host_reads,
                                modules=[os.path.basename(f) for f in modules],
                                collectives={k: sorted(v) for k, v in collectives.items()})
  print(json.dumps(out))


if __name__ == "__main__":
  main()
