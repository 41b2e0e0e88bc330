"""Result tables as files, written by the jobs that measure them (never edited by hand).

A job (`make demo`, `make llm`, `make bench-peers`) calls `publish(job, table, ...)`:
- docs/results/<job>.md: the block between `<!-- results:<job> -->` and
  `<!-- /results:<job> -->` becomes the run's header (command, date, machine) and its
  table; the file is created if missing, and the text around the block (notes) is kept;
- README.md (readme=True): the same markers there get a one-line header and the table.
The LLM job records `provenance()` in its json, so `run.py --render` rewrites the files
from a finished run without running the model.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS_DIR = ROOT / "docs" / "results"


class ResultsBlockError(ValueError):
  """A file lacks a job's markers (or holds them twice, or out of order)."""


def markers(job: str) -> tuple[str, str]:
  return f"<!-- results:{job} -->", f"<!-- /results:{job} -->"


def replace_block(text: str, job: str, content: str, *, where: str = "text") -> str:
  """`text` with everything between the job's markers replaced by `content`; the markers
  and all text outside them are kept as they are."""
  start, end = markers(job)
  counts = text.count(start), text.count(end)
  if counts != (1, 1):
    raise ResultsBlockError(
        f"{where} must hold the markers {start} and {end} once each (found {counts[0]} and {counts[1]}): "
        f"add them around the {job!r} table so the job knows what to replace")
  i, j = text.index(start) + len(start), text.index(end)
  if j < i:
    raise ResultsBlockError(f"{where}: {end} comes before {start}")
  return text[:i] + "\n" + content.strip("\n") + "\n" + text[j:]


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (elsewhere what `platform` knows)."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or "unknown"


def machine() -> str:
  """CPU model, core count and load average, as a run's header states them."""
  try:
    load = "load average " + " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"
  except OSError:
    load = "load average unknown"
  return f"{cpu_model()}, {os.cpu_count()} cores, {load}"


def command_line(argv: list[str] | None = None) -> str:
  """This process's command, as it would be typed in the repository root."""
  argv = list(sys.argv if argv is None else argv)
  script = Path(argv[0]).resolve() if argv else None
  if script is not None and script.is_relative_to(ROOT):
    argv[0] = str(script.relative_to(ROOT))
  return shlex.join(["python", *argv])


def provenance(command: str | None = None, extra=()) -> dict:
  """What a run's header states: command, date (UTC), machine, and extra lines (versions)."""
  return dict(command=command or command_line(),
              date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              machine=machine(), extra=list(extra))


def _fill(text: str, indent: str = "") -> str:
  # prose wrapped like the rest of the docs; a command is never split inside a word
  return textwrap.fill(text, 100, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)


def job_block(info: dict, table: str) -> str:
  """The docs/results/<job>.md block: the run's header, then its table."""
  lines = [f"- command: `{info['command']}`", f"- date: {info['date']}", f"- machine: {info['machine']}"]
  lines += [f"- {e}" for e in info.get("extra", ())]
  return "\n".join(_fill(line, "  ") for line in lines) + "\n\n" + table.strip("\n")


def readme_block(info: dict, table: str) -> str:
  """README's headline block: the run's provenance in a sentence, then the table."""
  return _fill(f"`{info['command']}`, {info['date']}, {info['machine']}:") + "\n\n" + table.strip("\n")


def write_job_file(job: str, table: str, info: dict, *, title: str, intro: str = "",
                   path: Path | None = None) -> Path:
  """Writes the run into docs/results/<job>.md (or `path`): creates the file with a title
  and the marked block, or replaces only the block of an existing one."""
  path = Path(path or RESULTS_DIR / f"{job}.md")
  start, end = markers(job)
  if path.exists():
    text = path.read_text()
  else:
    intro = intro or (f"Written by the job (`benchmarks/results_md.py`): a rerun replaces the block between the "
                      f"`results:{job}` markers;\nthe text around it is kept.")
    text = f"# {title}\n\n{intro.strip()}\n\n{start}\n{end}\n"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(replace_block(text, job, job_block(info, table), where=str(path)))
  return path


def update_readme(job: str, table: str, info: dict, *, readme: Path | None = None) -> Path:
  """Replaces README's block for `job` with the headline table; raises ResultsBlockError
  (and writes nothing) when README lacks the markers."""
  readme = Path(readme or README)
  text = readme.read_text()
  new = replace_block(text, job, readme_block(info, table), where=str(readme))
  if new != text:
    readme.write_text(new)
  return readme


def publish(job: str, table: str, *, title: str, intro: str = "", info: dict | None = None,
            readme: bool = False, log=None) -> list[Path]:
  """docs/results/<job>.md, and README's headline block when `readme`, from one run."""
  info = info or provenance()
  log = log or (lambda s: print(s, file=sys.stderr, flush=True))
  if readme:  # README's markers checked before anything is written
    replace_block(README.read_text(), job, "", where=str(README))
  paths = [write_job_file(job, table, info, title=title, intro=intro)]
  if readme:
    paths.append(update_readme(job, table, info))
  log("wrote " + " and ".join(str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in paths))
  return paths
