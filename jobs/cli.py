"""The `qwen-batch` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from qwen_batch.schemas.errors import SpecError


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `qwen-batch` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if not args.quiet else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.handler(args)
    except SpecError as exc:
        print(f"qwen-batch {args.command}: the job cannot start:\n{exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-batch", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="Log warnings and errors only.")
    commands = parser.add_subparsers(dest="command", required=True)

    validate = commands.add_parser("validate", help="Check a spec against its input, model and output; print the plan.")
    validate.add_argument("spec", help="Job spec, YAML or JSON.")
    _add_logical_date(validate)
    validate.set_defaults(handler=_validate)

    run = commands.add_parser("run", help="Run a job (resuming an unfinished run of the same spec).")
    run.add_argument("spec", help="Job spec, YAML or JSON.")
    _add_logical_date(run)
    run.add_argument("--address", help="Ray cluster address; default RAY_ADDRESS, else a local Ray.")
    run.add_argument("--overwrite", action="store_true", help="Delete what the output folder holds and start over.")
    run.set_defaults(handler=_run)

    plan = commands.add_parser("plan", help="Tensor parallelism, replicas, KV capacity, time and cost on a GPU cluster.")
    plan.add_argument("spec", help="Job spec, YAML or JSON.")
    _add_logical_date(plan)
    plan.add_argument("--gpu-type", default="h100-80gb", help="GPU model (see cluster/planner.py GPU_TYPES).")
    plan.add_argument("--gpus", type=int, default=8, help="GPUs in the cluster.")
    plan.set_defaults(handler=_plan)

    render = commands.add_parser("render", help="Write deployment manifests for a spec.")
    render.add_argument("target", choices=["k8s"], help="`k8s`: a KubeRay RayJob plus the ConfigMap holding the spec.")
    render.add_argument("spec", help="Job spec, YAML or JSON.")
    _add_logical_date(render)
    render.add_argument("--image", required=True, help="Container image with qwen-batch[gpu] and Ray 2.60.")
    render.add_argument("--gpus-per-worker", type=int, default=8, help="GPUs on one worker node.")
    render.add_argument("--workers", type=int, default=0, help="Worker pods; 0 starts as many as the replicas need.")
    render.add_argument("--namespace", default="default", help="Kubernetes namespace.")
    render.set_defaults(handler=_render)

    models = commands.add_parser("models", help="List the Qwen variant catalog.")
    models.set_defaults(handler=_models)

    tiny = commands.add_parser("make-tiny-model", help="Build a tiny random-weight Qwen checkpoint for tests, offline.")
    tiny.add_argument("--arch", choices=["qwen2", "qwen3"], required=True, help="Architecture of the checkpoint.")
    tiny.add_argument("out_dir", nargs="?", help="Folder to write; default: the model folder, where variant "
                      "`tiny-<arch>` finds it.")
    tiny.set_defaults(handler=_make_tiny_model)

    demo = commands.add_parser("demo", help="Build a tiny model and a sample dataset, run a job on them, show rows.")
    demo.add_argument("--dir", default="demo", help="Folder for the sample data, spec and output.")
    demo.add_argument("--rows", type=int, default=200, help="Sample rows to generate.")
    demo.set_defaults(handler=_demo)

    report = commands.add_parser("report", help="Write an HTML report (plots, totals, runs) on a job's output folder.")
    report.add_argument("output_path", help="The job's output folder (output.path of its spec), local or s3://.")
    report.add_argument("--out", help="Where to write the HTML; default OUTPUT_PATH/_report.html.")
    report.set_defaults(handler=_report)

    address_help = "Ray dashboard address, http://HEAD:8265; default RAY_ADDRESS."
    submit = commands.add_parser("submit", help="Submit a job to a Ray cluster through the Jobs API; print its id.")
    submit.add_argument("spec", help="Job spec, YAML or JSON.")
    _add_logical_date(submit, " Passed on to `run` on the cluster.")
    submit.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help=address_help)
    submit.add_argument("--overwrite", action="store_true", help="Pass --overwrite to `run` on the cluster.")
    submit.add_argument("--python", default="python", help="Interpreter on the head node that has Ray and vLLM; "
                        "default `python` on the PATH the cluster was started with.")
    submit.add_argument("--wait", action="store_true", help="Stream the job's logs to stderr until it ends; exit 0 "
                        "only if it SUCCEEDED.")
    submit.set_defaults(handler=_submit)

    for name, handler, text in (("status", _job_status, "Print a submitted job's status."),
                                ("logs", _job_logs, "Print a submitted job's logs."),
                                ("stop", _stop_job, "Stop a submitted job; committed shards stay whole.")):
        command = commands.add_parser(name, help=text)
        command.add_argument("submission_id", help="The id `qwen-batch submit` printed.")
        command.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help=address_help)
        if name == "logs":
            command.add_argument("--follow", action="store_true", help="Keep printing until the job ends.")
        command.set_defaults(handler=handler)
    return parser


def _add_logical_date(command: argparse.ArgumentParser, more: str = "") -> None:
    command.add_argument("--logical-date", metavar="DATE", help="The run's logical date, YYYY-MM-DD or an ISO "
                         "datetime (no zone: UTC), for {ds}, {ds_nodash}, {ts} and {ts_nodash} in the spec's name and "
                         "paths; default QWEN_BATCH_LOGICAL_DATE." + more)


def _logical_date(args: argparse.Namespace) -> datetime | None:
    """--logical-date, parsed; None when not given (load_spec then reads QWEN_BATCH_LOGICAL_DATE)."""
    from qwen_batch.schemas.spec import parse_logical_date

    return None if args.logical_date is None else parse_logical_date(args.logical_date)


def _validate(args: argparse.Namespace) -> int:
    from qwen_batch.jobs.driver import plan_job
    from qwen_batch.schemas.spec import load_spec

    plan = plan_job(load_spec(args.spec, _logical_date(args)))
    print(json.dumps({
        "job_id": plan.job_id, "input_files": len({s.file for s in plan.shards}), "shards": len(plan.shards),
        "rows": plan.rows, "bad_files": plan.bad_files, "output": plan.layout.output,
        "models": [{"name": m.name, "variant": m.variant.name, "loads": m.model, "max_model_len": m.max_model_len,
                    "thinking": m.spec.thinking, "shards_committed": len(m.committed),
                    "shards_to_run": len(plan.todo(m))} for m in plan.models],
    }, indent=2))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from qwen_batch.jobs.estimate import estimate_job
    from qwen_batch.schemas.spec import load_spec

    print(estimate_job(load_spec(args.spec, _logical_date(args)), args.gpu_type, args.gpus))
    return 0


def _render(args: argparse.Namespace) -> int:
    from qwen_batch.cluster.render import render_command

    print(render_command(args.spec, args.image, args.gpus_per_worker, args.workers, args.namespace,
                         logical_date=_logical_date(args)), end="")
    return 0


def _run(args: argparse.Namespace) -> int:
    from qwen_batch.jobs.driver import run_job
    from qwen_batch.schemas.spec import load_spec

    manifest = run_job(load_spec(args.spec, _logical_date(args)), address=args.address, overwrite=args.overwrite)
    print(_summary(manifest))
    return 0 if manifest.complete else 1


def _summary(manifest) -> str:
    totals = manifest.totals
    return (
        f"job {manifest.job_id}: {manifest.rows_in} rows ({manifest.rows_ok} ok, {manifest.rows_failed} failed) in "
        f"{manifest.shards} shards -> {manifest.output_path}\n"
        f"tokens: {totals.prompt_tokens} prompt + {totals.completion_tokens} completion; "
        f"{manifest.output_tokens_per_s:.0f} output tok/s in the engine; wall {manifest.wall_seconds:.1f} s\n"
        f"cost: ${manifest.list_price_cost_usd:.6f} at list prices vs ${manifest.compute_cost_usd:.6f} compute "
        f"({manifest.accelerator_seconds:.0f} accelerator-s at ${manifest.accelerator_hour_usd}/h)"
    )


def _models(args: argparse.Namespace) -> int:
    from qwen_batch.schemas.catalog import CATALOG

    header = f"{'name':34} {'hugging face id':44} {'params':>8} {'context':>8} {'in $/M':>7} {'out $/M':>7}"
    print(header)
    for variant in CATALOG.values():
        print(f"{variant.name:34} {variant.hf_id:44} {variant.params_b:7.2f}B {variant.context_length:8d} "
              f"{variant.input_per_mtok:7.3f} {variant.output_per_mtok:7.3f}")
    return 0


def _make_tiny_model(args: argparse.Namespace) -> int:
    from qwen_batch.jobs.driver import model_dir
    from qwen_batch.jobs.tiny_model import make_tiny_model
    from qwen_batch.schemas.catalog import get_variant

    out_dir = Path(args.out_dir) if args.out_dir else model_dir() / get_variant(f"tiny-{args.arch}").hf_id
    print(make_tiny_model(args.arch, out_dir))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from qwen_batch.jobs.demo import run_demo

    return run_demo(Path(args.dir), args.rows)


def _report(args: argparse.Namespace) -> int:
    from qwen_batch.jobs.report import write_report

    try:
        print(write_report(args.output_path, args.out))
    except SpecError as exc:
        print(f"qwen-batch report: {exc}", file=sys.stderr)
        return 2
    return 0


def _jobs_api(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a Jobs API command: a missing address or an unreachable cluster is a one-line error, exit 1."""
    def call(args: argparse.Namespace) -> int:
        from ray.exceptions import RayError

        if not args.address:
            print(f"qwen-batch {args.command}: no cluster address; pass --address http://HEAD:8265 or set "
                  "RAY_ADDRESS", file=sys.stderr)
            return 1
        try:
            return handler(args)
        except (ConnectionError, RuntimeError, TimeoutError, RayError) as error:
            print(f"qwen-batch {args.command}: {error}", file=sys.stderr)
            return 1
    return call


@_jobs_api
def _submit(args: argparse.Namespace) -> int:
    from qwen_batch.jobs.submit import job_logs, job_status, submit_job

    submission_id = submit_job(args.spec, args.address, extra_args=["--overwrite"] if args.overwrite else None,
                               python=args.python, logical_date=_logical_date(args))
    print(submission_id, flush=True)
    if not args.wait:
        return 0
    for chunk in job_logs(args.address, submission_id, follow=True):
        print(chunk, end="", file=sys.stderr, flush=True)
    status = job_status(args.address, submission_id)
    print(f"job {submission_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


@_jobs_api
def _job_status(args: argparse.Namespace) -> int:
    from qwen_batch.jobs.submit import job_status

    print(job_status(args.address, args.submission_id))
    return 0


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
