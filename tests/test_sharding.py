import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import actquant_jax as aq
from tests.kernel_utils import run_device_worker


def test_partition_specs_follow_the_float_rules():
  qk = aq.quantize_kernel(jnp.ones((8, 4)), act_scale=0.1, inv_smooth=jnp.ones(8))
  qparams = {"params": {"fc": {"kernel": qk, "bias": jnp.ones(4)}, "ln": {"scale": jnp.ones(8)}}}
  float_specs = {"params": {"fc": {"kernel": P("data", "model"), "bias": P("model")}, "ln": {"scale": P()}}}
  specs = aq.quantized_partition_specs(qparams, float_specs)
  s = specs["params"]["fc"]["kernel"]
  assert isinstance(s, aq.QuantizedKernel) and s.qtype == "int8"
  assert (s.values, s.scale, s.act_scale, s.inv_smooth) == (P("model", "data"), P("model"), P(), P("data"))
  assert specs["params"]["fc"]["bias"] == P("model")
  # a spec naming only the first axis leaves the output axis unsharded
  s1 = aq.quantized_partition_specs(qparams, {"params": {**float_specs["params"], "fc": {"kernel": P("model"), "bias": P()}}})
  assert s1["params"]["fc"]["kernel"].values == P(None, "model") and s1["params"]["fc"]["kernel"].scale == P(None)
  with pytest.raises(aq.QuantizationError, match="does not match the params tree"):
    aq.quantized_partition_specs(qparams, {"params": {"fc": float_specs["params"]["fc"]}})


def test_sharded_dot_rejects_bad_input():
  from jax.sharding import Mesh
  import numpy as np
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
  qk = aq.quantize_kernel(jnp.ones((8, 4)))
  with pytest.raises(ValueError, match="sharded_w8a8_dot: input of shape \\(2, 7\\)"):
    aq.sharded_w8a8_dot(jnp.ones((2, 7)), qk, mesh=mesh)
  with pytest.raises(ValueError, match="must be \\(M, K\\)"):
    aq.sharded_w8a8_dot(jnp.ones((2, 3, 8)), qk, mesh=mesh)


def test_eight_device_mesh_matches_one_device():
  # A subprocess: the forced device count must be set before JAX starts.
  result = run_device_worker("sharding_worker.py", 8)
  shard_map = result.pop("shard_map")
  assert set(result) == {"int8-static", "int8-dynamic-auto", "fp8"}
  # sharded_w8a8_dot: Pallas kernels (interpret mode) and the XLA path per shard, for
  # column- (N) and row-parallel (K: pmax of row absmax, psum of int32 partials) layouts,
  # against one device. Same int32 sums; the f32 epilogue may round differently by 1 ulp.
  assert len(shard_map) == 12
  for name, rel in shard_map.items():
    assert rel <= 1e-6, (name, rel)
  for name, res in result.items():
    # int8 accumulation is exact on any sharding; only the f32 parts around it (norms,
    # softmax, cross-shard sums) may reorder.
    assert res["max_abs_diff"] <= 1e-5 * res["max_abs"], (name, res)
    assert res["restored_equal"], name
  assert len(jax.devices()) == 1 or jax.default_backend() != "cpu"  # the suite itself still sees one


def test_quantize_params_on_a_mesh_gathers_nothing(tmp_path):
  # quantize_params on params sharded over 8 devices (each kernel split over K and N):
  # every program it compiles is in XLA's HLO dump. A weight gathered whole (or resharded)
  # shows as an all-gather / all-to-all / collective-permute; the worker records every
  # array read on the host.
  dump = tmp_path / "hlo"
  configs = run_device_worker("quantize_sharded_worker.py", 8, f"--xla_dump_to={dump} --xla_dump_hlo_as_text",
                              QUANTIZE_HLO_DUMP=str(dump))["configs"]
  assert set(configs) == {"int8-static-auto"}
  for name, res in configs.items():
    assert res["kernels"] == 13, name
    # values (N, K) carry the kernel's spec transposed, scales its N axis, inv_smooth its K
    # axis (quantized_partition_specs of the float rules), act_scale replicated
    assert res["wrong_shardings"] == [], (name, res["wrong_shardings"])
    assert res["equal_to_one_device"], name
    # on the host: (K,) / (N,) vectors and scalars (absmax, row maxima, finiteness flags,
    # the search's errors), never a weight
    assert res["host_reads"] and all(len(shape) <= 1 for shape, _ in res["host_reads"]), res["host_reads"]
    compiled = " ".join(res["modules"])  # the programs compiled for the mesh
    assert all(f in compiled for f in ("_all_finite", "_row_absmax", "_grid_errors", "_quantize_weight")), compiled
    # Partitioned programs: what crosses devices is all-reduces (of (K,)/(N,) maxima,
    # scalars and the search's (rows, N) partial products), nothing that moves a weight.
    assert "all-reduce" in res["collectives"], (name, res["collectives"])
    moved = {op: shapes for op, shapes in res["collectives"].items() if op != "all-reduce"}
    assert moved == {}, (name, moved)
