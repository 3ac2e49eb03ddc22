"""A row that kills its engine where Python cannot see it (a crash in native code, a kill for memory): the job
isolates it and answers every other row, instead of retrying the same shard forever."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from processes import stop_processes  # tests/ is on sys.path, as pytest puts conftest folders there

pytestmark = pytest.mark.engine

ROWS, POISON = 12, 5
MARK = " zebraquokka"  # a word only the poison row's prompt holds

# A driver of its own, whose Ray runs a setup hook in every worker: the engines it builds SIGKILL their own process
# when a prompt holding MARK's tokens is added, as a segfaulting kernel would, with no Python error to catch.
DRIVER = r'''
import json, os, signal, sys
import ray

def poison_engines():
    from qwen_batch.pipelines import engine as stage
    build = stage.new_llm_engine

    def new_llm_engine(config):
        llm = build(config)
        mark = llm.get_tokenizer().encode(MARK, add_special_tokens=False)
        add = llm.add_request

        def add_request(request_id, prompt, params, *args, **kwargs):
            ids = prompt["prompt_token_ids"]
            if any(ids[i:i + len(mark)] == mark for i in range(len(ids))):
                os.kill(os.getpid(), signal.SIGKILL)
            return add(request_id, prompt, params, *args, **kwargs)

        llm.add_request = add_request
        return llm

    stage.new_llm_engine = new_llm_engine

if __name__ == "__main__":
    from qwen_batch.jobs.driver import run_job
    from qwen_batch.schemas.spec import load_spec

    MARK = sys.argv[2]
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20, _temp_dir=sys.argv[3],
             runtime_env={"worker_process_setup_hook": poison_engines})
    manifest = run_job(load_spec(json.loads(sys.argv[1])))
    print(json.dumps({"complete": manifest.complete, "rows_failed": manifest.rows_failed,
                      "engine_restarts": manifest.runs[-1].engine_restarts}))
    ray.shutdown()
'''


def test_a_row_that_kills_its_engine_natively_becomes_an_engine_error_row_and_the_rest_are_answered(
        tmp_path: Path, tiny_models) -> None:
    (tmp_path / "input").mkdir()
    lines = [{"rid": f"r{i:02d}", "text": f"question {i}" + (MARK if i == POISON else "")} for i in range(ROWS)]
    (tmp_path / "input" / "rows.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    spec = {"name": "poison", "input": {"path": str(tmp_path / "input"), "format": "jsonl", "id_column": "rid",
                                        "rows_per_shard": 4},
            "prompt": {"template": "Answer briefly: {text}"}, "model": {"variant": "tiny-qwen2", "max_model_len": 256},
            "sampling": {"max_tokens": 4, "temperature": 0}, "output": {"path": str(tmp_path / "out")}}
    ray_dir = tempfile.mkdtemp(prefix="qb-poison-", dir="/tmp")  # Ray's socket paths may not pass 107 bytes
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(spec), MARK, ray_dir], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = driver.communicate(timeout=900)
    finally:
        # Whatever the driver left running (its Ray, in its session) is stopped with it.
        stop_processes({p for p in psutil.process_iter() if _session(p) == driver.pid})
        shutil.rmtree(ray_dir, ignore_errors=True)

    assert driver.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    # Killed with the poison row among others, twice (once could be anyone's kill), then with it alone: three
    # restarts, then its row is an error row.
    assert summary == {"complete": True, "rows_failed": 1, "engine_restarts": 3}
    rows = {row["id"]: row for row in pq.read_table(tmp_path / "out").to_pylist()}
    assert sorted(rows) == [f"r{i:02d}" for i in range(ROWS)]
    poison = rows[f"r{POISON:02d}"]
    assert poison["error_type"] == "engine_error" and "then again with this row alone (2 failures counted" in poison["error"]
    assert all(row["error_type"] is None and row["completion_tokens"] == 4 for rid, row in rows.items()
               if rid != f"r{POISON:02d}")


def _session(process: psutil.Process) -> int | None:
    try:
        return os.getsid(process.pid)
    except OSError:
        return None
