"""`qwen-batch report`: one self-contained HTML page on a job's output folder, cross-checked against its Parquet.

Every plotted number is recomputed from the commit records and the committed Parquet files (reading only the
columns in REPORT_COLUMNS), not taken from the manifest, and is also written beside its image as `data-values`
JSON; the manifest's totals are shown next to the recomputed ones, and every disagreement becomes a warning line.
Plots use matplotlib's object API (Figure, saved through Agg), so no pyplot state or display is involved.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from matplotlib.figure import Figure

from qwen_batch.jobs.driver import MANIFEST_FILE, RUNS_DIR
from qwen_batch.pipelines import storage
from qwen_batch.pipelines.write import Layout, read_commit
from qwen_batch.schemas.errors import SpecError
from qwen_batch.schemas.results import CommitRecord, JobManifest, RunRecord

__all__ = ["REPORT_FILE", "build_report", "write_report"]

REPORT_FILE = "_report.html"
REPORT_COLUMNS = ["variant", "prompt_tokens", "completion_tokens", "cost_usd", "error_type", "finish_reason"]
BUCKETS_S = (10, 60, 600, 3600)
MAX_BUCKETS = 720
HISTOGRAM_BINS = 30
COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")


@dataclass
class OutputSums:
    """What committed Parquet files hold, summed over REPORT_COLUMNS only."""

    files: int = 0
    rows: int = 0
    rows_failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_by_variant: dict[str, float] = field(default_factory=dict)
    errors_by_type: Counter[str] = field(default_factory=Counter)
    finish_reasons: Counter[str] = field(default_factory=Counter)
    prompt_token_rows: Counter[int] = field(default_factory=Counter)
    completion_token_rows: Counter[int] = field(default_factory=Counter)

    @property
    def rows_ok(self) -> int:
        """Rows without `error_type`."""
        return self.rows - self.rows_failed

    @property
    def cost_usd(self) -> float:
        """List-price cost over all variants."""
        return sum(self.cost_by_variant.values())

    def add(self, other: OutputSums) -> None:
        """Fold another file's sums into these."""
        for name in ("files", "rows", "rows_failed", "prompt_tokens", "completion_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for variant, cost in other.cost_by_variant.items():
            self.cost_by_variant[variant] = self.cost_by_variant.get(variant, 0.0) + cost
        for name in ("errors_by_type", "finish_reasons", "prompt_token_rows", "completion_token_rows"):
            getattr(self, name).update(getattr(other, name))

    @classmethod
    def of_table(cls, table: pa.Table) -> OutputSums:
        """Sums over one output file's REPORT_COLUMNS; token distributions over its answered rows only."""
        answered = table.filter(pc.is_null(table.column("error_type")))
        by_variant = table.group_by("variant").aggregate([("cost_usd", "sum")]).to_pylist()
        return cls(
            files=1, rows=table.num_rows, rows_failed=table.num_rows - answered.num_rows,
            prompt_tokens=int(pc.sum(table.column("prompt_tokens")).as_py() or 0),
            completion_tokens=int(pc.sum(table.column("completion_tokens")).as_py() or 0),
            cost_by_variant={row["variant"]: row["cost_usd_sum"] or 0.0 for row in by_variant},
            errors_by_type=Counter(v for v in table.column("error_type").to_pylist() if v is not None),
            finish_reasons=Counter(table.column("finish_reason").to_pylist()),
            prompt_token_rows=_value_counts(answered.column("prompt_tokens")),
            completion_token_rows=_value_counts(answered.column("completion_tokens")),
        )


def _value_counts(column: pa.ChunkedArray) -> Counter[int]:
    """Rows per distinct value: memory grows with the range of token counts, not with the rows."""
    return Counter({entry["values"]: entry["counts"] for entry in pc.value_counts(column).to_pylist()})


@dataclass(frozen=True)
class JobOutput:
    """What the report reads from an output folder."""

    output: str
    manifest: JobManifest | None
    commits: list[CommitRecord]
    runs: list[RunRecord]
    sums: OutputSums
    missing_files: list[str]
    uncommitted_files: list[str]


def load_output(output_path: str, storage_options: dict | None = None) -> JobOutput:
    """Read the manifest, commit records, run records and the committed Parquet files' REPORT_COLUMNS."""
    options = storage_options or {}
    layout = Layout.at(output_path)
    try:
        manifest = JobManifest.model_validate_json(storage.read_bytes(layout.url(MANIFEST_FILE), options))
    except FileNotFoundError:
        manifest = None
    commits = sorted((read_commit(data) for data in _read_json(layout.commits_prefix(), options)),
                     key=lambda record: (record.committed_at, record.variant, record.shard_id))
    if manifest is None and not commits:
        raise SpecError(f"{layout.output} holds no {MANIFEST_FILE} and no commit records under "
                        f"{layout.commits_prefix()}: expected the output.path of a qwen-batch job with at least one "
                        "committed shard")
    runs = sorted((RunRecord.model_validate_json(data) for data in _read_json(layout.url(RUNS_DIR), options)),
                  key=lambda run: run.started_at) or (manifest.runs if manifest else [])
    urls = [layout.url(record.data_file) for record in commits if record.data_file]
    with ThreadPoolExecutor(max_workers=16) as pool:
        per_file = list(pool.map(lambda url: _file_sums(url, options), urls))
    sums = OutputSums()
    for file_sums in per_file:
        if file_sums is not None:
            sums.add(file_sums)
    committed = {(record.variant, record.data_file.rsplit("/", 1)[-1]) for record in commits if record.data_file}
    written = [(variant, name) for variant in sorted({record.variant for record in commits})
               for name in storage.list_names(layout.url(variant), options) if name.endswith(".parquet")]
    return JobOutput(
        output=layout.output, manifest=manifest, commits=commits, runs=runs, sums=sums,
        missing_files=[url for url, found in zip(urls, per_file) if found is None],
        uncommitted_files=[name for variant, name in written if (variant, name.rsplit("/", 1)[-1]) not in committed],
    )


def _read_json(prefix: str, options: dict) -> list[bytes]:
    urls = [url for url in storage.list_names(prefix, options) if url.endswith(".json")]
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(lambda url: storage.read_bytes(url, options), urls))


def _file_sums(url: str, options: dict) -> OutputSums | None:
    """Sums of one committed file, or None when it is missing."""
    try:
        table = storage.read_file(url, lambda handle: pq.read_table(handle, columns=REPORT_COLUMNS), options)
    except FileNotFoundError:
        return None
    return OutputSums.of_table(table)


def totals_rows(job: JobOutput) -> list[tuple[str, Any, Any]]:
    """(manifest field, manifest value, value recomputed from the output folder or None) for the totals table."""
    m, sums, runs = job.manifest, job.sums, job.runs
    engine_seconds = sum(record.totals.engine_seconds for record in job.commits)
    accelerator_seconds = sum(run.accelerator_seconds for run in runs)
    per_variant = {**(m.per_variant if m else {}), **dict.fromkeys(sums.cost_by_variant)}

    def got(name: str) -> Any:
        value: Any = m
        for part in name.split("."):
            value = None if value is None else getattr(value, part)
        return value

    def variant_cost(variant: str) -> float | None:
        return m.per_variant[variant].cost_usd if m and variant in m.per_variant else None

    return [
        ("rows_in", got("rows_in"), sums.rows),
        ("rows_ok", got("rows_ok"), sums.rows_ok),
        ("rows_failed", got("rows_failed"), sums.rows_failed),
        ("totals.prompt_tokens", got("totals.prompt_tokens"), sums.prompt_tokens),
        ("totals.completion_tokens", got("totals.completion_tokens"), sums.completion_tokens),
        ("totals.reasoning_tokens", got("totals.reasoning_tokens"), None),
        ("totals.cached_tokens", got("totals.cached_tokens"), None),
        ("totals.errors_by_type", got("totals.errors_by_type"), dict(sums.errors_by_type)),
        ("totals.finish_reasons", got("totals.finish_reasons"), dict(sums.finish_reasons)),
        ("list_price_cost_usd", got("list_price_cost_usd"), sums.cost_usd),
        *((f"per_variant.{v}.cost_usd", variant_cost(v), sums.cost_by_variant.get(v, 0.0)) for v in per_variant),
        ("accelerator_seconds", got("accelerator_seconds"), accelerator_seconds),
        ("compute_cost_usd", got("compute_cost_usd"),
         accelerator_seconds / 3600 * m.accelerator_hour_usd if m else None),
        ("savings_usd", got("savings_usd"), None),
        ("shards", got("shards"), len(job.commits)),
        ("wall_seconds", got("wall_seconds"), sum(run.wall_seconds for run in runs)),
        ("engine_seconds", got("engine_seconds"), engine_seconds),
        ("output_tokens_per_s", got("output_tokens_per_s"),
         sums.completion_tokens / engine_seconds if engine_seconds else 0.0),
        ("complete", got("complete"), None),
        ("versions", got("versions"), None),
    ]


def check(job: JobOutput) -> list[str]:
    """Where the manifest or the commit records disagree with the Parquet files, one line each."""
    warnings = [f"commit record names {url}, which is missing" for url in job.missing_files]
    committed_rows = sum(record.totals.rows for record in job.commits)
    if not job.missing_files and committed_rows != job.sums.rows:
        warnings.append(f"the commit records count {committed_rows:,} rows, their Parquet files hold {job.sums.rows:,}")
    if job.manifest is None:
        return warnings
    mismatched = [f"manifest {name} is {_format(name, manifest_value)}, the output folder gives {_format(name, found)}"
                  for name, manifest_value, found in totals_rows(job)
                  if found is not None and not _same(manifest_value, found)]
    newer = [r for r in job.commits if _time(r.committed_at) > _time(job.manifest.finished_at)]
    if mismatched and newer:
        mismatched.append(f"{len(newer)} shard(s) were committed after the manifest was written "
                          f"({job.manifest.finished_at}): a run is in progress, or stopped before writing it")
    return warnings + mismatched


def _same(expected: Any, found: Any) -> bool:
    if isinstance(expected, float) or isinstance(found, float):
        return expected is not None and math.isclose(expected, found, rel_tol=1e-9, abs_tol=1e-9)
    return expected == found


def _time(iso: str) -> datetime:
    parsed = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def throughput(commits: list[CommitRecord]) -> dict[str, Any]:
    """Committed rows and completion tokens per time bucket (10 s, 1 min, 10 min or 1 h: at most ~720 buckets)."""
    if not commits:
        return {"bucket_seconds": BUCKETS_S[0], "start": None, "rows": [], "completion_tokens": [],
                "cumulative_rows": []}
    times = [_time(record.committed_at) for record in commits]
    start = min(times)
    span = (max(times) - start).total_seconds()
    bucket = next((size for size in BUCKETS_S if span / size < MAX_BUCKETS), BUCKETS_S[-1])
    rows, tokens = [0] * (int(span // bucket) + 1), [0] * (int(span // bucket) + 1)
    for moment, record in zip(times, commits):
        index = int((moment - start).total_seconds() // bucket)
        rows[index] += record.totals.rows
        tokens[index] += record.totals.completion_tokens
    return {"bucket_seconds": bucket, "start": start.isoformat(), "rows": rows, "completion_tokens": tokens,
            "cumulative_rows": list(itertools.accumulate(rows))}


def histogram(rows_per_value: Counter[int]) -> dict[str, Any]:
    """Bin edges and row counts of a token-count distribution; the counts sum to its rows."""
    if not rows_per_value:
        return {"edges": [], "counts": [], "rows": 0}
    values = np.array(sorted(rows_per_value), dtype=np.int64)
    weights = np.array([rows_per_value[v] for v in values], dtype=np.int64)
    counts, edges = np.histogram(values, bins=min(HISTOGRAM_BINS, len(values)), weights=weights)
    return {"edges": [float(edge) for edge in edges], "counts": [int(count) for count in counts],
            "rows": int(weights.sum())}


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return base64.b64encode(buffer.getvalue()).decode()


def _throughput_png(values: dict[str, Any]) -> str:
    figure = Figure(figsize=(11.5, 3.0), layout="constrained")
    bucket = values["bucket_seconds"]
    unit = f"{bucket} s" if bucket < 60 else f"{bucket // 60} min"
    minutes = np.arange(len(values["rows"])) * bucket / 60
    panels = [("rows", f"rows per {unit}"), ("completion_tokens", f"completion tokens per {unit}")]
    for index, (key, title) in enumerate(panels):
        axes = figure.add_subplot(1, 3, index + 1)
        axes.bar(minutes, values[key], width=bucket / 60, align="edge", color=COLORS[index])
        axes.set(title=title, xlabel="minutes since first commit")
    axes = figure.add_subplot(1, 3, 3)
    axes.step(np.append(minutes, minutes[-1] + bucket / 60), [0, *values["cumulative_rows"]], where="pre",
              color=COLORS[2])
    axes.set(title="cumulative rows committed", xlabel="minutes since first commit", ylim=(0, None))
    return _png(figure)


def _histogram_png(values: dict[str, Any], title: str, color: str) -> str:
    figure = Figure(figsize=(5.6, 3.0), layout="constrained")
    axes = figure.add_subplot()
    axes.stairs(values["counts"], values["edges"], fill=True, color=color)
    axes.set(title=title, xlabel="tokens", ylabel="rows")
    return _png(figure)


def _bars_png(labels: list[str], heights: list[float], title: str, colors: list[str], money: bool = False) -> str:
    figure = Figure(figsize=(5.6, 0.9 + 0.45 * len(labels)), layout="constrained")
    axes = figure.add_subplot()
    bars = axes.barh(labels[::-1], heights[::-1], color=colors[::-1])
    axes.bar_label(bars, labels=[f"${h:,.4f}" if money else f"{h:,.0f}" for h in heights[::-1]], padding=3)
    axes.set_title(title)
    axes.margins(x=0.25)
    return _png(figure)


def _figure(plot: str, title: str, values: Any, png: str | None, empty: str, wide: bool = False) -> str:
    """A <figure> with the plot's values as `data-values` JSON, and its image or the `empty` text."""
    body = (f'<img alt="{html.escape(title)}" src="data:image/png;base64,{png}">' if png
            else f'<p class="empty">{html.escape(empty)}</p>')
    table = ""
    if isinstance(values, dict) and values and all(isinstance(v, (int, float)) for v in values.values()):
        rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_format(plot, v))}</td></tr>"
                       for k, v in values.items())
        table = f'<table class="values">{rows}</table>'
    return (f'<figure class="{"wide" if wide else ""}" data-plot="{plot}" '
            f'data-values="{html.escape(json.dumps(values))}"><figcaption>{html.escape(title)}</figcaption>'
            f"{body}{table}</figure>")


def _format(name: str, value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_format(name, v)}" for k, v in value.items()) or "none"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        money = "usd" in name or "cost" in name
        return (f"-${-value:,.6f}" if value < 0 else f"${value:,.6f}") if money else f"{value:,.2f}"
    return str(value)


def figures(job: JobOutput) -> list[str]:
    """The report's plots, each with the numbers it shows."""
    sums, manifest = job.sums, job.manifest
    rate = throughput(job.commits)
    prompt, completion = histogram(sums.prompt_token_rows), histogram(sums.completion_token_rows)
    cost = {"list_price_usd": dict(sorted(sums.cost_by_variant.items())),
            "compute_usd": manifest.compute_cost_usd if manifest else None}
    cost_labels = [f"{variant}\n(list price)" for variant in cost["list_price_usd"]]
    cost_heights = list(cost["list_price_usd"].values())
    if manifest:
        cost_labels.append(f"compute, all variants\n({manifest.accelerator_seconds:,.0f} accelerator-s "
                           f"at ${manifest.accelerator_hour_usd}/h)")
        cost_heights.append(manifest.compute_cost_usd)
    cost_colors = [COLORS[0]] * len(cost["list_price_usd"]) + [COLORS[2]] * bool(manifest)
    errors = dict(sums.errors_by_type.most_common())
    reasons = dict(sums.finish_reasons.most_common())
    return [
        _figure("throughput", "Throughput: committed rows and completion tokens over time", rate,
                _throughput_png(rate) if rate["rows"] else None, "no committed shards yet", wide=True),
        _figure("prompt_tokens", f"prompt_tokens over {prompt['rows']:,} answered rows", prompt,
                _histogram_png(prompt, "prompt_tokens per row", COLORS[0]) if prompt["rows"] else None,
                "no answered rows"),
        _figure("completion_tokens", f"completion_tokens over {completion['rows']:,} answered rows", completion,
                _histogram_png(completion, "completion_tokens per row", COLORS[1]) if completion["rows"] else None,
                "no answered rows"),
        _figure("cost_by_variant", "Cost: list price per variant vs compute", cost,
                _bars_png(cost_labels, cost_heights, "USD", cost_colors, money=True) if cost_heights else None,
                "no cost yet"),
        _figure("errors_by_type", f"Errors by type ({sums.rows_failed:,} of {sums.rows:,} rows)", errors,
                _bars_png(list(errors), list(errors.values()), "error rows", [COLORS[3]] * len(errors))
                if errors else None, "no errors"),
        _figure("finish_reasons", "Finish reasons", reasons,
                _bars_png(list(reasons), list(reasons.values()), "rows", [COLORS[4]] * len(reasons))
                if reasons else None, "no rows"),
    ]


def _totals_table(job: JobOutput) -> str:
    cells = []
    for name, manifest_value, found in totals_rows(job):
        bad = job.manifest is not None and found is not None and not _same(manifest_value, found)
        cells.append(f'<tr class="{"mismatch" if bad else ""}"><th>{html.escape(name)}</th>'
                     f"<td>{html.escape(_format(name, manifest_value))}</td>"
                     f"<td>{html.escape(_format(name, found))}</td></tr>")
    return ('<table id="totals"><tr><th>field</th><th>manifest</th><th>recomputed from the output folder</th></tr>'
            + "".join(cells) + "</table>")


def _runs_table(job: JobOutput) -> str:
    rows_by_run: Counter[str] = Counter()
    for record in job.commits:
        rows_by_run[record.run_id] += record.totals.rows
    columns = {"run_id": "run", "started_at": "started", "finished_at": "finished", "wall_seconds": "wall s",
               "shards_planned": "shards planned", "shards_skipped": "skipped", "shards_committed": "committed",
               "accelerators": "accelerators", "accelerator_seconds": "accelerator-s"}
    cells = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_format(name, getattr(run, name)))}</td>" for name in columns)
        + f"<td>{rows_by_run[run.run_id]:,}</td></tr>" for run in job.runs
    )
    header = "".join(f"<th>{label}</th>" for label in (*columns.values(), "rows committed"))
    return f'<table id="runs"><tr>{header}</tr>{cells}</table>' if job.runs else "<p>No run records yet.</p>"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1180px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
.meta { color: #555; margin: 2px 0; }
.warning { background: #fff3cd; border-left: 4px solid #e0a800; padding: 6px 10px; margin: 4px 0; }
.note { background: #eef3fb; border-left: 4px solid #4c72b0; padding: 6px 10px; margin: 4px 0; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; padding: 8px; border: 1px solid #ddd; border-radius: 4px; flex: 1 1 560px; max-width: 580px; }
figure.wide { flex-basis: 100%; max-width: none; }
figcaption { font-weight: 600; margin-bottom: 6px; } img { max-width: 100%; }
.empty { color: #2a7a2a; font-size: 18px; padding: 24px; text-align: center; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #ddd; padding: 3px 8px; }
th { text-align: left; background: #f6f6f6; } td { text-align: right; }
tr.mismatch td { background: #f8d7da; } table.values { margin-top: 6px; } #runs td { white-space: nowrap; }
"""


def build_report(output_path: str, storage_options: dict | None = None) -> str:
    """The HTML report on a finished or partial job's output folder."""
    job = load_output(output_path, storage_options)
    manifest = job.manifest
    title = manifest.job_id if manifest else job.output
    status = ("complete" if manifest.complete else "partial: not every planned shard is committed") if manifest \
        else f"no {MANIFEST_FILE} yet: the job has not finished a run; showing the committed shards"
    notes = [f"{len(job.uncommitted_files)} data file(s) have no commit record and are not counted (a writer "
             "stopped before committing; the next run rewrites them)"] if job.uncommitted_files else []
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>qwen-batch report: {html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>qwen-batch report: {html.escape(title)}</h1>",
        f'<p class="meta">output: {html.escape(job.output)} · status: {html.escape(status)}</p>',
        f'<p class="meta">{len(job.commits):,} commit records, {job.sums.files:,} Parquet files read '
        f"(columns {', '.join(REPORT_COLUMNS)}) · generated {generated}</p>",
        *(f'<p class="warning">Warning: {html.escape(line)}</p>' for line in check(job)),
        *(f'<p class="note">{html.escape(line)}</p>' for line in notes),
        '<h2>Plots</h2><div class="plots">', *figures(job), "</div>",
        "<h2>Totals</h2>", _totals_table(job), "<h2>Runs</h2>", _runs_table(job), "</body></html>",
    ]
    return "\n".join(lines)


def write_report(output_path: str, out: str | None = None, storage_options: dict | None = None) -> str:
    """Write the report (default `<output_path>/_report.html`, any storage URL) and return where it went."""
    target = out or Layout.at(output_path).url(REPORT_FILE)
    storage.write_bytes(target, build_report(output_path, storage_options).encode(), storage_options)
    return target
