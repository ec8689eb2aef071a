"""`kd-ray run | prepare | cache | eval | validate | report`: the command line. User mistakes exit 2 with one line."""

from __future__ import annotations

import argparse
import json
import os
import sys

from kd_ray.core import storage
from kd_ray.core.errors import Failed, UserError


class _Parser(argparse.ArgumentParser):
    """A command-line mistake is one line, like every other (argparse prints its usage first)."""

    def error(self, message: str):
        if "required: job" in message:
            message = f"job file: missing; give the path of a YAML job file, e.g. {self.prog} jobs/quickstart.yaml"
        self.exit(2, f"kd-ray: error: {message}; see {self.prog} --help\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kd-ray", description="Knowledge distillation on Ray, from one YAML job file.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run a job (train a student, with or without a teacher)")
    run.add_argument("job", help="path of the YAML job file")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3")
    run.add_argument("--fresh", action="store_true", help="start over: move an unfinished run of the same name aside instead of resuming it")
    run.add_argument("--verbose", action="store_true", help="also print the logs of Ray's workers and actors, and Ray's own "
                     "warnings and log lines (otherwise kept in Ray's session logs)")
    pr = sub.add_parser("prepare", help="tokenize, cut and pack a language model's data into token shards at data.prepared, "
                        "once (a run does it when they are missing); resumable, and rewrites a damaged shard")
    pr.add_argument("job")
    pr.add_argument("overrides", nargs="*")
    pr.add_argument("--verbose", action="store_true", help="also print the logs of Ray's workers")
    ca = sub.add_parser("cache", help="run the job's teacher once over its data and write its outputs to teacher.cache.path "
                        "(resumable: run it again after an interruption)")
    ca.add_argument("job")
    ca.add_argument("overrides", nargs="*")
    ca.add_argument("--verbose", action="store_true", help="also print the logs of Ray's workers and actors")
    ev = sub.add_parser("eval", help="evaluate an exported student on a job's eval split")
    ev.add_argument("job")
    ev.add_argument("overrides", nargs="*")
    ev.add_argument("--weights", help="student weights (default: RUN_DIR/student.safetensors)")
    rep = sub.add_parser("report", help="draw a run's figures (RUN_DIR/report.png), or one picture comparing several runs")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rep.add_argument("--out", help="where the comparison goes (default: compare_A_vs_B.png beside the first run)")
    val = sub.add_parser("validate", help="check a job file and exit")
    val.add_argument("job")
    val.add_argument("overrides", nargs="*")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        return _dispatch(args)
    except UserError as e:
        print(f"kd-ray: error: {e.line()}", file=sys.stderr)
        return e.exit_code
    except Failed as e:
        print(f"kd-ray: {e.what} failed: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("kd-ray: interrupted", file=sys.stderr)
        return 130


def _parse(argv: list[str] | None):
    """The arguments, overrides given after a flag too (`run job.yaml --fresh train.epochs=3`):
    argparse stops a positional list at the first flag, and would call the rest unrecognized."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def _dispatch(args) -> int:
    from kd_ray.checks import load_job

    if args.command == "report":
        return _report(args.run_dirs, args.out)

    spec = load_job(args.job, args.overrides)
    if args.command == "validate":
        print(f"{args.job}: valid")
        return 0
    if args.command == "prepare":
        from kd_ray.job import prepare_data

        prepare_data(spec, verbose=args.verbose)
        return 0
    if args.command == "cache":
        from kd_ray.cache.capture import capture
        from kd_ray.run.console import say

        capture(spec, echo=say, verbose=args.verbose)
        return 0
    if args.command == "eval":
        from kd_ray.evaluate import evaluate_student

        metrics = evaluate_student(spec, args.weights)
        print(json.dumps(metrics, indent=2))
        return 0
    from kd_ray.job import RunStopped, run
    from kd_ray.run.console import print_summary

    try:
        summary = run(spec, fresh=args.fresh, verbose=args.verbose)
    except RunStopped as e:
        print(f"kd-ray: {e}", file=sys.stderr)
        return e.exit_code
    print_summary(summary)
    return 0 if summary["status"] == "finished" else 1


def _report(run_dirs: list[str], out: str | None) -> int:
    from kd_ray.run import report

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("report", report.NO_MATPLOTLIB.removeprefix("no picture of the run: ")) from None
    for d in run_dirs:  # a directory, or a run's URI on object storage
        if storage.is_remote(d):
            storage.check_reachable(d, "report")
        metrics = storage.join(d, "metrics.jsonl")
        if not storage.exists(metrics) or storage.is_dir(metrics):
            raise UserError("report", f"{d} has no metrics.jsonl: give the directory of a kd_ray run (run.storage_path/run.name)")
    if out is not None:
        _check_out(out)
    print(report.draw(run_dirs, out))
    return 0


def _check_out(out: str) -> None:
    """Where the picture goes: a file whose directory exists or can be made, before any drawing."""
    if storage.is_remote(out):
        storage.check_reachable(out, "--out", write=True)
        return
    if os.path.isdir(out):
        raise UserError("--out", f"{out} is a directory; give the picture's file name, e.g. {os.path.join(out, 'compare.png')}")
    storage.need_writable_dir(os.path.dirname(os.path.abspath(out)), "--out")
