"""Property-based checks over the public entry points (issue 12): every example ends in
the spec's result (tests/numpy_oracle.py) or one of the library's own named errors
(aq.ActquantError), never anything else. Bounded and derandomized: no example database,
a fixed order, a small number of examples per property (the whole file runs in well under
a minute)."""

import functools
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import actquant_jax as aq
from pallas_kernels import reference as ref
from tests import numpy_oracle as oracle

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

FAST = settings(max_examples=15, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
SLOW = settings(FAST, max_examples=6)

EXTREMES = [np.nan, np.inf, -np.inf, 3e38, -3.3e38, 1e-38, -1e-40, 0.0, 127.5, -0.5]


def _inject(x2d, rng, n_special, specials):
  """Put n_special values drawn from `specials` at random places of x2d (in place)."""
  if x2d.size:
    for _ in range(n_special):
      x2d[rng.integers(x2d.shape[0]), rng.integers(x2d.shape[1])] = specials[rng.integers(len(specials))]


@FAST
@given(seed=st.integers(0, 2**32 - 1), lead=st.sampled_from([(3,), (2, 2), (1,), (0,), (0, 4)]),
       k=st.sampled_from([33, 16, 5, 1]), n=st.integers(1, 6),
       dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
       qtype=st.sampled_from(aq.quant.QTYPES), static=st.booleans(), smooth=st.booleans(),
       with_bias=st.booleans(), n_special=st.integers(0, 4), x_scale=st.sampled_from([1.0, 1e-3, 1e-30, 1e30]))
def test_w8a8_dot_is_the_spec_or_a_named_error(seed, lead, k, n, dtype, qtype, static, smooth, with_bias,
                                               n_special, x_scale):
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal((*lead, k)) * x_scale).astype(np.float32)
  x2d = x.reshape(-1, k)
  _inject(x2d, rng, n_special, EXTREMES)
  x = jnp.asarray(x2d.reshape(x.shape), dtype)
  w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
  inv = jnp.asarray(rng.uniform(0.1, 10, k), jnp.float32) if smooth else None
  try:
    qk = aq.quantize_kernel(w, qtype, act_scale=float(rng.uniform(0.01, 2)) if static else None, inv_smooth=inv)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32) if with_bias else None
    y = jax.jit(functools.partial(aq.w8a8_dot, backend="xla"))(x, qk, bias)
  except aq.ActquantError:
    return
  assert y.shape == (*lead, n) and y.dtype == x.dtype
  y2d = np.asarray(y, np.float32).reshape(-1, n)
  # The spec (numpy oracle), not reference.py: the XLA path calls reference.py itself.
  oracle.assert_w8a8(y2d, np.asarray(x, np.float32).reshape(-1, k), qk, bias, x.dtype)
  # A row holding NaN/Inf (after the cast to dtype) gives a non-finite output row.
  bad = ~np.isfinite(np.asarray(x, np.float32).reshape(-1, k)).all(axis=1)
  assert (~np.isfinite(y2d[bad])).all()


@SLOW
@given(seed=st.integers(0, 2**32 - 1), k=st.sampled_from([ref.K_CHUNK + 1, 2**31 // 127**2, 2**31 // 127**2 + 1]),
       extreme=st.booleans())
def test_w8a8_dot_k_near_the_int32_bound_is_exact(seed, k, extreme):
  rng = np.random.default_rng(seed)
  x = rng.choice([-1.0, 1.0], size=(2, k)).astype(np.float32) if not extreme else np.ones((2, k), np.float32)
  qk = aq.quantize_kernel(jnp.asarray(np.sign(rng.standard_normal((k, 2))) if not extreme else np.ones((k, 2)),
                                      jnp.float32))
  y = jax.jit(functools.partial(aq.w8a8_dot, backend="auto"))(jnp.asarray(x), qk)
  exact = (127 * np.sign(x).astype(np.int64)) @ np.asarray(qk.values, np.int64).T  # rows quantize to +-127
  o = oracle.w8a8(x, qk.values, qk.scale)
  np.testing.assert_array_equal(o["acc"], exact)
  # The exact sum rounded once to f32, then (acc * sw) * sx: bit for bit (no bias, no FMA).
  np.testing.assert_array_equal(np.asarray(y), o["y"])


@FAST
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from([(0,), (7,), (3, 4), (2, 0, 3), (2, 3, 5)]),
       qtype=st.sampled_from(aq.quant.QTYPES), granularity=st.sampled_from(["tensor", "channel", "token"]),
       axis=st.integers(-3, 2), n_special=st.integers(0, 2), x_scale=st.sampled_from([1e-20, 1.0, 1e20]))
def test_quantize_round_trip_bound_or_named_error(seed, shape, qtype, granularity, axis, n_special, x_scale):
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal(shape) * x_scale).astype(np.float32)
  if x.ndim:
    _inject(x.reshape(-1, x.shape[-1]) if x.shape[-1] else x.reshape(1, 0), rng, n_special,
            [np.nan, np.inf, 3e38, 0.0])
  try:
    q = aq.quantize(jnp.asarray(x), qtype, granularity=granularity, axis=axis)
  except aq.ActquantError:
    return
  back = np.asarray(aq.dequantize(q))
  scale = np.broadcast_to(np.asarray(q.scale), x.shape)
  ok = np.isfinite(scale)
  # Groups holding NaN/Inf get a NaN scale, every other group round-trips within its bound:
  # int8 half a step, fp8 2^-4 of the value (3 mantissa bits) or half its smallest step.
  assert np.isnan(scale[~np.isfinite(x)]).all()
  err = np.abs(back[ok] - x[ok])
  bound = scale[ok] / 2 if qtype == "int8" else np.maximum(np.abs(x[ok]) * 2.0**-4, scale[ok] * 2.0**-10)
  assert (err <= bound * (1 + 1e-6) + 1e-37).all()


class _RandomMLP(nn.Module):
  widths: tuple
  norm: bool

  @nn.compact
  def __call__(self, x):
    for i, w in enumerate(self.widths):
      if self.norm:
        x = nn.LayerNorm(name=f"ln_{i}")(x)
      x = nn.Dense(w, name=f"fc_{i}")(x)
      if i < len(self.widths) - 1:
        x = nn.gelu(x)
    return x


@SLOW
@given(seed=st.integers(0, 2**32 - 1), widths=st.lists(st.sampled_from([8, 16, 24]), min_size=1, max_size=3),
       norm=st.booleans(), qtype=st.sampled_from(aq.quant.QTYPES), act_mode=st.sampled_from(["dynamic", "static"]),
       alpha=st.sampled_from([None, 0.5, "auto"]))
def test_quantize_params_random_models(seed, widths, norm, qtype, act_mode, alpha):
  rng = np.random.default_rng(seed)
  model = _RandomMLP(tuple(widths), norm)
  cal = [jnp.asarray(rng.standard_normal((4, 8, 16)), jnp.float32) for _ in range(2)]
  params = model.init(jax.random.key(seed % 1000), cal[0])
  before = jax.tree_util.tree_map(np.array, params)
  stats = aq.calibrate(model, params, cal, progress=False)
  try:
    qparams = aq.quantize_params(params, stats, aq.QuantConfig(qtype=qtype, act_mode=act_mode, alpha=alpha, rotate=False))
  except aq.ActquantError:
    return
  jax.tree_util.tree_map(np.testing.assert_array_equal, before, jax.tree_util.tree_map(np.asarray, params))  # pure
  x = cal[0]
  y, yq = np.asarray(model.apply(params, x)), np.asarray(jax.jit(aq.quantized_apply(model))(qparams, x))
  assert np.isfinite(yq).all()
  assert np.linalg.norm(yq - y) <= 0.15 * np.linalg.norm(y) + 1e-6


def _random_tree(rng, depth=0):
  tree = {}
  for i in range(int(rng.integers(1, 4))):
    kind = rng.integers(3) if depth < 2 else rng.integers(2)
    if kind == 0:
      k, n = int(rng.integers(1, 6)), int(rng.integers(1, 6))
      tree[f"k{i}"] = aq.quantize_kernel(
          jnp.asarray(rng.standard_normal((k, n)), jnp.float32), str(rng.choice(aq.quant.QTYPES)),
          act_scale=None if rng.integers(2) else float(rng.uniform(0.1, 1)),
          inv_smooth=None if rng.integers(2) else jnp.asarray(rng.uniform(0.5, 2, k), jnp.float32))
    elif kind == 1:
      tree[f"a{i}"] = jnp.asarray(rng.standard_normal(tuple(rng.integers(0, 4, size=rng.integers(0, 3)))),
                                  str(rng.choice(["float32", "bfloat16", "int8"])))
    else:
      tree[f"d{i}"] = _random_tree(rng, depth + 1)
  return tree


def _bits_equal(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8), np.asarray(y).reshape(-1).view(np.uint8))


@SLOW
@given(seed=st.integers(0, 2**32 - 1))
def test_checkpoint_round_trip_of_random_trees(tmp_path_factory, seed):
  tree = _random_tree(np.random.default_rng(seed))
  d = aq.save_checkpoint(tmp_path_factory.mktemp("rt") / "ck", tree)
  _bits_equal(aq.restore_checkpoint(d)[0], tree)


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
  model = _RandomMLP((8,), False)
  cal = [jnp.asarray(np.random.default_rng(0).standard_normal((4, 16)), jnp.float32)]
  params = model.init(jax.random.key(0), cal[0])
  stats = aq.calibrate(model, params, cal, progress=False)
  tree = aq.quantize_params(params, stats, aq.QuantConfig(act_mode="static", alpha=0.5, rotate=False))
  d = aq.save_checkpoint(tmp_path_factory.mktemp("fuzz") / "ck", tree, stats=stats,
                         config=aq.QuantConfig(act_mode="static", alpha=0.5, rotate=False))
  files = sorted(p.relative_to(d) for p in d.rglob("*") if p.is_file() and p.stat().st_size)
  return d, tree, stats, files


@settings(FAST, max_examples=60)
@given(data=st.data())
def test_damaged_checkpoint_restores_exactly_or_raises_checkpoint_error(tmp_path_factory, saved_checkpoint, data):
  d, tree, stats, files = saved_checkpoint
  rel = data.draw(st.sampled_from(files), label="file")
  copy = tmp_path_factory.mktemp("dmg") / "ck"
  shutil.copytree(d, copy)
  f = copy / rel
  raw = bytearray(f.read_bytes())
  if data.draw(st.booleans(), label="truncate"):
    f.write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1), label="keep")])
  else:
    i = data.draw(st.integers(0, len(raw) - 1), label="byte")
    raw[i] ^= data.draw(st.integers(1, 255), label="xor")
    f.write_bytes(raw)
  try:
    back, back_stats = aq.restore_checkpoint(copy)
  except aq.CheckpointError:
    return
  _bits_equal(back, tree)  # the damage hit bytes nothing reads back
  assert set(back_stats) == set(stats)
  np.testing.assert_array_equal(np.asarray(back_stats["fc_0"].absmax), np.asarray(stats["fc_0"].absmax))


@pytest.fixture(scope="module")
def saved_stats(tmp_path_factory, saved_checkpoint):
  d, _, stats, _ = saved_checkpoint
  f = tmp_path_factory.mktemp("stats") / "stats.npz"
  aq.save_stats(stats, f)
  return f, stats


@settings(FAST, max_examples=40)
@given(data=st.data())
def test_damaged_stats_file_loads_exactly_or_raises_a_named_error(tmp_path_factory, saved_stats, data):
  f, stats = saved_stats
  raw = bytearray(f.read_bytes())
  copy = tmp_path_factory.mktemp("sdmg") / "stats.npz"
  if data.draw(st.booleans(), label="truncate"):
    copy.write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1), label="keep")])
  else:
    raw[data.draw(st.integers(0, len(raw) - 1), label="byte")] ^= data.draw(st.integers(1, 255), label="xor")
    copy.write_bytes(raw)
  try:
    back = aq.load_stats(copy)
  except aq.ActquantError:
    return
  assert set(back) == set(stats)
  for p in stats:
    np.testing.assert_array_equal(np.asarray(back[p].absmax), np.asarray(stats[p].absmax))
    np.testing.assert_array_equal(np.asarray(back[p].samples), np.asarray(stats[p].samples))
