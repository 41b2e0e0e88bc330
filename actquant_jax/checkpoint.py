"""Quantized checkpoints that survive: qparams (and calibration stats) saved with Orbax,
restored bit for bit, onto one device or a mesh, and refused loudly when they are
corrupt, truncated, or for another model or config.

Layout of a checkpoint directory:
  actquant.json   format tag, and a sha256 over the rest: the tree's skeleton (dicts,
                  QuantizedKernel nodes with their static qtype, arrays with
                  shape/dtype/sha256), the QuantConfig used, the stats file's sha256
  params/         the arrays, an Orbax StandardCheckpointer checkpoint
  stats.npz       calibration stats (optional; calibrate.save_stats format)

The skeleton is what makes restore need no template: the tree (QuantizedKernel nodes and
their qtype, which are static and not arrays) is rebuilt from it; the sha256 of every
array is checked after reading, so a flipped bit is an error, not a different model.
Everything read back is covered by a checksum (the metadata by its own); every damage
ends in CheckpointError. Saving writes a new directory beside the target and renames it
into place; overwrite=True replaces only a directory that is an actquant-jax checkpoint
holding nothing but the library's own files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np

from actquant_jax.calibrate import load_stats, save_stats
from actquant_jax.config import LayerRule, QuantConfig
from actquant_jax.errors import CheckpointError, CheckpointExistsError, CheckpointTypeError
from actquant_jax.quant import QuantizedKernel

FORMAT = "actquant-jax-checkpoint/2"
_FORMAT_PREFIX = "actquant-jax-checkpoint/"
_META, _PARAMS, _STATS = "actquant.json", "params", "stats.npz"
_OWN_ENTRIES = frozenset({_META, _PARAMS, _STATS})  # all a checkpoint directory holds
_QK_FIELDS = ("values", "scale", "act_scale", "inv_smooth", "kept")
_QK_LAYOUT = ("contract", "out", "param_shape", "param_dtype", "folded_into", "dataflow", "rotated")  # static, JSON


def _sha256(a) -> str:
  a = np.ascontiguousarray(np.asarray(a))
  return hashlib.sha256(a.view(np.uint8).reshape(-1).tobytes() if a.size else b"").hexdigest()


def _skeleton(node, path: str, leaves: list):
  """JSON-able description of the tree; appends arrays to `leaves` in order."""
  if isinstance(node, QuantizedKernel):
    layout = {f: list(getattr(node, f)) if isinstance(getattr(node, f), tuple) else getattr(node, f)
              for f in _QK_LAYOUT}
    return {"__quantized_kernel__": {"qtype": node.qtype, "act_group": node.act_group, "layout": layout, **{
        f: None if getattr(node, f) is None else _skeleton(getattr(node, f), f"{path}/{f}", leaves)
        for f in _QK_FIELDS}}}
  if isinstance(node, dict):
    for k in node:
      if not isinstance(k, str):
        raise CheckpointTypeError(f"save_checkpoint: only string dict keys are supported, got {k!r} at {path or '/'}")
    return {k: _skeleton(v, f"{path}/{k}", leaves) for k, v in node.items()}
  if node is None:
    return None
  if isinstance(node, (jax.Array, np.ndarray)):
    leaves.append(node)
    return {"__array__": len(leaves) - 1, "shape": list(node.shape), "dtype": np.dtype(node.dtype).name,
            "sha256": _sha256(node)}
  raise CheckpointTypeError(f"save_checkpoint: unsupported node {type(node).__name__} at {path or '/'}")


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
                           act_group=q.get("act_group", ""), **layout)
  if isinstance(shardings, dict) and set(shardings) != set(skel):
    raise CheckpointError(f"restore_checkpoint: {path or '/'}: the shardings tree does not match the checkpoint")
  return {k: _abstract(v, sub(k), f"{path}/{k}") for k, v in skel.items()}


def _config_to_json(config: QuantConfig | None):
  return None if config is None else dataclasses.asdict(config)


def _config_from_json(d) -> QuantConfig | None:
  if d is None:
    return None
  d = dict(d)
  d["rules"] = tuple(LayerRule(**r) for r in d.get("rules", ()))
  d["alpha_grid"] = tuple(d.get("alpha_grid", ()))
  d.setdefault("rotate", False)  # written before rotation existed: not rotated (the default is now True)
  d.setdefault("weight_rounding", "nearest")  # written before GPTQ existed
  return QuantConfig(**d)


def _digest(meta) -> str:
  return hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_replaceable(directory: Path):
  """overwrite=True replaces `directory` only if it is one of our checkpoints holding
  nothing but our own entries (so nothing the library did not write is ever deleted)."""
  if not directory.is_dir():
    raise CheckpointError(f"save_checkpoint: {directory} is a file, not a checkpoint directory; overwrite=True "
                          "only replaces an actquant-jax checkpoint: remove the file or choose another path")
  try:
    fmt = json.loads((directory / _META).read_bytes().decode("utf-8")).get("format")
  except (OSError, ValueError, AttributeError):
    fmt = None
  if not (isinstance(fmt, str) and fmt.startswith(_FORMAT_PREFIX)):
    raise CheckpointError(f"save_checkpoint: {directory} exists and is not an actquant-jax checkpoint (no valid "
                          f"{_META}); overwrite=True only replaces the library's own checkpoints")
  foreign = sorted(set(os.listdir(directory)) - _OWN_ENTRIES)
  if foreign:
    raise CheckpointError(f"save_checkpoint: {directory} holds files the library did not write: {foreign}; "
                          "move them out (overwrite=True never deletes them) or save elsewhere")


def save_checkpoint(directory, qparams, *, stats: dict | None = None, config: QuantConfig | None = None,
                    overwrite: bool = False) -> Path:
  """Save qparams (dicts of arrays and QuantizedKernel nodes; linen variables or a param
  dict) with optional calibration stats and the QuantConfig that made them.

  The checkpoint is written to a new directory beside `directory` and renamed into place,
  so a failed save leaves the old one untouched. overwrite=True replaces an existing
  actquant-jax checkpoint; anything else (a file, another directory, a checkpoint holding
  files the library did not write) raises CheckpointError and is left as it is.
  """
  import orbax.checkpoint as ocp
  directory = Path(directory).absolute()
  replacing = directory.exists() or directory.is_symlink()
  if replacing:
    if not overwrite:
      raise CheckpointExistsError(f"save_checkpoint: {directory} exists (pass overwrite=True to replace it)")
    _check_replaceable(directory)
  leaves: list = []
  skeleton = _skeleton(qparams, "", leaves)
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.saving-", dir=directory.parent))
  try:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp / _PARAMS, qparams)
    ckptr.wait_until_finished()
    stats_sha = None
    if stats is not None:
      save_stats(stats, tmp / _STATS)
      stats_sha = _file_sha256(tmp / _STATS)
    meta = dict(skeleton=skeleton, config=_config_to_json(config), has_stats=stats is not None,
                stats_sha256=stats_sha)
    (tmp / _META).write_text(json.dumps(dict(format=FORMAT, sha256=_digest(meta), meta=meta), indent=1))
    if replacing:
      old = directory.parent / f".{directory.name}.replaced-{uuid.uuid4().hex[:8]}"
      os.rename(directory, old)
      try:
        os.rename(tmp, directory)
      except BaseException:
        os.rename(old, directory)
        raise
      for name in _OWN_ENTRIES:  # only what the library wrote (checked above)
        p = old / name
        if p.is_dir() and not p.is_symlink():
          shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
          p.unlink()
      old.rmdir()
    else:
      os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def _read_meta(directory: Path) -> dict:
  """The verified metadata dict (skeleton, config, has_stats, stats_sha256)."""
  f = directory / _META
  if not directory.is_dir() or not f.is_file():
    raise CheckpointError(f"restore_checkpoint: {directory} is not an actquant-jax checkpoint (no {_META})")
  try:
    doc = json.loads(f.read_bytes().decode("utf-8"))
  except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    raise CheckpointError(f"restore_checkpoint: {f} is corrupt: {type(e).__name__}: {str(e)[:200]}") from None
  fmt = doc.get("format") if isinstance(doc, dict) else None
  if fmt != FORMAT:
    if isinstance(fmt, str) and fmt.startswith(_FORMAT_PREFIX):
      raise CheckpointError(f"restore_checkpoint: {directory}: format {fmt!r} is not {FORMAT!r} (this version reads "
                            "only checkpoints whose metadata is checksummed): save it again")
    raise CheckpointError(f"restore_checkpoint: {f} is corrupt: unknown format {str(fmt)[:80]!r} (expected {FORMAT!r})")
  meta = doc.get("meta")
  if not isinstance(meta, dict) or doc.get("sha256") != _digest(meta):
    raise CheckpointError(f"restore_checkpoint: {f} does not match its checksum: the metadata was edited or is "
                          "corrupt")
  return meta


def _check_like(saved, like, path=""):
  """Every module of the expected model (`like`: float params or qparams) must be in the
  checkpoint with matching shapes, and nothing else."""
  if isinstance(saved, QuantizedKernel) or isinstance(like, QuantizedKernel):
    # A QuantizedKernel is compared as the float weight it stands for (any layout).
    s = saved.float_shape if isinstance(saved, QuantizedKernel) else tuple(saved.shape)
    l_ = like.float_shape if isinstance(like, QuantizedKernel) else tuple(np.shape(like))
    if tuple(s) != tuple(l_):
      raise CheckpointError(f"restore_checkpoint: {path}: checkpoint has a ({', '.join(map(str, s))}) kernel, the model "
                       f"expects ({', '.join(map(str, l_))}): a checkpoint of another model?")
    return
  if isinstance(saved, dict) or isinstance(like, dict):
    if not (isinstance(saved, dict) and isinstance(like, dict)):
      raise CheckpointError(f"restore_checkpoint: {path or '/'}: structure differs from the model")
    if set(saved) != set(like):
      raise CheckpointError(f"restore_checkpoint: {path or '/'}: checkpoint has {sorted(set(saved) - set(like))} the model "
                       f"lacks and lacks {sorted(set(like) - set(saved))}: a checkpoint of another model?")
    for k in saved:
      _check_like(saved[k], like[k], f"{path}/{k}")
    return
  if saved is None or like is None:
    if saved is not like:
      raise CheckpointError(f"restore_checkpoint: {path}: structure differs from the model")
    return
  if tuple(saved.shape) != tuple(np.shape(like)):
    raise CheckpointError(f"restore_checkpoint: {path}: checkpoint has shape {tuple(saved.shape)}, the model expects "
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
  Raises CheckpointError (a ValueError) on a missing, truncated or corrupt checkpoint
  (every array's and the metadata's sha256 is checked) and on any mismatch above.
  """
  import orbax.checkpoint as ocp
  directory = Path(directory).absolute()
  meta = _read_meta(directory)
  try:  # checksummed, so only a bug or another writer gets past with a bad shape
    saved_config = _config_from_json(meta.get("config"))
    target = _abstract(meta["skeleton"], shardings, "")
  except CheckpointError:
    raise
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise CheckpointError(f"restore_checkpoint: {directory}: unreadable metadata ({type(e).__name__}: {e})") from e
  if config is not None and saved_config != config:
    raise CheckpointError(f"restore_checkpoint: {directory} was made with {saved_config}, expected {config}")
  if like is not None:
    _check_like(target, like)
  try:
    restored = ocp.StandardCheckpointer().restore(directory / _PARAMS, target)
  except Exception as e:  # orbax/tensorstore raise many types for missing or damaged files
    raise CheckpointError(f"restore_checkpoint: {directory}: checkpoint data is missing, truncated or corrupt "
                          f"({type(e).__name__}: {str(e)[:300]})") from e
  try:
    leaves: list = []
    skeleton = _skeleton(restored, "", leaves)
    _verify(meta["skeleton"], skeleton, "")
  except CheckpointError:
    raise
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise CheckpointError(f"restore_checkpoint: {directory}: restored data does not match the checkpoint's "
                          f"record ({type(e).__name__}): the data is corrupt") from e
  stats = None
  if meta.get("has_stats"):
    f = directory / _STATS
    if not f.is_file() or _file_sha256(f) != meta.get("stats_sha256"):
      raise CheckpointError(f"restore_checkpoint: {f} is missing or does not match its checksum (corrupt)")
    try:
      stats = load_stats(f)
    except Exception as e:
      raise CheckpointError(f"restore_checkpoint: {f} is corrupt ({type(e).__name__}: {e})") from e
  return restored, stats


def _verify(expected, got, path):
  if isinstance(expected, dict) and "__array__" in expected:
    for key in ("shape", "dtype", "sha256"):
      if expected[key] != got[key]:
        raise CheckpointError(f"restore_checkpoint: {path}: {key} of the restored array does not match the "
                         f"checkpoint's record: the data is corrupt")
    return
  if isinstance(expected, dict):
    for k in expected:
      _verify(expected[k], got[k], f"{path}/{k}")
