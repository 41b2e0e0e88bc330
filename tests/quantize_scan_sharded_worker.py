"""Worker for tests/test_scan.py::test_sharded_layer_stack_quantizes_in_place (run with
12 forced CPU devices): the linen nn.scan model's stacked params sharded over a (3, 2, 2)
mesh (layer axis, K, N) -- and with the layer axis unsharded -- quantized with
quantize_params and compared with the one-device result. Prints one JSON line."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import actquant_jax as aq  # noqa: E402
from tests import toy_models as tm  # noqa: E402
from tests.test_scan import D, L, ScanNet, _random_params  # noqa: E402


def main():
  m = ScanNet()
  cal = tm.batches(2, d=D)
  params = _random_params(jax.eval_shape(m.init, jax.random.key(0), cal[0]))
  stats = aq.calibrate(m, params, cal, progress=False)
  mesh = Mesh(np.array(jax.devices()[:12]).reshape(L, 2, 2), ("l", "k", "n"))
  out = {}
  for lead in (None, "l"):
    def rule(path, a, lead=lead):  # stacked kernels (L, K, N): (lead, k, n); the rest replicated
      name = str(getattr(path[-1], "key", path[-1]))
      return P(lead, "k", "n") if (a.ndim == 3 and name == "kernel") else P()
    specs = jax.tree_util.tree_map_with_path(rule, params)
    sharded = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                                  is_leaf=lambda s: isinstance(s, P)))
    for cfg in (aq.QuantConfig(alpha=0.5, act_mode="static", rotate=False), aq.QuantConfig(alpha="auto", rotate=False)):
      q1, q8 = aq.quantize_params(params, stats, cfg), aq.quantize_params(sharded, stats, cfg)
      equal = all(np.array_equal(np.asarray(a), np.asarray(b))
                  for a, b in zip(jax.tree.leaves(q1), jax.tree.leaves(q8)))
      want = aq.quantized_partition_specs(q8, specs)
      wrong = []

      def check(path, a, s):
        if a is not None and not a.sharding.is_equivalent_to(NamedSharding(mesh, s), a.ndim):
          wrong.append(f"{jax.tree_util.keystr(path)}: {a.sharding} != {s}")
      jax.tree_util.tree_map_with_path(check, q8, want, is_leaf=lambda v: v is None)
      stacks = sum(isinstance(v, aq.QuantizedKernel) and v.values.shape[0] == L
                   for v in jax.tree.leaves(q8, is_leaf=lambda v: isinstance(v, aq.QuantizedKernel)))
      out[f"{lead}-{cfg.alpha}-{cfg.act_mode}"] = dict(equal=equal, wrong=wrong, stacks=stacks)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
