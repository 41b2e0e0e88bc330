import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import actquant_jax as aq
from tests import toy_models as tm

# Damaged checkpoints make Orbax's reader threads raise in the background too; the
# error that matters is the one restore_checkpoint raises (asserted below).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def model():
  m = tm.TinyGPT()
  cal = tm.batches(2)
  params = tm.with_outlier_channels(m.init(jax.random.key(0), cal[0]), tm.GPT_READERS)
  return m, params, aq.calibrate(m, params, cal, progress=False)


CONFIGS = [aq.QuantConfig(act_mode="static", alpha="auto", rules=(aq.LayerRule("head", skip=True),)),
           aq.QuantConfig(qtype="float8_e4m3fn", alpha=0.5)]


def _leaves_equal(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb  # same structure, QuantizedKernel nodes and their static qtype included
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    bits = lambda v: np.asarray(v).reshape(-1).view(np.uint8)
    np.testing.assert_array_equal(bits(x), bits(y))  # bit for bit


@pytest.mark.parametrize("config", CONFIGS, ids=["int8-static-auto", "fp8"])
def test_round_trip_is_bit_exact(tmp_path, model, config):
  m, params, stats = model
  qparams = aq.quantize_params(params, stats, config)
  aq.save_checkpoint(tmp_path / "ck", qparams, stats=stats, config=config)
  back, back_stats = aq.restore_checkpoint(tmp_path / "ck", like=params, config=config)
  _leaves_equal(qparams, back)
  assert jax.tree.structure(back) == jax.tree.structure(qparams)  # static qtype and act_key too
  assert set(back_stats) == set(stats)
  np.testing.assert_array_equal(np.asarray(back_stats["head"].absmax), np.asarray(stats["head"].absmax))
  x = tm.batches(1, seed=4)[0]
  f = jax.jit(aq.quantized_apply(m))
  np.testing.assert_array_equal(np.asarray(f(back, x)), np.asarray(f(qparams, x)))


def test_restore_onto_a_mesh(tmp_path, model):
  m, params, stats = model
  qparams = aq.quantize_params(params, stats, CONFIGS[0])
  aq.save_checkpoint(tmp_path / "ck", qparams)
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
  seen = []

  def where(path):
    seen.append(path)
    return NamedSharding(mesh, P())
  back, stats_back = aq.restore_checkpoint(tmp_path / "ck", shardings=where)
  assert stats_back is None
  assert "/params/block_0/fc1/kernel/values" in seen
  assert back["params"]["block_0"]["fc1"]["kernel"].values.sharding == NamedSharding(mesh, P())
  _leaves_equal(qparams, back)


def test_refuses_wrong_model_and_config(tmp_path, model):
  m, params, stats = model
  qparams = aq.quantize_params(params, stats, CONFIGS[0])
  aq.save_checkpoint(tmp_path / "ck", qparams, config=CONFIGS[0])
  other = tm.TinyGPT(d=32)
  oparams = other.init(jax.random.key(0), tm.batches(1, d=32)[0])
  with pytest.raises(ValueError, match="another model"):
    aq.restore_checkpoint(tmp_path / "ck", like=oparams)
  fewer = {"params": {k: v for k, v in params["params"].items() if k != "head"}}
  with pytest.raises(ValueError, match=r"checkpoint has \['head'\] the model lacks"):
    aq.restore_checkpoint(tmp_path / "ck", like=fewer)
  with pytest.raises(ValueError, match="was made with QuantConfig"):
    aq.restore_checkpoint(tmp_path / "ck", config=CONFIGS[1])
  with pytest.raises(FileExistsError, match="overwrite=True"):
    aq.save_checkpoint(tmp_path / "ck", qparams)
  aq.save_checkpoint(tmp_path / "ck", qparams, overwrite=True)


def _data_files(d):
  return sorted(p for p in (d / "params").rglob("*") if p.is_file() and p.stat().st_size > 64
                and "d" in p.parent.name)


def test_refuses_corrupt_and_truncated(tmp_path, model):
  m, params, stats = model
  qparams = aq.quantize_params(params, stats, CONFIGS[0])
  with pytest.raises(ValueError, match="not an actquant-jax checkpoint"):
    aq.restore_checkpoint(tmp_path)
  for damage in ("truncate", "flip", "delete", "meta"):
    d = aq.save_checkpoint(tmp_path / damage, qparams)
    files = _data_files(d)
    assert files, list((d / "params").rglob("*"))
    f = max(files, key=lambda p: p.stat().st_size)
    raw = bytearray(f.read_bytes())
    if damage == "truncate":
      f.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
      raw[len(raw) // 2] ^= 0xFF
      f.write_bytes(raw)
    elif damage == "delete":
      f.unlink()
    else:
      (d / "actquant.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt|truncated|missing"):
      aq.restore_checkpoint(d)


def test_unsupported_trees(tmp_path):
  with pytest.raises(TypeError, match="unsupported node"):
    aq.save_checkpoint(tmp_path / "a", {"x": [jnp.ones(2)]})
