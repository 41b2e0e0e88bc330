"""Run by tests/test_nnx_sharding.py in a subprocess with 4 forced CPU devices: an nnx model
whose Params carry sharding annotations (`out_sharding` metadata), quantized with
quantize_model, placed the usual nnx way (nnx.get_partition_spec / get_named_sharding,
jax.device_put, nnx.update) and run."""

import json
import os
import sys

assert "--xla_force_host_platform_device_count=4" in os.environ.get("XLA_FLAGS", "")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

import actquant_jax as aq  # noqa: E402
from actquant_jax.sharding import QuantizedParam  # noqa: E402
from tests import toy_models as tm  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
V, D, F = 64, 32, 64


class Net(nnx.Module):
  """A tied embedding (rows over 'model'), a column-parallel up and a row-parallel down
  projection (Megatron), a LayerNorm, the tied head."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(V, D, embedding_metadata={"out_sharding": ("model", None)}, rngs=rngs)
    self.up = nnx.Linear(D, F, kernel_metadata={"out_sharding": (None, "model")},
                         bias_metadata={"out_sharding": ("model",)}, rngs=rngs)
    self.down = nnx.Linear(F, D, kernel_metadata={"out_sharding": ("model", None)}, rngs=rngs)
    self.ln = nnx.LayerNorm(D, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids)
    x = x + self.down(jax.nn.gelu(self.up(x)))
    return self.embed.attend(self.ln(x))


def spec_of(a):
  return tuple(a.sharding.spec) if hasattr(a.sharding, "spec") else None


def main():
  assert len(jax.devices()) == 4
  mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
  ids = [jax.random.randint(jax.random.key(i), (4, 8), 0, V) for i in range(3)]
  out = {}
  for name, eager in (("unsharded-then-placed", False), ("created-sharded", True)):
    if eager:  # flax's default: the params are placed at creation, under the mesh
      with jax.set_mesh(mesh):
        m = Net(nnx.Rngs(0))
    else:
      with nnx.use_eager_sharding(False):
        m = Net(nnx.Rngs(0))
    stats = aq.calibrate(m, None, ids[:2], progress=False)
    # one device: the reference (the same quantized numbers, unsharded)
    one = aq.quantize_model(nnx.clone(m), stats, aq.QuantConfig(alpha=0.5, rotate=False), backend="xla")
    ref = np.asarray(jax.device_get(jax.jit(lambda s, x: nnx.merge(nnx.graphdef(one), s)(x))(
        jax.device_put(jax.device_get(nnx.state(one)), jax.devices()[0]), jax.device_put(ids[2], jax.devices()[0]))))

    aq.quantize_model(m, stats, aq.QuantConfig(alpha=0.5, rotate=False), backend="xla")
    state = nnx.state(m)
    specs = nnx.get_partition_spec(state)
    up_spec = specs["up"]["kernel"].get_value()
    res = {"param_class": type(m.up.kernel).__name__,
           "up_specs": [str(up_spec.values), str(up_spec.scale), str(up_spec.inv_smooth)],
           "metadata": list(m.up.kernel.get_metadata("out_sharding"))}
    state = jax.device_put(state, nnx.get_named_sharding(state, mesh))
    nnx.update(m, state)
    up, down, emb = (v.get_value() for v in (m.up.kernel, m.down.kernel, m.embed.embedding))
    res["shardings"] = {"up.values": spec_of(up.values), "up.scale": spec_of(up.scale),
                        "up.inv_smooth": spec_of(up.inv_smooth), "down.values": spec_of(down.values),
                        "down.scale": spec_of(down.scale), "embed.values": spec_of(emb.values),
                        "embed.scale": spec_of(emb.scale)}
    res["up_shard_shape"] = list(up.values.addressable_shards[0].data.shape)
    res["embed_shard_shape"] = list(emb.values.addressable_shards[0].data.shape)
    res["all_quantized"] = all(isinstance(v, QuantizedParam) for v in (m.up.kernel, m.down.kernel, m.embed.embedding))
    y_eager = np.asarray(m(ids[2]))
    y_jit = np.asarray(nnx.jit(lambda mod, x: mod(x))(m, ids[2]))
    res["max_abs"] = float(np.abs(ref).max())
    res["max_abs_diff"] = max(float(np.abs(y_eager - ref).max()), float(np.abs(y_jit - ref).max()))
    res["int8_matmuls"] = tm.int8_matmuls(lambda x: m(x), ids[2])
    out[name] = res
  print(json.dumps(out))


if __name__ == "__main__":
  main()
