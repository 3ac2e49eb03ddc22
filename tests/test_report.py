"""Tests for jobs.report: real jobs' output folders, the plotted numbers against their Parquet, a real browser."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import FAMILY_MODELS, FinishedJob
from qwen_batch.jobs.cli import main
from qwen_batch.jobs.driver import MANIFEST_FILE
from qwen_batch.jobs.report import COLORS, REPORT_FILE, build_report, throughput, write_report
from qwen_batch.pipelines import storage
from qwen_batch.schemas.results import CommitRecord, JobManifest, Totals
from s3server import S3Server

VARIANTS = FAMILY_MODELS
ERROR_TYPES = {"empty_prompt", "invalid_json"}  # what FAMILY_BAD_LINES become
PLOTS = ("throughput", "prompt_tokens", "completion_tokens", "cost_by_variant", "errors_by_type", "finish_reasons")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's `chromium` on PATH (CI installs it: "
                                    "apt-get install -y chromium)")
START = datetime(2025, 6, 2, 9, 30, tzinfo=timezone.utc)


class FigureParser(HTMLParser):
    """The report's figures: data-values per plot, whether each holds an image, and the warning lines."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, Any] = {}
        self.images: dict[str, int] = Counter()
        self.warnings: list[str] = []
        self._figure: str | None = None
        self._in_warning = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "figure":
            self._figure = found["data-plot"]
            self.values[self._figure] = json.loads(found["data-values"] or "null")
        elif tag == "img" and self._figure and (found.get("src") or "").startswith("data:image/png;base64,"):
            self.images[self._figure] += 1
        elif tag == "p" and found.get("class") == "warning":
            self._in_warning = True
            self.warnings.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self._figure = None
        elif tag == "p":
            self._in_warning = False

    def handle_data(self, data: str) -> None:
        if self._in_warning:
            self.warnings[-1] += data


def parse(report: str) -> FigureParser:
    parser = FigureParser()
    parser.feed(report)
    return parser


def output_rows(root: Path) -> pa.Table:
    """All output rows, read the way a user reads them (the `_` files are skipped)."""
    return pq.read_table(root)


@pytest.fixture
def job(tmp_path: Path, family_job: FinishedJob) -> Path:
    """A copy of the session's real three-model job (two runs, error rows), for a test to read or change."""
    return Path(shutil.copytree(family_job.output, tmp_path / "out"))


def commit_records(root: Path, variant: str) -> list[tuple[Path, CommitRecord]]:
    """A model's commit records as the job wrote them, each with its file."""
    return [(path, CommitRecord.model_validate_json(path.read_bytes()))
            for path in sorted((root / "_commits" / variant).iterdir())]


def test_plotted_values_equal_the_parquet_sums(job: Path) -> None:
    report = parse(build_report(str(job)))
    table = output_rows(job)
    answered = table.filter(pc.is_null(table["error_type"]))
    assert set(report.values) == set(PLOTS)
    assert report.warnings == []
    for column in ("prompt_tokens", "completion_tokens"):
        histogram = report.values[column]
        assert sum(histogram["counts"]) == histogram["rows"] == answered.num_rows
        assert histogram["edges"][0] <= pc.min(answered[column]).as_py()
        assert histogram["edges"][-1] >= pc.max(answered[column]).as_py()
    assert report.values["errors_by_type"] == Counter(v for v in table["error_type"].to_pylist() if v)
    assert set(report.values["errors_by_type"]) == set(ERROR_TYPES)
    assert report.values["finish_reasons"] == Counter(table["finish_reason"].to_pylist())
    costs = report.values["cost_by_variant"]
    for variant in VARIANTS:
        mine = table.filter(pc.equal(table["variant"], variant))
        assert math.isclose(costs["list_price_usd"][variant], pc.sum(mine["cost_usd"]).as_py(), rel_tol=1e-12)
    manifest = JobManifest.model_validate_json((job / MANIFEST_FILE).read_bytes())
    assert costs["compute_usd"] == pytest.approx(manifest.compute_cost_usd)
    rate = report.values["throughput"]
    assert rate["bucket_seconds"] == 10
    assert sum(rate["rows"]) == rate["cumulative_rows"][-1] == table.num_rows
    assert sum(rate["completion_tokens"]) == pc.sum(table["completion_tokens"]).as_py()
    assert all(report.images[plot] == 1 for plot in PLOTS)


def test_totals_table_shows_manifest_and_runs(job: Path) -> None:
    report = build_report(str(job))
    manifest = JobManifest.model_validate_json((job / MANIFEST_FILE).read_bytes())
    assert f"qwen-batch report: {manifest.job_id}" in report
    assert 'class="mismatch"' not in report
    for run in manifest.runs:
        assert f"<td>{run.run_id}</td>" in report
    assert f"<td>{manifest.rows_in:,}</td><td>{manifest.rows_in:,}</td>" in report
    assert f"python: {manifest.versions['python']}" in report


def test_warns_when_the_manifest_disagrees_with_the_parquet(job: Path) -> None:
    manifest = json.loads((job / MANIFEST_FILE).read_text())
    manifest["rows_failed"] += 1
    manifest["per_variant"][VARIANTS[1]]["cost_usd"] *= 2
    (job / MANIFEST_FILE).write_text(json.dumps(manifest))
    report = build_report(str(job))
    warnings = parse(report).warnings
    assert len(warnings) == 2
    assert any("manifest rows_failed is" in line for line in warnings)
    assert any(f"manifest per_variant.{VARIANTS[1]}.cost_usd is" in line for line in warnings)
    assert report.count('class="mismatch"') == 2


def test_partial_job_without_manifest_reports_committed_shards_only(job: Path) -> None:
    (job / MANIFEST_FILE).unlink()
    uncommitted, record = commit_records(job, VARIANTS[1])[-1]
    uncommitted.unlink()
    report = build_report(str(job))
    values = parse(report).values
    committed = pa.concat_tables(pq.read_table(path) for path in sorted(job.glob("*/part-*.parquet"))
                                 if path != job / record.data_file)
    assert f"no {MANIFEST_FILE} yet" in report
    assert "1 data file(s) have no commit record" in report
    assert parse(report).warnings == []
    assert sum(values["throughput"]["rows"]) == committed.num_rows
    assert values["finish_reasons"] == Counter(committed["finish_reason"].to_pylist())
    assert values["cost_by_variant"]["compute_usd"] is None


def test_a_job_without_errors_says_so(reviews_job: FinishedJob) -> None:
    report = build_report(str(reviews_job.output))
    figures = parse(report)
    assert reviews_job.manifest.rows_failed == 0 and figures.warnings == []
    assert figures.values["errors_by_type"] == {}
    assert figures.images["errors_by_type"] == 0
    assert ">no errors</p>" in report


def test_long_jobs_get_minute_buckets_and_keep_every_row() -> None:
    records = [CommitRecord(shard_id=str(i), variant=VARIANTS[0], data_file=f"{VARIANTS[0]}/part-{i}.parquet",
                            source_file="in.jsonl", row_start=0, row_count=10, run_id="run-1",
                            committed_at=(START + timedelta(seconds=seconds)).isoformat(),
                            totals=Totals(rows=10, completion_tokens=100 * i))
               for i, seconds in enumerate((0, 59, 61, 7200))]
    rate = throughput(records)
    assert rate["bucket_seconds"] == 60
    assert rate["rows"][:3] == [20, 10, 0] and rate["rows"][-1] == 10 and len(rate["rows"]) == 121
    assert rate["cumulative_rows"][-1] == 40 and sum(rate["completion_tokens"]) == 600


def test_cli_writes_the_report_beside_the_output_or_to_out(job: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(job)]) == 0
    assert capsys.readouterr().out.strip() == f"{job}/{REPORT_FILE}"
    assert set(parse((job / REPORT_FILE).read_text()).values) == set(PLOTS)
    assert main(["report", str(job), "--out", str(tmp_path / "elsewhere" / "r.html")]) == 0
    assert (tmp_path / "elsewhere" / "r.html").read_text().startswith("<!doctype html>")
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "holds no _manifest.json and no commit records" in capsys.readouterr().err


@pytest.mark.s3
def test_report_reads_and_writes_s3(s3: S3Server, reviews_job: FinishedJob) -> None:
    root = f"s3://{s3.bucket}/{uuid.uuid4().hex}/out"
    for path in reviews_job.output.rglob("*"):
        if path.is_file():
            storage.write_bytes(f"{root}/{path.relative_to(reviews_job.output)}", path.read_bytes())
    assert write_report(root) == f"{root}/{REPORT_FILE}"
    figures = parse(storage.read_bytes(f"{root}/{REPORT_FILE}").decode())
    assert sum(figures.values["throughput"]["rows"]) == reviews_job.manifest.rows_in == 12
    assert figures.warnings == []


def chromium(tmp_path: Path, *args: str) -> str:
    """Run headless Chromium on the report with a throwaway profile; its stdout."""
    command = [CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.browser
@needs_chromium
def test_report_renders_in_a_headless_browser(job: Path, tmp_path: Path) -> None:
    page = Path(write_report(str(job)))
    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri())
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 3000)
    colors = image.getcolors(maxcolors=1 << 24)
    assert len(colors) > 200
    plotted = dict((color, count) for count, color in colors)
    assert plotted.get(tuple(int(COLORS[0][i:i + 2], 16) for i in (1, 3, 5)), 0) > 2000, "no plot bars on screen"


@pytest.mark.browser
@needs_chromium
def test_figures_survive_the_browser_dom(job: Path, tmp_path: Path) -> None:
    page = Path(write_report(str(job)))
    dom = parse(chromium(tmp_path, "--dump-dom", page.as_uri()))
    assert set(dom.values) == set(PLOTS)
    assert all(dom.images[plot] == 1 for plot in PLOTS)
    assert dom.values == parse(page.read_text()).values
