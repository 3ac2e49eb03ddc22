"""Tests for jobs.demo, the README's first command: its rows, its quiet terminal, and the README showing what it prints."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from qwen_batch.jobs.demo import SHOWN_COLUMNS, SHOWN_ROWS

ROOT = Path(__file__).resolve().parents[1]
ROWS = 40
# Everything the demo may print on stderr: qwen-batch's own log records (the plan, the log file, the progress).
OWN_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING) qwen_batch(\.\w+)+: ")


@pytest.mark.engine
def test_the_demo_writes_its_rows_and_shows_only_its_progress_and_summary(tmp_path: Path) -> None:
    # Short and under /tmp: Ray's session folder (under the temp folder) holds Unix sockets, whose paths may not pass
    # 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="qb-demo-", dir="/tmp"))
    try:
        # The README's command as a newcomer runs it: the run log in its default place, under the temp folder.
        env = {**os.environ, "TMPDIR": str(temp_dir), "QWEN_BATCH_MODEL_DIR": str(tmp_path / "models")}
        env.pop("QWEN_BATCH_LOG_DIR", None)
        done = subprocess.run([sys.executable, "-m", "qwen_batch.jobs.cli", "demo", "--dir", str(tmp_path / "demo"),
                               "--rows", str(ROWS)], capture_output=True, text=True, timeout=900, env=env)
        assert done.returncode == 0, done.stderr
        log_files = list((temp_dir / "qwen-batch").glob("demo-review-sentiment-*/*.log"))
        assert len(log_files) == 1
        logged = log_files[0].read_text()
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)

    table = pq.read_table(tmp_path / "demo" / "output").sort_by("id")
    assert table.column("id").to_pylist() == [f"r{i:05d}" for i in range(ROWS)]
    assert table.column("error_type").to_pylist() == [None] * (ROWS - 1) + ["empty_prompt"]
    assert all(tokens > 0 for tokens in table.column("completion_tokens").to_pylist()[:-1])

    out = done.stdout.splitlines()
    assert out[0].startswith("job demo-review-sentiment-") and f"{ROWS} rows ({ROWS - 1} ok, 1 failed)" in out[0]
    assert out[1].startswith("tokens: ") and out[2].startswith("cost: $")
    assert out[3:5] == [f"spec: {tmp_path / 'demo' / 'spec.yaml'}",
                        f"manifest: {tmp_path / 'demo' / 'output' / '_manifest.json'}"]
    shown = [json.loads(line) for line in out[-SHOWN_ROWS:]]
    assert shown == table.select(SHOWN_COLUMNS).slice(ROWS - SHOWN_ROWS).to_pylist()

    stderr = done.stderr.splitlines()
    assert [line for line in stderr if not OWN_RECORD.match(line)] == []
    assert f"Ray and vLLM output of this run: {log_files[0]}" in done.stderr
    assert f"{ROWS}/{ROWS} rows (100%)" in stderr[-1]
    # What the terminal did not show went to the log file: Ray's lines, the engine actor's vLLM lines.
    assert "Started a local Ray instance" in logged
    assert re.search(r"^\(MapWorker\(MapBatches\(EngineStage\)\) pid=\d+\) .*vLLM", logged, re.MULTILINE)


def test_the_readme_starts_with_the_two_commands_and_a_row_as_the_demo_prints_it() -> None:
    readme = (ROOT / "README.md").read_text()
    first_screen = readme.split("\n## ", 2)[1]
    assert first_screen.startswith("Try it")
    blocks = re.findall(r"```(\w*)\n(.*?)```", first_screen, re.DOTALL)
    commands = [line.split("#")[0].strip() for line in blocks[0][1].splitlines()]
    assert (blocks[0][0], commands) == ("bash", ["./run demo", "./run test"])
    rows = [json.loads(line) for line in blocks[1][1].splitlines() if line.startswith("{")]
    assert rows and all(list(row) == SHOWN_COLUMNS for row in rows)
