"""Quantized checkpoints that survive: qparams (and calibration stats) saved with Orbax,
restored bit for bit, onto one device or a mesh, and refused loudly when they are
corrupt, truncated, or for another model or config.

Layout of a checkpoint directory:
  actquant.json   format tag, the tree's skeleton (dicts, QuantizedKernel nodes with their
                  static qtype, arrays with shape/dtype/sha256), the QuantConfig used
  params/         the arrays, an Orbax StandardCheckpointer checkpoint
  stats.npz       calibration stats (optional; calibrate.save_stats format)

The skeleton is what makes restore need no template: the tree (QuantizedKernel nodes and
their qtype, which are static and not arrays) is rebuilt from it; the sha256 of every
array is checked after reading, so a flipped bit is an error, not a different model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from actquant_jax.calibrate import load_stats, save_stats
from actquant_jax.config import LayerRule, QuantConfig
from actquant_jax.quant import QuantizedKernel

FORMAT = "actquant-jax-checkpoint/1"
_QK_FIELDS = ("values", "scale", "act_scale", "inv_smooth", "kept")
_QK_LAYOUT = ("contract", "out", "param_shape", "param_dtype", "folded_into", "dataflow")  # static, JSON


def _sha256(a) -> str:
  a = np.ascontiguousarray(np.asarray(a))
  return hashlib.sha256(a.view(np.uint8).reshape(-1).tobytes() if a.size else b"").hexdigest()


def _skeleton(node, path: str, leaves: list):
  """JSON-able description of the tree; appends arrays to `leaves` in order."""
  if isinstance(node, QuantizedKernel):
    layout = {f: list(getattr(node, f)) if isinstance(getattr(node, f), tuple) else getattr(node, f)
              for f in _QK_LAYOUT}
    return {"__quantized_kernel__": {"qtype": node.qtype, "act_key": node.act_key, "layout": layout, **{
        f: None if getattr(node, f) is None else _skeleton(getattr(node, f), f"{path}/{f}", leaves)
        for f in _QK_FIELDS}}}
  if isinstance(node, dict):
    for k in node:
      if not isinstance(k, str):
        raise TypeError(f"save_checkpoint: only string dict keys are supported, got {k!r} at {path or '/'}")
    return {k: _skeleton(v, f"{path}/{k}", leaves) for k, v in node.items()}
  if node is None:
    return None
  if isinstance(node, (jax.Array, np.ndarray)):
    leaves.append(node)
    return {"__array__": len(leaves) - 1, "shape": list(node.shape), "dtype": np.dtype(node.dtype).name,
            "sha256": _sha256(node)}
  raise TypeError(f"save_checkpoint: unsupported node {type(node).__name__} at {path or '/'}")


def _abstract(skel, shardings, path: str):
  """The restore target (ShapeDtypeStructs in the saved tree structure). `shardings` is
  None, one Sharding, a function of the path, or a tree shaped like the params."""
  if skel is None:
    return None
  if "__array__" in skel:
    sharding = shardings(path) if callable(shardings) else shardings
    return jax.ShapeDtypeStruct(tuple(skel["shape"]), np.dtype(skel["dtype"]), sharding=sharding)
  sub = lambda key: (getattr(shardings, key) if isinstance(shardings, QuantizedKernel) else
                     shardings[key] if isinstance(shardings, dict) else shardings)
  if "__quantized_kernel__" in skel:
    q = skel["__quantized_kernel__"]
    layout = {f: tuple(v) if isinstance(v, list) else v for f, v in q.get("layout", {}).items() if f in _QK_LAYOUT}
    return QuantizedKernel(**{f: _abstract(q.get(f), sub(f), f"{path}/{f}") for f in _QK_FIELDS}, qtype=q["qtype"],
                           act_key=q.get("act_key", ""), **layout)
  if isinstance(shardings, dict) and set(shardings) != set(skel):
    raise ValueError(f"restore_checkpoint: {path or '/'}: the shardings tree does not match the checkpoint")
  return {k: _abstract(v, sub(k), f"{path}/{k}") for k, v in skel.items()}


def _config_to_json(config: QuantConfig | None):
  return None if config is None else dataclasses.asdict(config)


def _config_from_json(d) -> QuantConfig | None:
  if d is None:
    return None
  d = dict(d)
  d["rules"] = tuple(LayerRule(**r) for r in d.get("rules", ()))
  d["alpha_grid"] = tuple(d.get("alpha_grid", ()))
  return QuantConfig(**d)


def save_checkpoint(directory, qparams, *, stats: dict | None = None, config: QuantConfig | None = None,
                    overwrite: bool = False) -> Path:
  """Save qparams (dicts of arrays and QuantizedKernel nodes; linen variables or a param
  dict) with optional calibration stats and the QuantConfig that made them."""
  import orbax.checkpoint as ocp
  directory = Path(directory).absolute()
  if directory.exists():
    if not overwrite:
      raise FileExistsError(f"save_checkpoint: {directory} exists (pass overwrite=True to replace it)")
    shutil.rmtree(directory)
  leaves: list = []
  skeleton = _skeleton(qparams, "", leaves)
  directory.mkdir(parents=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(directory / "params", qparams)
  ckptr.wait_until_finished()
  if stats is not None:
    save_stats(stats, directory / "stats.npz")
  meta = dict(format=FORMAT, skeleton=skeleton, config=_config_to_json(config), has_stats=stats is not None)
  (directory / "actquant.json").write_text(json.dumps(meta, indent=1))
  return directory


def _read_meta(directory: Path) -> dict:
  f = directory / "actquant.json"
  if not f.exists():
    raise ValueError(f"restore_checkpoint: {directory} is not an actquant-jax checkpoint (no actquant.json)")
  try:
    meta = json.loads(f.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"restore_checkpoint: {f} is corrupt: {e}") from None
  if meta.get("format") != FORMAT:
    raise ValueError(f"restore_checkpoint: {directory}: unknown format {meta.get('format')!r} (expected {FORMAT!r})")
  return meta


def _check_like(saved, like, path=""):
  """Every module of the expected model (`like`: float params or qparams) must be in the
  checkpoint with matching shapes, and nothing else."""
  if isinstance(saved, QuantizedKernel) or isinstance(like, QuantizedKernel):
    # A QuantizedKernel is compared as the float weight it stands for (any layout).
    s = saved.float_shape if isinstance(saved, QuantizedKernel) else tuple(saved.shape)
    l_ = like.float_shape if isinstance(like, QuantizedKernel) else tuple(np.shape(like))
    if tuple(s) != tuple(l_):
      raise ValueError(f"restore_checkpoint: {path}: checkpoint has a ({', '.join(map(str, s))}) kernel, the model "
                       f"expects ({', '.join(map(str, l_))}): a checkpoint of another model?")
    return
  if isinstance(saved, dict) or isinstance(like, dict):
    if not (isinstance(saved, dict) and isinstance(like, dict)):
      raise ValueError(f"restore_checkpoint: {path or '/'}: structure differs from the model")
    if set(saved) != set(like):
      raise ValueError(f"restore_checkpoint: {path or '/'}: checkpoint has {sorted(set(saved) - set(like))} the model "
                       f"lacks and lacks {sorted(set(like) - set(saved))}: a checkpoint of another model?")
    for k in saved:
      _check_like(saved[k], like[k], f"{path}/{k}")
    return
  if saved is None or like is None:
    if saved is not like:
      raise ValueError(f"restore_checkpoint: {path}: structure differs from the model")
    return
  if tuple(saved.shape) != tuple(np.shape(like)):
    raise ValueError(f"restore_checkpoint: {path}: checkpoint has shape {tuple(saved.shape)}, the model expects "
                     f"{tuple(np.shape(like))}: a checkpoint of another model?")


def restore_checkpoint(directory, *, like=None, config: QuantConfig | None = None,
                       shardings: Any = None):
  """Restore (qparams, stats or None) from `directory`.

  like:      the expected model's params (float or quantized) -- a checkpoint of another
             model (other layers or shapes) raises instead of loading.
  config:    the expected QuantConfig -- a checkpoint made with another one raises.
  shardings: where to put the arrays: one jax.sharding.Sharding for all, a tree shaped
             like the params (e.g. NamedShardings over aq.quantized_partition_specs), or a
             function (path, e.g. "/params/fc1/kernel/values") -> Sharding; None: default.
  Raises ValueError on a missing, truncated or corrupt checkpoint (every array's sha256 is
  checked) and on any mismatch above.
  """
  import orbax.checkpoint as ocp
  directory = Path(directory).absolute()
  meta = _read_meta(directory)
  saved_config = _config_from_json(meta.get("config"))
  if config is not None and saved_config != config:
    raise ValueError(f"restore_checkpoint: {directory} was made with {saved_config}, expected {config}")
  target = _abstract(meta["skeleton"], shardings, "")
  if like is not None:
    _check_like(target, like)
  try:
    restored = ocp.StandardCheckpointer().restore(directory / "params", target)
  except Exception as e:  # orbax/tensorstore raise many types for missing or damaged files
    raise ValueError(f"restore_checkpoint: {directory}: checkpoint data is missing, truncated or corrupt "
                     f"({type(e).__name__}: {str(e)[:300]})") from e
  leaves: list = []
  skeleton = _skeleton(restored, "", leaves)
  _verify(meta["skeleton"], skeleton, "")
  stats = None
  if meta.get("has_stats"):
    try:
      stats = load_stats(directory / "stats.npz")
    except Exception as e:
      raise ValueError(f"restore_checkpoint: {directory}/stats.npz is missing or corrupt ({e})") from e
  return restored, stats


def _verify(expected, got, path):
  if isinstance(expected, dict) and "__array__" in expected:
    for key in ("shape", "dtype", "sha256"):
      if expected[key] != got[key]:
        raise ValueError(f"restore_checkpoint: {path}: {key} of the restored array does not match the "
                         f"checkpoint's record: the data is corrupt")
    return
  if isinstance(expected, dict):
    for k in expected:
      _verify(expected[k], got[k], f"{path}/{k}")
