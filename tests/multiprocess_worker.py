"""Run by tests/test_multiprocess.py: a W8A8 Llama generating greedily with its weights and
KV cache sharded tensor-parallel over a mesh of every device of every process.

  multiprocess_worker.py OUT --process-id I --num-processes 2 --coordinator 127.0.0.1:PORT
      one process of a jax.distributed run (JAX's own multi-controller runtime: every
      process runs this same program on its own devices, and the mesh spans them all);
      each writes OUT.<I>.
  multiprocess_worker.py OUT
      the single-process reference: the model unsharded on one device (or, with several
      devices, the same mesh code over this process's devices); writes OUT.

Every process builds the same model (a fixed seed), calibrates it on the same batches,
places the float params on the global mesh (each process places only its own devices'
shards) and quantizes them there (quantize_params on the sharded params: no process holds
a whole weight), then prefills and decodes through a KV cache split over its heads. The
forced CPU device count (XLA_FLAGS) must be set before JAX starts.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import actquant_jax as aq  # noqa: E402
from actquant_jax.models import llama  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# GQA: 8 query heads over 4 key/value heads, so the KV cache splits by head over 4 devices.
CFG = llama.LlamaConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=16,
                        intermediate_size=128, max_position=64)
BATCH, PROMPT, NEW = 2, 8, 8
SEED = 0


def megatron_specs(params):
  """Tensor parallel over "model": q/k/v/gate/up column-parallel (output features split),
  o/down row-parallel (input features split: XLA all-reduces the partial sums), the
  embedding split over its hidden features, the head over the vocabulary, norms
  replicated. Leaves under "layers" are stacked (L, ...): the layer axis stays whole."""
  def rule(path, leaf):
    names = [getattr(k, "key", str(k)) for k in path]
    layer, name = names[-2], names[-1]
    lead = (None,) if "layers" in names else ()
    if name == "kernel" and layer in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head"):
      return P(*lead, None, "model")
    if name == "kernel" and layer in ("o_proj", "down_proj"):
      return P(*lead, "model", None)
    if name == "embedding":
      return P(None, "model")
    return P()
  return jax.tree_util.tree_map_with_path(rule, params)


def cache_specs(cache):
  """The KV cache split over its key/value heads -- the heads whose keys and values the
  column-parallel k/v projections of a device produce -- on every leaf that has that axis
  (keys, values, and an 8-bit cache's scales: stacked (L, B, ...) with the heads on the
  one axis of size num_kv_heads, which CFG makes unlike every other); the index
  replicated."""
  def spec(c):
    axes = [i for i, n in enumerate(c.shape) if n == CFG.num_kv_heads]
    assert len(axes) <= 1, (c.shape, "ambiguous kv-head axis")
    return P(*(["model" if i in axes else None for i in range(c.ndim)]))
  return jax.tree.map(spec, cache)


def to_mesh(tree, specs, mesh):
  """Host data every process holds whole onto the global mesh: jax.device_put checks that
  every process passed the same values, and each process places only its own devices'
  shards (a model too large for one host: jax.make_array_from_callback, each process
  reading its shards' slices)."""
  return jax.device_put(tree, jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                           is_leaf=lambda x: isinstance(x, P)))


def to_host(x):
  """The whole value of a global array, on every process (a collective when it spans
  other processes' devices)."""
  return np.asarray(aq.sharding.to_host(x))


def model_and_data():
  """The model with random params from a numpy generator (the same on every process: no
  init program to compile), calibration batches and the prompts."""
  model = llama.LlamaForCausalLM(CFG)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, PROMPT), jnp.int32))
  rng = np.random.default_rng(SEED)

  def init(path, s):
    name = getattr(path[-1], "key", "")
    if name == "scale":  # norms: around 1, each channel its own
      return (1 + 0.2 * rng.standard_normal(s.shape)).astype(np.float32)
    if name == "embedding":
      return rng.standard_normal(s.shape).astype(np.float32)
    fan_in = s.shape[-2] if name == "kernel" else 1
    return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(np.float32)
  params = jax.tree_util.tree_map_with_path(init, shapes)
  data = np.random.default_rng(1)
  batches = [data.integers(0, CFG.vocab_size, (2, 16)).astype(np.int32) for _ in range(4)]
  prompt = data.integers(0, CFG.vocab_size, (BATCH, PROMPT)).astype(np.int32)
  return model, params, batches, prompt


def digest(tree) -> str:
  """A hash of every array of tree (gathered whole to the host), in tree order."""
  import hashlib
  h = hashlib.sha256()
  for x in jax.tree.leaves(aq.sharding.to_host(tree)):
    h.update(np.ascontiguousarray(x).tobytes())
  return h.hexdigest()


def run(model, params, batches, prompt, mesh):
  """Calibrate and quantize on the mesh, prefill + greedy decode through a sharded KV
  cache; every result gathered to the host. mesh None: one device, nothing sharded.

  The quantized weights come from one set of statistics, the one-device calibration's
  (every process computes it, the same): a mesh's calibration reorders f32 sums, which
  may move an activation absmax by an ulp and so a rounding of the quantized model. The
  calibration on the mesh runs too; its statistics are compared."""
  cfg = aq.QuantConfig(alpha=0.5, rotate=False)
  apply = aq.quantized_apply(model)
  cache = llama.init_cache(model, BATCH, PROMPT + NEW + 1)
  with jax.default_device(jax.local_devices()[0]):
    stats = aq.calibrate(model, params, batches, progress=False)
  out = {}
  if mesh is None:
    qparams = aq.quantize_params(jax.device_put(params), stats, cfg)
    cache = jax.device_put(cache)
    put = jax.device_put
  else:
    specs = megatron_specs(params)
    sharded = to_mesh(params, specs, mesh)
    on_mesh = aq.calibrate(model, sharded, batches, progress=False)
    out["calibration_absmax_rel_diff"] = max(
        float(np.abs(np.asarray(on_mesh[k].absmax) - np.asarray(stats[k].absmax)).max()
              / np.abs(np.asarray(stats[k].absmax)).max()) for k in stats)
    qparams = aq.quantize_params(sharded, stats, cfg)
    want = aq.quantized_partition_specs(qparams, specs)
    leaves = jax.tree_util.tree_flatten_with_path(qparams)[0]
    out["wrong_shardings"] = [jax.tree_util.keystr(p) for (p, a), s in
                              zip(leaves, jax.tree.leaves(want, is_leaf=lambda x: isinstance(x, P)))
                              if not a.sharding.is_equivalent_to(NamedSharding(mesh, s), a.ndim)]
    layer = qparams["params"]["layers"]
    shard = lambda a: list(a.addressable_shards[0].data.shape)
    out["weight_shards"] = {  # this process's first shard of each (values (L, N, K), scales (L, N))
        f"{block}/{name}": dict(values=shard(qk.values), shape=list(qk.values.shape), scale=shard(qk.scale),
                                local=len(qk.values.addressable_shards))
        for block, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                             ("mlp", ("gate_proj", "up_proj", "down_proj")))
        for name in names for qk in [layer[block][name]["kernel"]]}
    cache = to_mesh(cache, cache_specs(cache), mesh)
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P()))
  k_cache = cache["k"]
  out["cache_shape"], out["cache_shard_shape"] = list(k_cache.shape), list(k_cache.addressable_shards[0].data.shape)
  out["qparams_digest"] = digest(qparams)
  # Greedy generation as llama.generate runs it (prefill, then decode_loop's body: sample,
  # decode_step), the loop here in Python to keep every step's logits: one program less
  # to compile than decode_loop's scan too.
  logits, cache = llama.prefill(apply, qparams, cache, put(prompt))
  toks, step_logits = [], [logits]
  for _ in range(NEW):
    tok = llama.sample(logits, None)  # (temperature 0: argmax)
    logits, cache = llama.decode_step(apply, qparams, cache, tok)
    toks.append(tok)
    step_logits.append(logits)
  k_cache = cache["k"]
  out.update(tokens=np.stack([to_host(t) for t in toks], 1).tolist(),
             logits=np.stack([to_host(x) for x in step_logits], 1).tolist(),  # (B, NEW + 1, vocab)
             cache_k=to_host(k_cache).tolist(), cache_spec_after=str(getattr(k_cache.sharding, "spec", None)))
  return out


CANNOT_START = 77  # the exit status when jax.distributed cannot start here (the test skips)


def start(coordinator: str, num_processes: int, process_id: int) -> None:
  """jax.distributed.initialize, then one cross-process collective. On CPU the collectives
  are gloo's (jax_cpu_collectives_implementation, whose default is "gloo" in JAX 0.10:
  nothing to set). A runtime failure here is the machine's (no loopback network, no gloo
  in this jaxlib), not the code under test's: exit CANNOT_START (the test skips)."""
  try:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=60)
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("multiprocess_worker: started")
  except (RuntimeError, OSError) as e:  # (XlaRuntimeError is a RuntimeError)
    print(f"multiprocess_worker: jax.distributed cannot start: {type(e).__name__}: {e}", file=sys.stderr)
    sys.stderr.flush()
    os._exit(CANNOT_START)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("out", help="the JSON result (a run of several processes: OUT.<process id>, from each)")
  ap.add_argument("--process-id", type=int)
  ap.add_argument("--num-processes", type=int, default=1)
  ap.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator (omit: the single-process reference)")
  a = ap.parse_args()
  t0 = time.time()
  if a.coordinator:
    start(a.coordinator, a.num_processes, a.process_id)
  devices = jax.devices()
  model, params, batches, prompt = model_and_data()
  out = dict(process_index=jax.process_index(), process_count=jax.process_count(), devices=len(devices),
             local_devices=len(jax.local_devices()), device_processes=sorted({d.process_index for d in devices}))
  if a.coordinator or len(devices) > 1:
    out["mesh"] = run(model, params, batches, prompt, Mesh(np.array(devices), ("model",)))
  else:
    out["one_device"] = run(model, params, batches, prompt, None)
  out["seconds"] = time.time() - t0
  path = f"{a.out}.{jax.process_index()}" if a.coordinator else a.out
  with open(path + ".tmp", "w") as f:
    json.dump(out, f)
  os.replace(path + ".tmp", path)
  if a.coordinator:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
