"""The ``vitpipe`` command line.

This is the composition root: it wires the engine (:mod:`pipeline`), the stage registry
(:mod:`stages`, by name) and Ray (:mod:`cluster`). Every error a user can cause is printed as a
single ``vitpipe: error: ...`` line with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from pipeline import __version__
from pipeline.config import RunConfig, StorageSettings, load_config, parse_config
from pipeline.errors import VitpipeError
from pipeline.logsetup import configure_logging
from pipeline.overrides import apply_overrides
from pipeline.registry import PlanOptions
from pipeline.storage import open_storage

__all__ = ["main", "build_parser"]

log = logging.getLogger("vitpipe")

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"

EPILOG = """\
examples:
  vitpipe run configs/tiny.yaml                      run the CPU default pipeline (embedded Ray)
  vitpipe run configs/tiny.yaml pretrain.steps=200   ... with a dotted override
  vitpipe status runs/tiny                           what each stage did
  vitpipe resume runs/tiny                           finish an interrupted run
  vitpipe run configs/tiny.yaml --from finetune      re-run finetune and everything after it
  vitpipe gc runs/tiny                               what the run no longer needs (--yes removes it)
  vitpipe submit configs/tiny.yaml --address http://HEAD:8265   run it as a Ray job
  vitpipe plan configs/tiny.yaml --nodes 4 --gpus-per-node 8     memory per ZeRO stage, throughput, data plane
"""

PLAN_DESCRIPTION = """\
Estimate, without running anything, what each stage that has a capacity model (pretrain) needs
on NODES x GPUS_PER_NODE GPUs (the data-parallel world N): parameters, FLOPs per image, ZeRO
model states per GPU for stages 0-3, activations per micro-batch with and without activation
checkpointing, whether it fits in GPU memory (and what would), step time and images/s at an
assumed MFU, the decode cores the data plane needs, and checkpoint sizes.

examples:
  vitpipe plan configs/tiny.yaml
  vitpipe plan configs/tiny.yaml pretrain.model=H/14 pretrain.image_size=224 --nodes 4 --gpus-per-node 8
  vitpipe plan configs/tiny.yaml pretrain.zero_stage=3 --gpu a100 --mfu 0.35 --json
"""


def _add_run_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. seed=1 or pretrain.steps=200")
    p.add_argument("--only", action="append", default=[], metavar="STAGE",
                   help="run only this stage (repeatable); its inputs must be complete")
    p.add_argument("--from", dest="from_stages", action="append", default=[], metavar="STAGE",
                   help="re-run this stage and everything downstream of it (repeatable)")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else an embedded local instance)")
    p.add_argument("--num-cpus", type=int, help="CPUs for the embedded Ray instance (default: all)")
    p.add_argument("--no-dashboard", action="store_true", help="do not start the Ray dashboard (embedded Ray)")
    p.add_argument("--no-verify", action="store_true",
                   help="trust committed outputs without checking that they exist with the recorded sizes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitpipe",
        description="Vision Transformer pretraining pipelines on Ray: run, resume, inspect and submit.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vitpipe {__version__}")
    # -v/-q work before or after the command (`vitpipe -q run ...` and `vitpipe run ... -q`).
    common = argparse.ArgumentParser(add_help=False)
    for target, default in ((parser, False), (common, argparse.SUPPRESS)):
        target.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
        target.add_argument("-q", "--quiet", action="store_true", default=default, help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_parser = sub.add_parser

    def add_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return _add_parser(name, parents=[common], **kwargs)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    p = sub.add_parser("run", help="run a pipeline config (skips stages that are already up to date)")
    p.add_argument("config", help="run config YAML")
    p.add_argument("--run-dir", help="run location: a path or s3://bucket/prefix (default: runs/NAME)")
    _add_run_selection(p)

    p = sub.add_parser("resume", help="continue a run from its directory, skipping finished stages")
    p.add_argument("run", help="run directory or s3:// URI")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    _add_run_selection(p)

    p = sub.add_parser("status", help="show each stage's state, duration, outputs and error")
    p.add_argument("run", help="run directory or s3:// URI")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--detail", action="store_true",
                   help="also where each training stage's wall time went (goodput by bucket)")

    p = sub.add_parser("gc", help="list (and with --yes remove) what a run no longer needs",
                       description="List what a run no longer needs: unfinished uploads of killed writers (S3 "
                                   "bills them until aborted), temp files, uncommitted checkpoints older than the "
                                   "newest committed one, stage folders kept aside by a re-run, and a stale S3 "
                                   "lock. Committed outputs are never touched; nothing is done while a driver "
                                   "runs the run.")
    p.add_argument("run", help="run directory or s3:// URI")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--yes", action="store_true", help="remove what is listed (default: only list it)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("validate", help="check a config (schema, stage params, graph) without running it")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    p = sub.add_parser("plan", help="capacity plan: memory per ZeRO stage, throughput, data plane (runs nothing)",
                       description=PLAN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. pretrain.model=L/16")
    p.add_argument("--nodes", type=int, default=1, help="nodes in the cluster (default: 1)")
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per node (default: 1); N = nodes x GPUs")
    p.add_argument("--gpu", metavar="{h100,a100,h200}", help="GPU model (default: each stage's `gpu` param)")
    p.add_argument("--mfu", type=float, default=PlanOptions.mfu,
                   help=f"assumed model-FLOPs utilisation of the dense bf16 peak (default: {PlanOptions.mfu})")
    p.add_argument("--decode-rate", type=float, metavar="IMAGES_PER_S",
                   help="images/s one CPU core decodes and augments (default: the loader's measured rate, "
                        "printed in the plan)")
    p.add_argument("--num-classes", type=int, help="classes of the pretraining head (default: from the ingest "
                                                   "source where known, else 1000)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("submit", help="submit a pipeline as a Ray job; prints the job id")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--address", default=None,
                   help=f"Ray dashboard URL (default: RAY_API_SERVER_ADDRESS or {DEFAULT_DASHBOARD})")
    p.add_argument("--run-dir", help="run location as seen from the cluster (default: runs/NAME in the job's "
                                     "working directory; use s3:// for multi-node clusters)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra non-secret environment variable for the job (repeatable)")
    p.add_argument("--wait", action="store_true", help="wait for the job and stream its logs")

    for name, help_text in (("jobs", "list Ray jobs submitted by vitpipe"),):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--address", default=None, help=f"Ray dashboard URL (default: {DEFAULT_DASHBOARD})")
        p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("logs", help="print a job's logs")
    p.add_argument("job_id")
    p.add_argument("--address", default=None, help=f"Ray dashboard URL (default: {DEFAULT_DASHBOARD})")
    p.add_argument("-f", "--follow", action="store_true", help="stream logs until the job ends")
    p = sub.add_parser("stop", help="stop a running job")
    p.add_argument("job_id")
    p.add_argument("--address", default=None, help=f"Ray dashboard URL (default: {DEFAULT_DASHBOARD})")
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    configure_logging(level)
    # Third-party libraries stay at WARNING unless -v.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "filelock", "ray"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)


def _interrupt_on_sigterm() -> None:
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def _apply_runtime_flags(config: RunConfig, args: argparse.Namespace) -> RunConfig:
    if args.num_cpus is not None:
        config.ray.num_cpus = args.num_cpus
    if args.no_dashboard:
        config.ray.include_dashboard = False
    return config


def _execute(config: RunConfig, run_uri: str, args: argparse.Namespace) -> int:
    from cluster.console import ConsoleCapture
    from cluster.executor import RayExecutor
    from cluster.runtime import ray_runtime
    from pipeline.engine import run_pipeline
    from pipeline.lock import acquire_run_lock
    from pipeline.status import collect_headlines, collect_status, format_table

    _interrupt_on_sigterm()
    show_progress = sys.stderr.isatty() and not args.quiet
    run_storage = open_storage(run_uri, config.storage)
    lock = acquire_run_lock(run_storage)  # before Ray: refuse a second driver fast
    console = ConsoleCapture(run_storage, verbose=args.verbose)
    with lock, console, ray_runtime(config.ray, args.address, console) as where:
        log.info("run %s in %s on %s (log: %s)", config.name, run_uri, where, run_storage.uri_of(console.relative))
        try:
            summary = run_pipeline(config, run_uri, RayExecutor(), only=args.only, from_stages=args.from_stages,
                                   show_progress=show_progress, verify=not args.no_verify, lock=lock)
        finally:
            if not args.quiet:
                try:
                    _, rows = collect_status(open_storage(run_uri, config.storage))
                    print(format_table(rows))
                except VitpipeError:
                    pass
    log.info("run %s finished: %d ran, %d up to date", config.name, len(summary.ran), len(summary.skipped))
    if not args.quiet:
        for stage, report, lines in collect_headlines(open_storage(run_uri, config.storage)):
            print(f"\n{stage}: {report}" if report else f"\n{stage}:")
            for line in lines:
                print(f"  {line}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    config = _apply_runtime_flags(load_config(args.config, args.overrides), args)
    return _execute(config, args.run_dir or config.default_run_dir(), args)


def _run_storage(uri: str, endpoint_url: str | None) -> Any:
    return open_storage(uri, StorageSettings(endpoint_url=endpoint_url))


def _cmd_resume(args: argparse.Namespace) -> int:
    from pipeline.engine import read_run_config

    recorded = read_run_config(_run_storage(args.run, args.endpoint_url))
    config = recorded
    if args.overrides:
        raw = apply_overrides(recorded.to_dict(), args.overrides, source=args.run)
        config = parse_config(raw, source=args.run)
    if args.endpoint_url:
        config.storage.endpoint_url = args.endpoint_url
    return _execute(_apply_runtime_flags(config, args), args.run, args)


def _cmd_status(args: argparse.Namespace) -> int:
    from pipeline.status import collect_status, format_table

    storage = _run_storage(args.run, args.endpoint_url)
    name, rows = collect_status(storage)
    goodput = _goodput_records(storage) if args.detail else {}
    if args.json:
        detail = {"goodput": {stage: g.model_dump() for stage, g in goodput.items()}} if args.detail else {}
        print(json.dumps({"run": name, "uri": args.run, "stages": [r.as_dict() for r in rows], **detail}, indent=2))
    else:
        print(f"run {name} ({args.run})")
        print(format_table(rows))
        if args.detail:
            from stages.train.goodput import goodput_table

            print("\nwhere the training stages' wall time went:")
            print(goodput_table(goodput) if goodput else "  (no finished training stage has a goodput record)")
    return 0


def _goodput_records(storage: Any) -> dict[str, Any]:
    from pipeline.status import stage_results
    from stages.records import TrainResult, parse_result

    records = {stage: parse_result(raw) for stage, raw in stage_results(storage, ("pretrain", "finetune")).items()}
    return {stage: r.goodput for stage, r in records.items() if isinstance(r, TrainResult) and r.goodput is not None}


def _cmd_gc(args: argparse.Namespace) -> int:
    from pipeline.gc import find_leftovers, format_leftovers, remove_leftovers
    from pipeline.status import format_bytes
    from stages.train.checkpoint import abandoned_checkpoint_folders

    run = _run_storage(args.run, args.endpoint_url)
    leftovers = find_leftovers(run, finders=[abandoned_checkpoint_folders])
    total = sum(item.size for item in leftovers)
    if args.json:
        print(json.dumps({"run": args.run, "removed": bool(args.yes and leftovers), "leftovers": [
            {"kind": i.kind, "path": i.path, "size": i.size, "detail": i.detail} for i in leftovers]}, indent=2))
    elif not leftovers:
        print(f"{args.run}: nothing to collect")
    else:
        print(format_leftovers(leftovers))
    if leftovers and args.yes:
        remove_leftovers(run, leftovers)
        if not args.json:
            print(f"removed {len(leftovers)} leftover(s), {format_bytes(total)}")
    elif leftovers and not args.json:
        print(f"{len(leftovers)} leftover(s), {format_bytes(total)}; `vitpipe gc {args.run} --yes` removes them")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    n = len(config.stages)
    print(f"{args.config}: ok ({n} stage{'s' if n != 1 else ''}: {', '.join(config.stages)})")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from pipeline import registry

    checks = (("--nodes", args.nodes, args.nodes >= 1, "at least 1"),
              ("--gpus-per-node", args.gpus_per_node, args.gpus_per_node >= 1, "at least 1"),
              ("--mfu", args.mfu, 0 < args.mfu <= 1, "in (0, 1]"),
              ("--decode-rate", args.decode_rate, args.decode_rate is None or args.decode_rate > 0, "positive"),
              ("--num-classes", args.num_classes, args.num_classes is None or args.num_classes >= 1, "at least 1"))
    for flag, value, ok, expected in checks:
        if not ok:
            raise VitpipeError(f"{flag} must be {expected}, got {value}")
    config = load_config(args.config, args.overrides)
    registry.load_plugins(config.plugins, source=args.config)  # planners live in the stage modules
    options = registry.PlanOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu=args.gpu, mfu=args.mfu,
                                   decode_rate=args.decode_rate, num_classes=args.num_classes)
    planned: dict[str, tuple[registry.Planner, dict[str, Any]]] = {}
    errors: dict[str, str] = {}  # a stage that cannot be planned (e.g. a bad override) does not hide the others
    for name, spec in config.stages.items():
        planner = registry.find_planner(spec.type)
        if planner is not None:
            try:
                planned[name] = (planner, planner.plan(config, name, options))
            except VitpipeError as err:
                errors[name] = str(err)
    skipped = [name for name in config.stages if name not in planned and name not in errors]
    if not planned:
        if errors:
            raise VitpipeError(next(iter(errors.values())))
        raise VitpipeError(f"{args.config}: no stage has a capacity model (stage types with one: "
                           f"{', '.join(registry.planner_types()) or 'none'})")
    if args.json:
        print(json.dumps({"config": args.config, "nodes": args.nodes, "gpus_per_node": args.gpus_per_node,
                          "stages": {name: plan for name, (_, plan) in planned.items()}, "not_planned": skipped,
                          "errors": errors}, indent=2))
    else:
        print("\n\n".join(planner.render(plan) for planner, plan in planned.values()))
        for name, error in errors.items():
            print(f"\n{name}: cannot plan: {error}")
        if skipped:
            print(f"\nnot planned (no capacity model): {', '.join(skipped)}")
    return 0


def _dashboard(args: argparse.Namespace) -> str:
    return args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_DASHBOARD


def _cmd_submit(args: argparse.Namespace) -> int:
    from cluster import jobs

    config = load_config(args.config, args.overrides)
    job_id = jobs.submit_pipeline(_dashboard(args), config, run_dir=args.run_dir, extra_env=args.env)
    print(job_id)
    if args.wait:
        return jobs.follow_logs(_dashboard(args), job_id)
    return 0


def _cmd_jobs(args: argparse.Namespace) -> int:
    from cluster import jobs

    listed = jobs.list_pipeline_jobs(_dashboard(args))
    if args.json:
        print(json.dumps(listed, indent=2))
    else:
        print(jobs.format_jobs(listed))
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    from cluster import jobs

    if args.follow:
        return jobs.follow_logs(_dashboard(args), args.job_id)
    sys.stdout.write(jobs.job_logs(_dashboard(args), args.job_id))
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    from cluster import jobs

    stopped = jobs.stop_job(_dashboard(args), args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'not running'}")
    return 0


COMMANDS = {
    "run": _cmd_run,
    "resume": _cmd_resume,
    "status": _cmd_status,
    "gc": _cmd_gc,
    "validate": _cmd_validate,
    "plan": _cmd_plan,
    "submit": _cmd_submit,
    "jobs": _cmd_jobs,
    "logs": _cmd_logs,
    "stop": _cmd_stop,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (`run cfg.yaml --run-dir x a.b=1`); argparse stops
    # collecting a positional list at the first option, so gather the stragglers here.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    _setup_logging(args.verbose, args.quiet)
    try:
        return COMMANDS[args.command](args)
    except VitpipeError as err:
        print(f"vitpipe: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("vitpipe: interrupted; `vitpipe resume` continues where this stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
