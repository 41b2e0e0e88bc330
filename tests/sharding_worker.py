"""Run by tests/test_sharding.py in a subprocess with 8 forced CPU devices (the flag must
be set before JAX starts, and the rest of the suite must keep seeing one device)."""

import json
import os
import sys
import tempfile

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import actquant_jax as aq  # noqa: E402
from tests import toy_models as tm  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def megatron_specs(params):
  """A user's rules for the float model: q/k/v/fc1/head column-parallel, o/fc2 row-parallel."""
  def rule(path, leaf):
    names = [getattr(k, "key", str(k)) for k in path]
    layer, name = names[-2], names[-1]
    if layer in ("q", "k", "v", "fc1", "head"):
      return P(None, "model") if name == "kernel" else P("model")
    if layer in ("o", "fc2"):
      return P("model", None) if name == "kernel" else P()
    return P()
  return jax.tree_util.tree_map_with_path(rule, params)


def main():
  assert len(jax.devices()) == 8
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
  m = tm.TinyGPT()
  cal = tm.batches(2)
  # jitted: one compile instead of one per eager op (seconds in a fresh process; same values)
  params = jax.jit(lambda x: tm.with_outlier_channels(m.init(jax.random.key(0), x), tm.GPT_READERS))(cal[0])
  stats = aq.calibrate(m, params, cal, progress=False)
  out = {}
  for name, cfg in (("int8-static", aq.QuantConfig(act_mode="static", alpha=0.5, rotate=False)),
                    ("int8-dynamic-auto", aq.QuantConfig(alpha="auto", rotate=False)),
                    ("fp8", aq.QuantConfig(qtype="float8_e4m3fn", alpha=None, rotate=False))):
    qparams = aq.quantize_params(params, stats, cfg)
    x = tm.batches(1, b=8, seed=7)[0]
    f = jax.jit(aq.quantized_apply(m))
    y1 = np.asarray(f(qparams, x))  # one device

    specs = megatron_specs(params)
    sharded = aq.shard_quantized(qparams, specs, mesh)
    qk = sharded["params"]["block_0"]["fc1"]["kernel"]
    assert qk.values.sharding.spec == P("model", None), qk.values.sharding.spec
    assert qk.scale.sharding.spec == P("model")  # scales follow the output-channel axis
    o = sharded["params"]["block_0"]["o"]["kernel"]
    assert o.values.sharding.spec == P(None, "model") and o.scale.sharding.spec == P(None)
    assert len(qk.values.addressable_shards) == 8 and qk.values.addressable_shards[0].data.shape == (64, 64)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    y8 = np.asarray(f(sharded, xs))
    out[name] = dict(max_abs_diff=float(np.abs(y8 - y1).max()), max_abs=float(np.abs(y1).max()))

    # save from the mesh, restore onto the mesh, same outputs
    with tempfile.TemporaryDirectory() as d:
      aq.save_checkpoint(os.path.join(d, "ck"), sharded, config=cfg)
      qspecs = aq.quantized_partition_specs(qparams, specs)
      where = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), qspecs, is_leaf=lambda v: isinstance(v, P))
      back, _ = aq.restore_checkpoint(os.path.join(d, "ck"), like=params, config=cfg, shardings=where)
      assert back["params"]["block_0"]["fc1"]["kernel"].values.sharding.spec == P("model", None)
      out[name]["restored_equal"] = bool(np.array_equal(np.asarray(f(back, xs)), y8))
  out["shard_map"] = shard_map_kernels(mesh)
  print(json.dumps(out))


def shard_map_kernels(mesh):
  """The Pallas kernels (interpret mode) per shard vs the one-device XLA path."""
  rng = np.random.default_rng(0)
  res = {}
  x = jnp.asarray(rng.standard_normal((32, 256)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((256, 128)), jnp.float32)
  b = jnp.asarray(rng.standard_normal(128), jnp.float32)
  inv = jnp.asarray(rng.uniform(0.5, 2, 256), jnp.float32)
  for name, qk in (("dynamic", aq.quantize_kernel(w, inv_smooth=inv)), ("static", aq.quantize_kernel(w, act_scale=0.03)),
                   ("fp8", aq.quantize_kernel(w, "float8_e4m3fn"))):
    y1 = np.asarray(aq.w8a8_dot(x, qk, b, backend="xla"))
    for layout, axes in (("column", dict(batch_axis="data", n_axis="model")),
                         ("row", dict(batch_axis="data", k_axis="model"))):
      for impl in ("xla", "pallas-interpret"):
        kw = dict(backend="xla") if impl == "xla" else dict(interpret=True)
        y = np.asarray(jax.jit(lambda x, qk, b: aq.sharded_w8a8_dot(x, qk, b, mesh=mesh, **axes, **kw))(x, qk, b))
        res[f"{name}/{layout}/{impl}"] = float(np.abs(y - y1).max() / np.abs(y1).max())
  return res


if __name__ == "__main__":
  main()
