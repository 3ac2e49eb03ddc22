"""Checkpoints on the real S3 server (SeaweedFS): downloaded once per node into the local cache, then run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from qwen_batch.jobs.driver import plan_job, run_job
from qwen_batch.pipelines import storage
from qwen_batch.pipelines.weights import COMPLETE_MARKER, model_dir
from qwen_batch.schemas.errors import SpecError
from qwen_batch.schemas.spec import load_spec

pytestmark = pytest.mark.s3

COPY = "import json, sys; from qwen_batch.pipelines.weights import local_copy; " \
       "folder, downloaded = local_copy(sys.argv[1]); print(json.dumps([str(folder), downloaded]))"


def upload(s3: Any, folder: Path) -> str:
    """The checkpoint folder on the S3 server, under a prefix of its own; its URL."""
    url = f"s3://{s3.bucket}/checkpoints/{uuid.uuid4().hex[:8]}/tiny"
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        storage.write_bytes(f"{url}/{path.relative_to(folder).as_posix()}", path.read_bytes())
    return url


def spec(tmp_path: Path, model: dict[str, Any]) -> dict[str, Any]:
    (tmp_path / "in").mkdir(exist_ok=True)
    (tmp_path / "in" / "rows.jsonl").write_text("".join(json.dumps({"text": f"question {i}"}) + "\n" for i in range(6)))
    return {"name": "remote-weights", "input": {"path": str(tmp_path / "in"), "format": "jsonl"},
            "prompt": {"template": "Answer: {text}"}, "model": model, "sampling": {"max_tokens": 8, "temperature": 0},
            "output": {"path": str(tmp_path / "out")}}


def test_processes_on_one_node_download_a_checkpoint_once_and_a_changed_one_again(
        s3: Any, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    url = upload(s3, tiny_models["qwen2"])
    env = {**os.environ, "QWEN_BATCH_MODEL_DIR": str(tmp_path / "cache")}
    copies = [subprocess.Popen([sys.executable, "-c", COPY, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env) for _ in range(3)]
    results = []
    for process in copies:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err[-2000:]
        results.append(json.loads(out.splitlines()[-1]))

    assert len({folder for folder, _ in results}) == 1 and sorted(d for _, d in results) == [False, False, True]
    folder = Path(results[0][0])
    source = {p.relative_to(tiny_models["qwen2"]): p.read_bytes() for p in tiny_models["qwen2"].rglob("*") if p.is_file()}
    copied = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER}
    assert copied == source
    assert not list((tmp_path / "cache" / "remote").glob("*.partial"))

    storage.write_bytes(f"{url}/generation_config.json", b'{"changed": true}')
    again = subprocess.run([sys.executable, "-c", COPY, url], capture_output=True, text=True, env=env, timeout=120)
    new_folder, downloaded = json.loads(again.stdout.splitlines()[-1])
    assert downloaded and new_folder != str(folder) and Path(new_folder, "generation_config.json").read_bytes() == \
        b'{"changed": true}'


def test_a_model_path_on_s3_without_a_checkpoint_is_refused_before_any_engine(s3: Any, tmp_path: Path) -> None:
    url = f"s3://{s3.bucket}/checkpoints/{uuid.uuid4().hex[:8]}/nothing"
    with pytest.raises(SpecError, match="model.path s3://.*: no checkpoint there"):
        plan_job(load_spec(spec(tmp_path, {"path": url, "like": "tiny-qwen2"})))
    storage.write_bytes(f"{url}/weights.bin", b"x")
    with pytest.raises(SpecError, match="the folder has no config.json"):
        plan_job(load_spec(spec(tmp_path, {"path": url, "like": "tiny-qwen2"})))


@pytest.mark.engine
def test_a_job_runs_from_a_checkpoint_on_s3_downloaded_once_for_its_tokenizer_and_engine(
        s3: Any, tiny_models: dict[str, Path], tmp_path: Path, ray_local: None) -> None:
    url = upload(s3, tiny_models["qwen2"])

    manifest = run_job(load_spec(spec(tmp_path, {"path": url, "like": "tiny-qwen2", "max_model_len": 256})))

    assert manifest.complete and manifest.rows_ok == 6
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert all(r["error_type"] is None and r["completion_tokens"] > 0 for r in rows) and rows[0]["model"] == url
    # The prompt actor and the engine actor share the node's one copy.
    copies = [marker for marker in (model_dir() / "remote").glob(f"*/{COMPLETE_MARKER}")
              if json.loads(marker.read_text())["url"] == url]
    assert len(copies) == 1
