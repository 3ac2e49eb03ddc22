"""Tests for `./run setup` on a fresh venv: a quiet editable install, and `pip check` passing but for known gaps.

The fresh venv sees this checkout's venv's site-packages through a .pth file, so pip finds vLLM, Ray and the rest
installed and the setup installs only qwen-batch itself (about a minute instead of a 3.5 GB download); pip never
changes what lies outside the venv it runs in.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("setup") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    (site_packages(venv) / "shared-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def run_setup(venv: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / "run"), "setup"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "QWEN_BATCH_VENV": str(venv)})


def ours(output: str) -> list[str]:
    """Output lines, less the notes this machine's pip configuration adds (indexes it cannot list)."""
    return [line for line in output.splitlines() if not line.startswith("WARNING: Location 'file:")]


def test_setup_installs_quietly_and_pip_check_passes_but_for_the_known_gaps(fresh_venv: Path) -> None:
    done = run_setup(fresh_venv)

    assert done.returncode == 0, done.stderr
    assert ours(done.stdout + done.stderr) == [
        f"{fresh_venv} is ready (pip check: only the CPU build's known gaps, listed in ./run)"]
    imported = subprocess.run([str(fresh_venv / "bin" / "python"), "-c",
                               "import qwen_batch.pipelines.metrics as m; print(m.__file__)"],
                              capture_output=True, text=True, cwd="/", check=True)
    assert imported.stdout.strip() == str(ROOT / "pipelines" / "metrics.py")  # editable: the working tree


def test_setup_fails_on_any_other_pip_check_problem(fresh_venv: Path) -> None:
    broken = site_packages(fresh_venv) / "needs_more-0.1.dist-info"
    broken.mkdir()
    (broken / "METADATA").write_text("Metadata-Version: 2.1\nName: needs-more\nVersion: 0.1\n"
                                     "Requires-Dist: not-installed-anywhere\n")
    try:
        done = run_setup(fresh_venv)
    finally:
        for file in broken.iterdir():
            file.unlink()
        broken.rmdir()

    assert done.returncode == 1
    assert ours(done.stderr) == ["needs-more 0.1 requires not-installed-anywhere, which is not installed.",
                                 f"./run setup: pip check found the problems above in {fresh_venv}"]
