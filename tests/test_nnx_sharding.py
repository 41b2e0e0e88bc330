"""nnx: after quantize_model, the usual placement -- nnx.get_partition_spec (the Params'
`out_sharding` annotations), jax.device_put, nnx.update -- shards the QuantizedKernels as
quantized_partition_specs maps the float specs, and the model runs quantized on the mesh."""

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

import actquant_jax as aq
from actquant_jax.sharding import QuantizedParam
from tests.kernel_utils import run_device_worker


def test_partition_spec_of_a_quantized_param():
  # one device: the specs only
  x = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
  with nnx.use_eager_sharding(False):
    m = nnx.Linear(8, 4, kernel_metadata={"out_sharding": ("data", "model")}, rngs=nnx.Rngs(0))
  stats = aq.calibrate(m, None, [jnp.asarray(x)], progress=False)
  aq.quantize_model(m, stats, aq.QuantConfig(alpha=0.5, act_mode="static", rotate=False), backend="xla")
  assert type(m.kernel) is QuantizedParam and isinstance(m.kernel, nnx.Param)
  assert m.kernel.get_metadata("out_sharding") == ("data", "model")  # the float annotation, kept
  specs = nnx.get_partition_spec(nnx.state(m))
  s = specs["kernel"].get_value()
  assert isinstance(s, aq.QuantizedKernel)
  assert (s.values, s.scale, s.act_scale, s.inv_smooth) == (P("model", "data"), P("model"), P(), P("data"))
  assert specs["bias"].get_value() == P()
  # the model still runs quantized, and its graph round-trips
  y = m(jnp.asarray(x))
  g, st = nnx.split(m)
  np.testing.assert_array_equal(np.asarray(nnx.merge(g, st)(jnp.asarray(x))), np.asarray(y))


def test_nnx_placement_on_a_four_device_mesh():
  # A subprocess: the forced device count must be set before JAX starts.
  result = run_device_worker("nnx_sharding_worker.py", 4)
  assert set(result) == {"unsharded-then-placed", "created-sharded"}
  for name, r in result.items():
    assert r["param_class"] == "QuantizedParam" and r["all_quantized"], (name, r)
    assert r["metadata"] == [None, "model"], (name, r)
    assert r["up_specs"] == ["P('model', None)", "P('model',)", "P(None,)"], (name, r)
    # values (N, K): the float kernel's spec transposed; scales: the output axis's
    assert r["shardings"] == {"up.values": ["model", None], "up.scale": ["model"], "up.inv_smooth": [None],
                              "down.values": [None, "model"], "down.scale": [None],
                              "embed.values": ["model", None], "embed.scale": ["model"]}, (name, r)
    assert r["up_shard_shape"] == [32, 32] and r["embed_shard_shape"] == [32, 32], (name, r)  # split over 'model'
    assert r["int8_matmuls"] == 3, (name, r)
    # the same int8 numbers as one device; only f32 reductions may reorder
    assert r["max_abs_diff"] <= 1e-5 * r["max_abs"], (name, r)
