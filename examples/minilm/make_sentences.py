"""Make the calibration and evaluation sentences shipped in data/ (run once; the output
is committed). Source: docstrings of the CPython 3.11 standard library, under the PSF
License Version 2 (which allows redistribution with the notice kept; see data/README.md).

  python examples/minilm/make_sentences.py
"""

import importlib
import inspect
import random
import re
from pathlib import Path

MODULES = """abc argparse ast asyncio base64 bisect calendar codecs collections colorsys configparser
contextlib copy csv dataclasses datetime decimal difflib email enum filecmp fileinput fnmatch
fractions ftplib functools gettext glob gzip hashlib heapq hmac html http imaplib inspect io
ipaddress itertools json logging lzma mailbox math mimetypes numbers operator optparse os pathlib
pickle pkgutil platform plistlib poplib pprint queue random re sched secrets selectors shelve
shlex shutil signal smtplib socket socketserver sqlite3 ssl statistics string struct subprocess
tarfile tempfile textwrap threading timeit tokenize trace traceback turtle typing unittest urllib
uuid warnings wave weakref xml zipfile zoneinfo""".split()

SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def docstrings():
  for name in MODULES:
    try:
      mod = importlib.import_module(name)
    except Exception:
      continue
    yield inspect.getdoc(mod) or ""
    for _, obj in sorted(vars(mod).items()):
      if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "").startswith(name):
        yield inspect.getdoc(obj) or ""
        if inspect.isclass(obj):
          for _, meth in sorted(vars(obj).items()):
            if inspect.isfunction(meth):
              yield inspect.getdoc(meth) or ""


def sentences():
  seen = set()
  for doc in docstrings():
    for para in doc.split("\n\n"):
      if re.search(r"(>>>|::|\s{2,}\S|[{}\[\]=_<>|\\])", para):  # code, tables, signatures
        continue
      for s in SENT.split(" ".join(para.split())):
        words = s.split()
        if 8 <= len(words) <= 40 and s[0].isupper() and s.endswith(".") and s.lower() not in seen:
          seen.add(s.lower())
          yield s


def main():
  out = Path(__file__).parent / "data"
  sents = list(sentences())
  random.Random(0).shuffle(sents)
  calib, evals = sents[:320], sents[320:920]
  (out / "calibration.txt").write_text("\n".join(calib) + "\n")
  (out / "evaluation.txt").write_text("\n".join(evals) + "\n")
  print(f"{len(sents)} sentences: {len(calib)} calibration, {len(evals)} evaluation -> {out}")


if __name__ == "__main__":
  main()
