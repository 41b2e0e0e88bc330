"""The KV cache of the bundled causal LMs (models/attention.py): the 8-bit formats' write
and read against the formula (an independent numpy oracle), attention over the 8-bit
cache against attention over the values it stands for, every format through prefill +
decode against the no-cache forward, ragged batches against each prompt alone (greedy,
EOS per sequence), and the bad-argument errors."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import actquant_jax as aq
import cpu_kernels
from actquant_jax.models import attention as A
from actquant_jax.models import gemma3 as G
from actquant_jax.models import llama as L
from examples.llm import make_reference as mr_llama
from tools import make_gemma3_tiny_reference as mr_gemma

FORMATS = ("int8", "fp8")
needs_native = pytest.mark.skipif(not cpu_kernels.attention_available(),
                                  reason=f"native decode attention: {cpu_kernels.attention_unavailable_reason()}")


@pytest.fixture(scope="module")
def llama():
  return L.load_llama(mr_llama.TINY_DIR)


@pytest.fixture(scope="module")
def gemma():
  return G.load_gemma3(mr_gemma.checkpoint_dir("gemma3"))


def _oracle(x, kind):
  """numpy: a scale per vector absmax / qmax, round half to even (int8) or e4m3's own
  rounding, saturating; -> (stored values as f32, scales)."""
  qmax = {"int8": 127.0, "fp8": 448.0}[kind]
  x = x.astype(np.float32)
  s = np.abs(x).max(-1) * np.float32(1 / qmax)  # (times the f32 reciprocal, as reference.scale_factor)
  s = np.where(s < np.finfo(np.float32).tiny, np.float32(1), s).astype(np.float32)
  y = np.clip(x * (np.float32(1) / s)[..., None], -qmax, qmax)
  q = np.round(y) if kind == "int8" else y.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
  return q, s


@pytest.mark.parametrize("kind, native", [("int8", False), ("int8", True), ("fp8", False)])
def test_write_then_read_is_the_formula(kind, native):
  # Tokens written at per-sequence positions (sequence 1 two ahead, one position past the
  # end dropped) are stored as the oracle's values and scales of the vectors (int8: rotated,
  # x R, R orthogonal); read() gives back x to the 8-bit rounding; untouched slots stay 0.
  rng = np.random.default_rng(0)
  b, t, kv, hd, s = 2, 3, 2, 8, 6
  k = rng.standard_normal((b, t, kv, hd)).astype(np.float32) * np.float32(5)
  v = rng.standard_normal((b, t, kv, hd)).astype(np.float32)
  k[0, 1, 0] = 0.0  # an all-zero vector: scale 1, exact zeros
  k[1, 0, 1, 3] = 300.0  # one outlier channel: the rotation spreads it over the vector
  fmt = A.KVFormat(kind, native=native)  # (native: the kernel's layout; the write is XLA's either way)
  cache = {n: jnp.zeros(shape, dt) for n, (shape, dt) in fmt.shapes(b, s, kv, hd).items()}
  pos = np.array([[0, 1, 2], [3, 4, 5 + 1]], np.int32)  # (1, 2) is past the end: dropped
  cache = jax.jit(fmt.write)(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos))
  rot = A.rotation.matrix(hd)
  np.testing.assert_allclose(rot @ rot.T, np.eye(hd), atol=1e-12)
  ksub, vsub = fmt._subscripts()
  for name, x, sub in (("k", k, ksub), ("v", v, vsub)):
    stored = np.asarray(jnp.einsum(f"{sub}->bskd", cache[name]).astype(jnp.float32))
    scales = np.moveaxis(np.asarray(cache[f"{name}_scale"]), 2, 1)
    xr = np.asarray(A.rotate_kv(jnp.asarray(x))) if kind == "int8" else x  # (FP8 is stored unrotated)
    np.testing.assert_allclose(xr, (x.astype(np.float64) @ (rot if kind == "int8" else np.eye(hd))),
                               rtol=1e-5, atol=1e-4)
    q, sc = _oracle(xr, kind)
    want_q, want_s = np.zeros((b, s, kv, hd), np.float32), np.zeros((b, s, kv), np.float32)
    for i in range(b):
      for j in range(t):
        if pos[i, j] < s:
          want_q[i, pos[i, j]], want_s[i, pos[i, j]] = q[i, j], sc[i, j]
    # (the jitted write fuses the rotation and absmax: its scale may differ by an ulp, which
    # can move a value sitting on a rounding boundary by one step)
    np.testing.assert_allclose(scales, want_s, rtol=1e-6, err_msg=name)
    off = stored != want_q
    step = 1.0 if kind == "int8" else np.abs(want_q) / 8 + 1e-3
    assert off.sum() <= 2 and (np.abs(stored - want_q) <= step + 1e-6).all(), (name, off.sum())
    back = np.asarray(fmt.read(cache)[0 if name == "k" else 1])
    for i in range(b):
      for j in range(t):
        if pos[i, j] < s:  # read = the dequantized rotated vector rotated back: x to 8 bits
          tol = np.abs(xr[i, j]).max(-1, keepdims=True) * (0.51 / 127 if kind == "int8" else 1 / 16)
          assert (np.abs(back[i, pos[i, j]] - x[i, j]) <= tol * np.sqrt(hd) + 1e-6).all(), (name, i, j)
  assert np.asarray(cache["k_scale"])[0, 0, 1] == 1.0 and not np.asarray(fmt.read(cache)[0])[0, 1, 0].any()


@pytest.mark.parametrize("kind, native", [("float", False), ("float", True), ("int8", False), ("int8", True),
                                          ("fp8", False)])
def test_attention_over_the_cache_is_attention_over_what_it_holds(kind, native):
  # The 8-bit read (int8: queries and probabilities split into two int8 digits against
  # the int8 cache; fp8: upcast) equals float attention over the dequantized cache within
  # the digits' precision; a per-sequence mask (sequence 1 sees fewer keys) is honoured.
  rng = np.random.default_rng(1)
  b, t, kv, g, hd, s = 2, 2, 2, 3, 16, 40
  fmt = A.KVFormat(kind, native=native)
  cache = {n: jnp.zeros(shape, dt) for n, (shape, dt) in fmt.shapes(b, s, kv, hd).items()}
  kx = rng.standard_normal((b, s, kv, hd)).astype(np.float32) * 2
  vx = rng.standard_normal((b, s, kv, hd)).astype(np.float32)
  kx[:, 0] *= 40  # a sink-like key with a large norm
  pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
  cache = fmt.write(cache, jnp.asarray(kx), jnp.asarray(vx), jnp.asarray(pos))
  keys, values = fmt.read(cache)
  qg = jnp.asarray(rng.standard_normal((b, t, kv, g, hd)).astype(np.float32))
  seen = np.array([s, 25])[:, None, None] > np.arange(s)  # (b, 1, s)
  allowed = jnp.asarray(np.broadcast_to(seen, (b, t, s)))
  got = A.merge([A.attend_cache(qg, fmt, cache, allowed, scale=0.25)])
  want = A.merge([A.attend_keys(qg, keys, values, allowed, scale=0.25)])
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4 if kind == "int8" else 2e-5, rtol=1e-4)
  if native and cpu_kernels.attention_available():  # the decode-step kernel, one query per sequence
    pos = jnp.array([s - 1, 24], jnp.int32)
    got = fmt.decode(qg[:, :1], cache, pos, None, scale=0.25, softcap=None)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want[:, :1]), atol=2e-6, rtol=1e-5)
  if kind != "float":  # and the stored values are what a float cache would hold, to 8 bits
    rel = float(jnp.abs(keys - kx).max() / np.abs(kx).max())
    assert rel < (1 / 127 if kind == "int8" else 1 / 16), rel


@needs_native
@pytest.mark.parametrize("kind,g,hd", [("float", 2, 8), ("int8", 2, 8), ("float", 5, 40), ("int8", 5, 40)])
def test_native_decode_reads_only_the_keys_a_sequence_sees(kind, g, hd):
  # Per-sequence positions, a sliding window and soft-capping as the XLA path computes
  # them; the slots past each position (and before its window) hold NaN: the kernel
  # never reads them, so nothing turns NaN. Also under vmap (the sequential rule).
  # g, hd: the AVX2 blocks (4 + 1 heads for scores, 3 + 2 for the context; 32 channels)
  # and the loops for what is left (the keys after the last 16, the channels after 32).
  rng = np.random.default_rng(5)
  b, kv, s = 3, 2, 700
  fmt = A.KVFormat(kind, native=True)
  # (the setup and the XLA reference run jitted: one compile each instead of one per eager op)
  zeros = {n: jnp.zeros(shape, dt) for n, (shape, dt) in fmt.shapes(b, s, kv, hd).items()}
  x = rng.standard_normal((2, b, s, kv, hd)).astype(np.float32)
  cache = jax.jit(fmt.write)(zeros, jnp.asarray(x[0]), jnp.asarray(x[1]),
                             jnp.asarray(np.broadcast_to(np.arange(s), (b, s))))
  pos = np.array([0, 300, s - 1], np.int32)
  qg = jnp.asarray(rng.standard_normal((b, 1, kv, g, hd)).astype(np.float32))
  k_pos = jnp.arange(s)

  @functools.partial(jax.jit, static_argnums=1)
  def reference(cache, window):
    keys, values = fmt.read(cache)
    allowed = A.window_mask(k_pos <= pos[:, None, None], k_pos, jnp.asarray(pos)[:, None], window)
    want = A.merge([A.attend_keys(qg, keys, values, allowed, scale=0.3, softcap=5.0)])
    unseen = ~allowed[:, 0]  # (b, s)
    if kind == "float":
      poisoned = {**cache, "v": jnp.where(unseen[:, None, :, None], jnp.nan, cache["v"])}
    else:
      poisoned = {**cache, "k_scale": jnp.where(unseen[:, None, :], jnp.nan, cache["k_scale"])}
    return want, poisoned

  for window in (None, 100):
    want, poisoned = reference(cache, window)
    got = jax.jit(lambda q, c, w=window: fmt.decode(q, c, jnp.asarray(pos), w, scale=0.3, softcap=5.0))(qg, poisoned)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=1e-5)
  decode = lambda q, c: fmt.decode(q, c, jnp.asarray(pos), None, scale=0.3, softcap=None)
  batched = jax.jit(lambda q, c: jax.vmap(decode)(jnp.stack([q, q * 2]), jax.tree.map(lambda a: jnp.stack([a, a]), c)))
  one = jax.jit(lambda q, c: decode(q * 2, c))(qg, cache)
  np.testing.assert_allclose(np.asarray(batched(qg, cache)[1]), np.asarray(one), atol=1e-6)


@needs_native
@pytest.mark.skipif(bool(os.environ.get("ACTQUANT_CPU_BASELINE")), reason="this is the baseline run")
def test_native_decode_baseline_loops():
  # The kernel's plain loops (CPUs without AVX2+FMA), forced by ACTQUANT_CPU_BASELINE in a
  # fresh process (the choice is made as the library loads): the same checks pass.
  env = dict(os.environ, ACTQUANT_CPU_BASELINE="1")
  r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", __file__,
                      "-k", "reads_only_the_keys"], env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0 and "4 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def _cached(model, params, ids, n):
  cache = L.init_cache(model, ids.shape[0], ids.shape[1])
  logits, cache = L.prefill(model.apply, params, cache, jnp.asarray(ids[:, :n]))
  out = [logits]
  for t in range(n, ids.shape[1]):
    logits, cache = L.decode_step(model.apply, params, cache, jnp.asarray(ids[:, t]))
    out.append(logits)
  return np.stack([np.asarray(o) for o in out], axis=1)


@pytest.mark.parametrize("which", ["llama", "gemma"])
def test_every_format_through_prefill_and_decode(which, llama, gemma, request):
  # Float cache: the no-cache forward's logits; 8-bit caches: close to them (the cache's
  # rounding only), int8 closer than fp8.
  lm = llama if which == "llama" else gemma
  ids = np.random.default_rng(2).integers(0, lm.cfg.vocab_size, (2, 12)).astype(np.int32)
  full = np.asarray(jax.jit(lm.model.apply)(lm.params, jnp.asarray(ids)))[:, 4:]
  scale = np.abs(full).max()
  errs = {}
  for kind in ("float",) + FORMATS:
    model = lm.model.clone(kv_cache=kind)
    errs[kind] = np.abs(_cached(model, lm.params, ids, 5) - full).max() / scale
  assert errs["float"] < 1e-5, errs
  assert 0 < errs["int8"] < 2e-2 and errs["int8"] < errs["fp8"] < 1e-1, errs
  # decode steps through the native kernel (exact f32 products of the dequantized cache,
  # the step's own key read back from it) = through XLA's int8 dots (two-digit queries /
  # probabilities: ~2^-15 of each row's max; the own key as computed)
  if cpu_kernels.attention_available():
    model = lm.model.clone(kv_cache="int8")
    native = _cached(model, lm.params, ids, 5)
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(A, "native_decode_available", lambda: False)
      xla = _cached(model, lm.params, ids, 5)
    assert np.abs(native - full).max() / scale == errs["int8"]
    err_xla = np.abs(xla - full).max() / scale  # as close to float as the native read
    assert 0 < err_xla < 2e-2 and err_xla < 2 * errs["int8"] and errs["int8"] < 2 * err_xla, (err_xla, errs)


@pytest.mark.parametrize("which, kind", [("llama", "float"), ("llama", "int8"), ("gemma", "int8")])
def test_ragged_batch_is_each_prompt_alone(which, kind, llama, gemma):
  # Prompts of 3, 9 and 6 tokens in one batch generate, greedy, the tokens each does alone;
  # with an EOS id each sequence stops at its own (pad after it) and the rest go on.
  # Llama int8: W8A8 weights (quantized_apply) through the 8-bit cache (float weights
  # through the 8-bit cache are the gemma case, through the float cache the llama one:
  # each compile of the loops costs seconds, so no case repeats another's pair).
  lm = llama if which == "llama" else gemma
  model = lm.model.clone(kv_cache=kind)
  rng = np.random.default_rng(3)
  prompts = [rng.integers(1, lm.cfg.vocab_size, n).astype(np.int32) for n in (3, 9, 6)]
  apply, params = model, lm.params
  if kind == "int8" and which == "llama":
    ids = jnp.asarray(np.stack([np.resize(p, 9) for p in prompts]))
    params = aq.quantize_params(lm.params, aq.calibrate(lm.model, lm.params, [ids], progress=False), aq.QuantConfig(alpha=0.5, rotate=False))
    apply = aq.quantized_apply(model)
    assert isinstance(params["params"]["layers"]["self_attn"]["q_proj"]["kernel"], aq.QuantizedKernel)
  batch = np.asarray(L.generate(apply, params, prompts, 8, model=model))
  # (one cache length for all: one compile of the decode loop)
  alone = np.stack([np.asarray(L.generate(apply, params, [p], 8, model=model, max_len=17))[0] for p in prompts])
  np.testing.assert_array_equal(batch, alone)
  # (EOS handling is the loop's, whatever the weights)
  eos = int(batch[1, 2])  # sequence 1's third token: it stops there; pad (0) after it
  stopped = np.asarray(L.generate(apply, params, prompts, 8, model=model, eos_token_id=eos, pad_token_id=0))
  for i, row in enumerate(alone):
    hit = np.flatnonzero(row == eos)
    want = row.copy() if not hit.size else np.concatenate([row[:hit[0] + 1], np.zeros(7 - hit[0], np.int32)])
    np.testing.assert_array_equal(stopped[i], want)
  assert (stopped[1, 3:] == 0).all()


def test_bad_arguments_are_named(llama):
  ids = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(aq.ModelArgumentError, match="kv_cache must be one of"):
    llama.model.clone(kv_cache="int4").apply(llama.params, ids)
  with pytest.raises(aq.ModelArgumentError, match="lengths .* is for decode=True"):
    llama.model.apply(llama.params, ids, lengths=jnp.array([2]))
  with pytest.raises(aq.ModelArgumentError, match="non-empty token sequences"):
    L.generate(llama.model, llama.params, [np.array([1, 2]), np.array([], np.int32)], 2)


def test_int8_cache_rotation_keeps_the_small_channels(monkeypatch):
  # Keys with one channel 300x the others (as Gemma 3's after k_norm): without the rotation
  # a scale per vector set by that channel rounds the rest to zero; rotated (x R), every
  # channel carries a share of it and the small ones come back to ~1%.
  rng = np.random.default_rng(6)
  x = rng.standard_normal((1, 64, 1, 64)).astype(np.float32)
  x[..., 5] *= 300
  fmt = A.KVFormat("int8")
  pos = jnp.asarray(np.arange(64, dtype=np.int32)[None])

  def small_channel_error():
    cache = {n: jnp.zeros(shape, dt) for n, (shape, dt) in fmt.shapes(1, 64, 1, 64).items()}
    back = np.asarray(fmt.read(fmt.write(cache, jnp.asarray(x), jnp.asarray(x), pos))[0])
    rest = np.delete(np.arange(64), 5)
    return np.abs(back[..., rest] - x[..., rest]).mean() / np.abs(x[..., rest]).mean()
  rotated = small_channel_error()
  monkeypatch.setattr(A, "_rotates", lambda hd: False)
  plain = small_channel_error()
  assert plain > 0.5 and rotated < 0.1, (plain, rotated)
