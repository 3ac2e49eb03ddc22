"""Tests for jobs.report: a fake job's output folder, the plotted numbers against its Parquet, a real browser."""

from __future__ import annotations

import io
import json
import math
import random
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
from s3server import S3Server

from qwen_batch.jobs.cli import main
from qwen_batch.jobs.driver import MANIFEST_FILE, RUNS_DIR, versions
from qwen_batch.jobs.report import COLORS, REPORT_FILE, build_report, throughput, write_report
from qwen_batch.pipelines import storage
from qwen_batch.pipelines.write import Layout
from qwen_batch.schemas.catalog import get_variant
from qwen_batch.schemas.results import RESULT_SCHEMA, CommitRecord, JobManifest, RunRecord, Totals

VARIANTS = ("qwen2.5-7b-instruct", "qwen3-8b")
ERROR_TYPES = {"prompt_too_long": "prompt is {n} tokens; the model takes at most 32768 minus max_tokens 512",
               "invalid_json": "/data/reviews/part-3.jsonl line {n}: expected one JSON object per line"}
MAX_TOKENS = 512
ACCELERATOR_HOUR_USD = 3.2
START = datetime(2025, 6, 2, 9, 30, tzinfo=timezone.utc)
PLOTS = ("throughput", "prompt_tokens", "completion_tokens", "cost_by_variant", "errors_by_type", "finish_reasons")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's `chromium` on PATH (CI installs it: "
                                    "apt-get install -y chromium)")


def shard_table(variant: str, row_start: int, rows: int, error_rate: float, rng: random.Random) -> pa.Table:
    """One shard's output rows in RESULT_SCHEMA, with costs at the variant's list prices as the write stage computes."""
    prices = get_variant(variant)
    columns: dict[str, list[Any]] = {name: [] for name in RESULT_SCHEMA.names}
    for row in range(row_start, row_start + rows):
        failed = rng.random() < error_rate
        error_type = rng.choice(list(ERROR_TYPES)) if failed else None
        prompt = 0 if failed else max(8, int(rng.lognormvariate(5.6, 0.5)))
        completion = 0 if failed else min(MAX_TOKENS, int(rng.lognormvariate(5.0, 0.6)))
        input_cost, output_cost = prompt * prices.input_per_mtok / 1e6, completion * prices.output_per_mtok / 1e6
        values = {
            "id": f"part-{row // 100}.jsonl:{row}", "variant": variant, "model": prices.hf_id,
            "generated_text": None if failed else "answer " * (completion // 8),
            "finish_reason": "error" if failed else "length" if completion == MAX_TOKENS else "stop",
            "prompt_tokens": prompt, "completion_tokens": completion, "reasoning_tokens": 0,
            "cached_tokens": 0 if failed else rng.choice([0, 0, 16, 32]), "total_tokens": prompt + completion,
            "input_cost_usd": input_cost, "output_cost_usd": output_cost, "cost_usd": input_cost + output_cost,
            "error_type": error_type, "error": ERROR_TYPES[error_type].format(n=row) if failed else None,
            "source_file": f"/data/reviews/part-{row // 100}.jsonl", "source_row": row % 100,
        }
        for name in RESULT_SCHEMA.names:
            columns[name].append(values.get(name))
    return pa.table(columns, schema=RESULT_SCHEMA)


def make_job(root: str, rows: int = 300, shard_rows: int = 25, error_rate: float = 0.06, seed: int = 7) -> JobManifest:
    """A finished job's output folder, two models, two runs (the first stopped partway), written as a job writes it."""
    rng, layout = random.Random(seed), Layout(root)
    starts = [(variant, row_start) for variant in VARIANTS for row_start in range(0, rows, shard_rows)]
    resumed_at = int(len(starts) * 0.6)
    records: list[CommitRecord] = []
    moment = START
    for index, (variant, row_start) in enumerate(starts):
        table = shard_table(variant, row_start, min(shard_rows, rows - row_start), error_rate, rng)
        shard_id = f"{VARIANTS.index(variant)}{row_start:019d}"
        data_file = layout.data_file(variant, shard_id)
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        storage.write_bytes(layout.url(data_file), buffer.getvalue())
        moment += timedelta(seconds=rng.uniform(3, 12) + (90 if index == resumed_at else 0))
        records.append(CommitRecord(
            shard_id=shard_id, variant=variant, data_file=data_file, source_file=table["source_file"][0].as_py(),
            row_start=row_start, row_count=table.num_rows, run_id="run-1" if index < resumed_at else "run-2",
            committed_at=moment.isoformat(timespec="seconds"),
            totals=Totals.of_table(table, engine_seconds=rng.uniform(2.0, 6.0)),
        ))
        storage.write_bytes(layout.commit_url(variant, shard_id), records[-1].model_dump_json().encode())
    runs: list[RunRecord] = []
    for run_id, skipped in (("run-1", 0), ("run-2", resumed_at)):
        mine = [r for r in records if r.run_id == run_id]
        started = _time(mine[0].committed_at) - timedelta(seconds=40)
        wall = (_time(mine[-1].committed_at) - started).total_seconds() + 2
        run = RunRecord(run_id=run_id, started_at=started.isoformat(timespec="seconds"),
                        finished_at=(started + timedelta(seconds=wall)).isoformat(timespec="seconds"),
                        wall_seconds=wall, shards_planned=len(starts), shards_skipped=skipped,
                        shards_committed=len(mine), accelerators=2, accelerator_seconds=2 * wall)
        storage.write_bytes(layout.url(f"{RUNS_DIR}/{run_id}.json"), run.model_dump_json().encode())
        runs.append(run)
    return write_fake_manifest(root, records, runs)


def write_fake_manifest(root: str, records: list[CommitRecord], runs: list[RunRecord]) -> JobManifest:
    """The manifest as the driver builds it from the commit and run records (built here so no plan is needed)."""
    per_variant: dict[str, Totals] = {}
    for record in records:
        per_variant[record.variant] = per_variant.get(record.variant, Totals()) + record.totals
    totals = sum(per_variant.values(), Totals())
    accelerator_seconds = sum(run.accelerator_seconds for run in runs)
    compute_cost = accelerator_seconds / 3600 * ACCELERATOR_HOUR_USD
    manifest = JobManifest(
        job_id="reviews-0123456789abcdef", name="reviews", spec_hash="0123456789abcdef",
        spec={"name": "reviews", "models": [{"variant": v} for v in VARIANTS], "output": {"path": root}},
        output_path=root, started_at=runs[0].started_at, finished_at=runs[-1].finished_at, complete=True,
        shards=len(records), rows_in=totals.rows, rows_ok=totals.rows_ok, rows_failed=totals.rows_failed,
        totals=totals, per_variant=per_variant, runs=runs, wall_seconds=sum(run.wall_seconds for run in runs),
        engine_seconds=totals.engine_seconds, output_tokens_per_s=totals.completion_tokens / totals.engine_seconds,
        structured_validity_rate=None,
        list_price_cost_usd=totals.cost_usd, accelerator_seconds=accelerator_seconds,
        accelerator_hour_usd=ACCELERATOR_HOUR_USD, compute_cost_usd=compute_cost,
        savings_usd=totals.cost_usd - compute_cost, versions=versions(),
    )
    storage.write_bytes(Layout(root).url(MANIFEST_FILE), manifest.model_dump_json(indent=2).encode())
    return manifest


def _time(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


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
def job(tmp_path: Path) -> Path:
    root = tmp_path / "out"
    make_job(str(root))
    return root


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
    uncommitted = sorted((job / "_commits" / VARIANTS[1]).iterdir())[-1]
    uncommitted.unlink()
    report = build_report(str(job))
    values = parse(report).values
    committed = pa.concat_tables(pq.read_table(path) for path in sorted(job.glob("*/part-*.parquet"))
                                 if path.stem.removeprefix("part-") != uncommitted.stem)
    assert f"no {MANIFEST_FILE} yet" in report
    assert "1 data file(s) have no commit record" in report
    assert parse(report).warnings == []
    assert sum(values["throughput"]["rows"]) == committed.num_rows
    assert values["finish_reasons"] == Counter(committed["finish_reason"].to_pylist())
    assert values["cost_by_variant"]["compute_usd"] is None


def test_a_job_without_errors_says_so(tmp_path: Path) -> None:
    make_job(str(tmp_path), rows=40, shard_rows=20, error_rate=0.0)
    report = build_report(str(tmp_path))
    figures = parse(report)
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
def test_report_reads_and_writes_s3(s3: S3Server) -> None:
    root = f"s3://{s3.bucket}/{uuid.uuid4().hex}/out"
    make_job(root, rows=60, shard_rows=20)
    assert write_report(root) == f"{root}/{REPORT_FILE}"
    values = parse(storage.read_bytes(f"{root}/{REPORT_FILE}").decode()).values
    assert sum(values["throughput"]["rows"]) == 2 * 60


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
