"""Offline English text for the small LLM: the documentation that ships inside CPython --
the language reference topics behind help() (pydoc_data/topics.py) and the docstrings of
the standard library's modules, classes and functions (Lib/**/*.py, tests excluded).

Documents are split into train / held-out by a hash of their name (1 in 20 held out), so
the held-out text is whole topics and modules the model never saw.
"""

from __future__ import annotations

import ast
import sysconfig
import zlib
from pathlib import Path

HELD_OUT_EVERY = 20
EOS = "<|endoftext|>"


def topic_documents() -> list[tuple[str, str]]:
  from pydoc_data.topics import topics
  return [(f"topic:{k}", v.strip()) for k, v in sorted(topics.items())]


def _docstrings(tree: ast.Module) -> list[str]:
  out = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      d = ast.get_docstring(node, clean=True)
      if d and len(d) >= 40:
        out.append(d)
  return out


def module_documents() -> list[tuple[str, str]]:
  """One document per stdlib module: its docstrings joined by blank lines."""
  lib = Path(sysconfig.get_paths()["stdlib"])
  docs = []
  for p in sorted(lib.rglob("*.py")):
    rel = p.relative_to(lib)
    if rel.parts[0] in ("test", "idlelib", "site-packages", "lib2to3") or "tests" in rel.parts:
      continue
    try:
      tree = ast.parse(p.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
      continue
    parts = _docstrings(tree)
    if parts:
      docs.append((f"module:{rel.as_posix()}", "\n\n".join(parts)))
  return docs


def is_held_out(name: str) -> bool:
  return zlib.crc32(name.encode()) % HELD_OUT_EVERY == 0


def split_documents() -> tuple[list[str], list[str]]:
  """-> (train texts, held-out texts)."""
  train, held = [], []
  for name, text in topic_documents() + module_documents():
    (held if is_held_out(name) else train).append(text)
  return train, held
