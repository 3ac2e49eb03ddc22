"""The `qwen-batch` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from qwen_batch.schemas.errors import SpecError

EXIT_CANNOT_START = 2
EXIT_JOBS_API = 5
EXIT_BROKEN_PIPE = 141
# A submitted job's status as `status` (and `submit --wait`) exit with it.
STATUS_EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3, "PENDING": 4, "RUNNING": 4}
STATUS_EXIT_HELP = "Exit status: 0 SUCCEEDED, 1 FAILED, 3 STOPPED, 4 PENDING or RUNNING."
EXIT_HELP = (f"Exit status: 0 done; 1 the job FAILED, or `run` left shards to do; {EXIT_CANNOT_START} the job cannot "
             "start (a bad spec or usage); 3 the job was STOPPED; 4 it is PENDING or RUNNING (`status`); "
             f"{EXIT_JOBS_API} the Ray Jobs API failed (unreachable cluster, refused token, unknown submission id); "
             f"{EXIT_BROKEN_PIPE} stdout was closed early (`| head`).")


@dataclass(frozen=True)
class _Shown:
    """What a command found: `text` for people, `document` for --json, and the exit status."""

    document: Any
    text: str
    exit_code: int = 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `qwen-batch` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(args.log_level)
    try:
        code = _dispatch(args)
        sys.stdout.flush()
        return code
    except SpecError as exc:
        print(f"qwen-batch {args.command}: the job cannot start:\n{exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    except BrokenPipeError:
        # The reader went away (`qwen-batch models | head -1`): end quietly, with nothing left to flush at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _dispatch(args: argparse.Namespace) -> int:
    """Run the command; a `_Shown` it returns is printed as text, or with --json as one JSON document."""
    as_json = getattr(args, "json", False)
    with _stdout_to_stderr() if as_json else contextlib.nullcontext():
        result = args.handler(args)
    if isinstance(result, int):
        return result
    print(json.dumps(result.document, indent=2) if as_json else result.text)
    return result.exit_code


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send whatever is printed meanwhile to stderr, by Python code or by a library or child process writing to file
    descriptor 1 (Ray's worker output, say), so that --json leaves stdout to the one document."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows the default of every option that takes a value and has one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.default is None:
            return action.help
        return super()._get_help_string(action)


def _verbosity(default: Any) -> argparse.ArgumentParser:
    """-q and -v: on the top-level parser with the default log level, on each command with SUPPRESS, so that either
    may come before or after the command's name without the command's defaults undoing the top level's."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", dest="log_level", action="store_const", const=logging.WARNING,
                       default=default, help="Log warnings and errors only.")
    group.add_argument("-v", "--verbose", dest="log_level", action="store_const", const=logging.DEBUG,
                       default=default, help="Log debug messages too, the libraries' (Ray, fsspec, botocore) included, "
                       "and show Ray's and vLLM's output, which otherwise only goes to the run's log file.")
    return options


def _version() -> str:
    try:
        return metadata.version("qwen-batch")
    except metadata.PackageNotFoundError:
        return "unknown (this copy of the code is not an installed distribution)"


def _parser() -> argparse.ArgumentParser:
    from qwen_batch.cluster.planner import GPU_TYPES

    parser = argparse.ArgumentParser(prog="qwen-batch", description=__doc__, epilog=EXIT_HELP,
                                     formatter_class=_HelpFormatter, parents=[_verbosity(logging.INFO)])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    verbosity = _verbosity(argparse.SUPPRESS)

    def command(name: str, handler: Callable[[argparse.Namespace], int | _Shown], text: str, *,
                json_output: bool = False, epilog: str | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text, epilog=epilog, parents=[verbosity],
                                  formatter_class=_HelpFormatter)
        sub.set_defaults(handler=handler)
        if json_output:
            sub.add_argument("--json", action="store_true", help="Print one JSON document on stdout and nothing else "
                             "(logs stay on stderr); on an error, stdout stays empty.")
        return sub

    validate = command("validate", _validate, "Check a spec against its input, model and output; show the plan.",
                       json_output=True)
    validate.add_argument("spec", help="Job spec, YAML or JSON.")
    _add_logical_date(validate)

    run = command("run", _run, "Run a job (resuming an unfinished run of the same spec); show its manifest.",
                  json_output=True)
    run.add_argument("spec", help="Job spec, YAML or JSON.")
    _add_logical_date(run)
    run.add_argument("--address", help="Ray cluster address; RAY_ADDRESS when not given, else a local Ray.")
    run.add_argument("--overwrite", action="store_true", help="Delete what the output folder holds and start over.")

    plan = command("plan", _plan, "Tensor parallelism, replicas, KV capacity, time and cost on a GPU cluster.",
                   json_output=True)
    plan.add_argument("spec", help="Job spec, YAML or JSON.")
    _add_logical_date(plan)
    plan.add_argument("--gpu-type", metavar="GPU", default="h100-80gb", help=f"GPU model: {', '.join(GPU_TYPES)}.")
    plan.add_argument("--gpus", type=int, default=8, help="GPUs in the cluster.")

    render = command("render", _render, "Write deployment manifests for a spec.")
    render.add_argument("target", choices=["k8s"], help="`k8s`: a KubeRay RayJob plus the ConfigMap holding the spec.")
    render.add_argument("spec", help="Job spec, YAML or JSON.")
    _add_logical_date(render)
    render.add_argument("--image", required=True, help="Container image with qwen-batch[gpu] and Ray 2.60.")
    render.add_argument("--gpus-per-worker", type=int, default=8, help="GPUs on one worker node.")
    render.add_argument("--workers", type=int, default=0, help="Worker pods; 0 starts as many as the replicas need.")
    render.add_argument("--namespace", default="default", help="Kubernetes namespace.")

    command("models", _models, "List the Qwen variant catalog.", json_output=True)
    command("schema", _schema, "Print the job spec's JSON Schema, for editors and CI checks.")

    tiny = command("make-tiny-model", _make_tiny_model,
                   "Build a tiny random-weight Qwen checkpoint for tests, offline.")
    tiny.add_argument("--arch", choices=["qwen2", "qwen3", "qwen2_5_vl"], required=True,
                      help="Architecture of the checkpoint.")
    tiny.add_argument("out_dir", nargs="?", help="Folder to write; when not given, the model folder, where variant "
                      "`tiny-<arch>` finds it.")

    tiny_lora = command("make-tiny-lora", _make_tiny_lora,
                        "Build a tiny random LoRA adapter (peft's format) for a checkpoint, for tests, offline.")
    tiny_lora.add_argument("base", help="Checkpoint folder the adapter is for (e.g. the one make-tiny-model built), "
                           "or a catalog variant whose checkpoint is in the model folder (tiny-qwen2).")
    tiny_lora.add_argument("out_dir", help="Folder to write adapter_config.json and adapter_model.safetensors to.")
    tiny_lora.add_argument("--rank", type=int, default=8, help="LoRA rank r.")
    tiny_lora.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj",
                           help="Comma-separated modules to adapt.")
    tiny_lora.add_argument("--seed", type=int, default=1, help="Seed of the random weights.")

    demo = command("demo", _demo, "Build a tiny model and a sample dataset, run a job on them, show rows.")
    demo.add_argument("--dir", default="demo", help="Folder for the sample data, spec and output.")
    demo.add_argument("--rows", type=int, default=200, help="Sample rows to generate.")

    report = command("report", _report, "Write an HTML report (plots, totals, runs) on a job's output folder.")
    report.add_argument("output_path", help="The job's output folder (output.path of its spec), local or s3://.")
    report.add_argument("--out", help="Where to write the HTML; OUTPUT_PATH/_report.html when not given.")

    submit = command("submit", _submit, "Submit a job to a Ray cluster through the Jobs API; print its id.",
                     epilog=f"With --wait: {STATUS_EXIT_HELP}")
    submit.add_argument("spec", help="Job spec, YAML or JSON.")
    _add_logical_date(submit, " Passed on to `run` on the cluster.")
    _add_address(submit)
    submit.add_argument("--submission-id", metavar="ID", help="The job's id on the cluster (e.g. the DAG's id and "
                        "the logical date), for retries: when a job of this id and spec name exists already, print "
                        "its id and submit nothing; when not given, a new raysubmit_ id.")
    submit.add_argument("--overwrite", action="store_true", help="Pass --overwrite to `run` on the cluster.")
    submit.add_argument("--python", default="python", help="Interpreter on the head node that has Ray and vLLM, "
                        "found on the PATH the cluster was started with.")
    submit.add_argument("--wait", action="store_true", help="Stream the job's logs to stderr until it ends; exit "
                        "with its status.")

    status = command("status", _job_status, "Print a submitted job's status.", json_output=True,
                     epilog=f"{STATUS_EXIT_HELP} {EXIT_JOBS_API} the Jobs API failed (unreachable cluster, refused "
                     "token, unknown submission id).")
    listing = command("list", _list_jobs, "List the cluster's qwen-batch jobs: id, job name, status, start and end.",
                      json_output=True)
    logs = command("logs", _job_logs, "Print a submitted job's logs.")
    logs.add_argument("--follow", action="store_true", help="Keep printing until the job ends.")
    stop = command("stop", _stop_job, "Stop a submitted job; committed shards stay whole.")
    for jobs_api in (status, logs, stop):
        jobs_api.add_argument("submission_id", help="The id `qwen-batch submit` printed.")
    for jobs_api in (status, listing, logs, stop):
        _add_address(jobs_api)
    return parser


def _add_logical_date(command: argparse.ArgumentParser, more: str = "") -> None:
    command.add_argument("--logical-date", metavar="DATE", help="The run's logical date, YYYY-MM-DD or an ISO "
                         "datetime (no zone: UTC), for {ds}, {ds_nodash}, {ts} and {ts_nodash} in the spec's name and "
                         "paths; QWEN_BATCH_LOGICAL_DATE when not given." + more)


def _add_address(command: argparse.ArgumentParser) -> None:
    command.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                         help="Ray dashboard address, http://HEAD:8265; RAY_ADDRESS when not given.")


def _logical_date(args: argparse.Namespace) -> datetime | None:
    """--logical-date, parsed; None when not given (load_spec then reads QWEN_BATCH_LOGICAL_DATE)."""
    from qwen_batch.schemas.spec import parse_logical_date

    return None if args.logical_date is None else parse_logical_date(args.logical_date)


def _validate(args: argparse.Namespace) -> _Shown:
    from qwen_batch.jobs.driver import plan_job
    from qwen_batch.pipelines.storage import display_url
    from qwen_batch.schemas.spec import load_spec

    plan = plan_job(load_spec(args.spec, _logical_date(args)))
    files = len({s.file for s in plan.shards})
    models = [{"name": m.name, "variant": m.variant.name, "loads": m.model, "max_model_len": m.max_model_len,
               "thinking": m.spec.thinking, "shards_committed": len(m.committed),
               "shards_to_run": len(plan.todo(m)),
               "adapters": [{"name": a.name, "path": display_url(a.url), "rank": a.rank, "target_modules": list(a.target_modules)}
                            for a in m.adapters]} for m in plan.models]
    lines = [f"job {plan.job_id}: {plan.rows} rows in {len(plan.shards)} shards from {files} input file(s) -> "
             f"{plan.layout.output}"]
    lines += [f"bad input file, skipped: {file}" for file in plan.bad_files]
    lines += [f"{m['name']}: {m['variant']} from {m['loads']}, max_model_len {m['max_model_len']}, thinking "
              f"{m['thinking']}; {m['shards_committed']} shards committed, {m['shards_to_run']} to run"
              + "".join(f"\n  adapter {a['name']}: rank {a['rank']} on {', '.join(a['target_modules'])} from {a['path']}"
                        for a in m["adapters"]) for m in models]
    return _Shown({"job_id": plan.job_id, "input_files": files, "shards": len(plan.shards), "rows": plan.rows,
                   "bad_files": plan.bad_files, "output": plan.layout.output, "models": models}, "\n".join(lines))


def _plan(args: argparse.Namespace) -> _Shown:
    from qwen_batch.jobs.estimate import estimate_job
    from qwen_batch.schemas.spec import load_spec

    estimate = estimate_job(load_spec(args.spec, _logical_date(args)), args.gpu_type, args.gpus)
    return _Shown(estimate.as_dict(), estimate.text())


def _render(args: argparse.Namespace) -> int:
    from qwen_batch.cluster.render import render_command

    print(render_command(args.spec, args.image, args.gpus_per_worker, args.workers, args.namespace,
                         logical_date=_logical_date(args)), end="")
    return 0


def _run(args: argparse.Namespace) -> _Shown:
    from qwen_batch.jobs.driver import run_job
    from qwen_batch.schemas.spec import load_spec

    manifest = run_job(load_spec(args.spec, _logical_date(args)), address=args.address, overwrite=args.overwrite,
                       verbose=_verbose(args))
    failed = not manifest.complete or manifest.error_limit_exceeded
    return _Shown(manifest.model_dump(mode="json"), _summary(manifest), 1 if failed else 0)


def _summary(manifest) -> str:
    totals = manifest.totals
    verdict = ""
    if manifest.error_limit_exceeded:
        verdict = (f"FAILED: {manifest.error_rate:.1%} of the rows are error rows, over limits.max_error_rate"
                   + (f"; {manifest.stopped}" if manifest.stopped else "") + "\n")
    return verdict + (
        f"job {manifest.job_id}: {manifest.rows_in} rows ({manifest.rows_ok} ok, {manifest.rows_failed} failed) in "
        f"{manifest.shards} shards -> {manifest.output_path}\n"
        f"tokens: {totals.prompt_tokens} prompt + {totals.completion_tokens} completion; "
        f"{manifest.output_tokens_per_s:.0f} output tok/s in the engine; wall {manifest.wall_seconds:.1f} s\n"
        f"cost: ${manifest.list_price_cost_usd:.6f} at list prices vs ${manifest.compute_cost_usd:.6f} compute "
        f"({manifest.accelerator_seconds:.0f} accelerator-s at ${manifest.accelerator_hour_usd}/h)"
    )


def _models(args: argparse.Namespace) -> _Shown:
    from qwen_batch.schemas.catalog import CATALOG

    lines = [f"{'name':34} {'hugging face id':44} {'params':>8} {'context':>8} {'in $/M':>7} {'out $/M':>7}"]
    lines += [f"{variant.name:34} {variant.hf_id:44} {variant.params_b:7.2f}B {variant.context_length:8d} "
              f"{variant.input_per_mtok:7.3f} {variant.output_per_mtok:7.3f}" for variant in CATALOG.values()]
    return _Shown([variant.model_dump(mode="json") for variant in CATALOG.values()], "\n".join(lines))


def _schema(args: argparse.Namespace) -> _Shown:
    """The job spec's JSON Schema; schemas/job-spec.schema.json is this output, committed."""
    from qwen_batch.schemas.spec import JobSpec

    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **JobSpec.model_json_schema()}
    return _Shown(schema, json.dumps(schema, indent=2))


def _make_tiny_model(args: argparse.Namespace) -> int:
    from qwen_batch.jobs.driver import model_dir
    from qwen_batch.jobs.tiny_model import make_tiny_model
    from qwen_batch.schemas.catalog import get_variant

    out_dir = Path(args.out_dir) if args.out_dir else model_dir() / get_variant(f"tiny-{args.arch}").hf_id
    print(make_tiny_model(args.arch, out_dir))
    return 0


def _make_tiny_lora(args: argparse.Namespace) -> int:
    from qwen_batch.jobs.driver import model_dir
    from qwen_batch.jobs.tiny_lora import make_tiny_lora
    from qwen_batch.schemas.catalog import CATALOG

    base = model_dir() / CATALOG[args.base].hf_id if args.base in CATALOG else Path(args.base)
    if not (base / "config.json").is_file():
        raise SpecError(f"base: found {args.base!r}, which is neither a checkpoint folder (with config.json) nor a "
                        "catalog variant built in the model folder; run `qwen-batch make-tiny-model` first")
    print(make_tiny_lora(base, args.out_dir, rank=args.rank, seed=args.seed,
                         target_modules=tuple(args.target_modules.split(","))))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from qwen_batch.jobs.demo import run_demo

    return run_demo(Path(args.dir), args.rows, verbose=_verbose(args))


def _verbose(args: argparse.Namespace) -> bool:
    """-v: Ray's and vLLM's output on the terminal as well as in the run's log file."""
    return args.log_level == logging.DEBUG


def _report(args: argparse.Namespace) -> int:
    from qwen_batch.jobs.report import write_report

    try:
        print(write_report(args.output_path, args.out))
    except SpecError as exc:
        print(f"qwen-batch report: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    return 0


def _jobs_api(handler: Callable[[argparse.Namespace], int | _Shown]) -> Callable[[argparse.Namespace], int | _Shown]:
    """Run a Jobs API command: a missing address is a usage error, a failed call a one-line error with its own exit
    status."""
    def call(args: argparse.Namespace) -> int | _Shown:
        from ray.exceptions import RayError

        if not args.address:
            print(f"qwen-batch {args.command}: no cluster address; pass --address http://HEAD:8265 or set "
                  "RAY_ADDRESS", file=sys.stderr)
            return EXIT_CANNOT_START
        try:
            return handler(args)
        except BrokenPipeError:
            raise  # a ConnectionError, but ours (stdout closed early), not the cluster's
        except (ConnectionError, RuntimeError, TimeoutError, RayError) as error:
            print(f"qwen-batch {args.command}: {error}", file=sys.stderr)
            return EXIT_JOBS_API
    return call


@_jobs_api
def _submit(args: argparse.Namespace) -> int:
    from qwen_batch.jobs.submit import job_logs, job_status, submit_job

    submission_id = submit_job(args.spec, args.address, extra_args=["--overwrite"] if args.overwrite else None,
                               python=args.python, logical_date=_logical_date(args),
                               submission_id=args.submission_id)
    print(submission_id, flush=True)
    if not args.wait:
        return 0
    for chunk in job_logs(args.address, submission_id, follow=True):
        print(chunk, end="", file=sys.stderr, flush=True)
    status = job_status(args.address, submission_id)
    print(f"job {submission_id}: {status}", file=sys.stderr)
    return STATUS_EXIT_CODES[status]


@_jobs_api
def _job_status(args: argparse.Namespace) -> _Shown:
    from qwen_batch.jobs.submit import job_info

    job = job_info(args.address, args.submission_id)
    return _Shown(asdict(job), job.status, STATUS_EXIT_CODES[job.status])


@_jobs_api
def _list_jobs(args: argparse.Namespace) -> _Shown:
    from qwen_batch.jobs.submit import list_jobs

    jobs = list_jobs(args.address)
    rows = [("submission id", "job", "status", "started", "ended")]
    rows += [(job.submission_id, job.name or "", job.status, job.start_time or "-", job.end_time or "-")
             for job in jobs]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    text = "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
    return _Shown([asdict(job) for job in jobs], text)


@_jobs_api
def _job_logs(args: argparse.Namespace) -> int:
    from qwen_batch.jobs.submit import job_logs

    for chunk in job_logs(args.address, args.submission_id, follow=args.follow):
        print(chunk, end="", flush=True)
    return 0


@_jobs_api
def _stop_job(args: argparse.Namespace) -> int:
    from qwen_batch.jobs.submit import stop_job

    stopped = stop_job(args.address, args.submission_id)
    print(f"job {args.submission_id}: {'stopping' if stopped else 'had already ended'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
