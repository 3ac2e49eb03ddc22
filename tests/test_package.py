"""Tests for how qwen-batch installs: one `qwen_batch` namespace that a user's own `schemas/` or `jobs/` cannot shadow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import qwen_batch.jobs
import qwen_batch.schemas

VENV_BIN = Path(sys.executable).parent


def test_a_users_own_packages_named_like_ours_do_not_break_the_cli(tmp_path: Path) -> None:
    for name in ("schemas", "jobs", "pipelines", "cluster"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own {name} package')\n")
    spec = tmp_path / "job.yaml"
    spec.write_text("name: shadow\ninput: {path: /nonexistent/in.jsonl, format: jsonl}\nprompt: {template: '{text}'}\n"
                    "model: {variant: qwen2.5-7b-instruct}\noutput: {path: /nonexistent/out}\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for command in ([str(VENV_BIN / "qwen-batch"), "models"], [sys.executable, "-m", "qwen_batch.jobs.cli", "models"]):
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "qwen2.5-7b-instruct" in done.stdout
        assert "the user's own" not in done.stderr


def test_the_public_api_lives_under_the_namespace() -> None:
    assert qwen_batch.jobs.__all__ == ["plan_job", "run_job", "submit_job"]
    assert callable(qwen_batch.jobs.run_job) and callable(qwen_batch.jobs.submit_job)
    assert qwen_batch.jobs.run_job.__module__ == "qwen_batch.jobs.driver"
    assert qwen_batch.schemas.JobSpec.__module__ == "qwen_batch.schemas.spec"
