"""`xdit-fx`: demo | run | passes | coverage."""

from __future__ import annotations

import argparse
import sys

from .errors import XditFxError


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import demo_worker, format_report
    from .runtime.launch import launch

    plans = args.plan or ([f"ulysses={args.nproc}", f"ring={args.nproc}"] if args.nproc > 1 else [])
    results = launch(demo_worker, args.nproc, (plans,))
    print(format_report(results[0], args.nproc))
    worst = max((p["max_abs_err"] for p in results[0]["plans"]), default=0.0)
    return 0 if worst < 1e-4 else 1


def _cmd_run(args: argparse.Namespace) -> int:
    from .runtime.launch import run_script

    run_script(args.script, args.nproc, args.script_args)
    return 0


def _cmd_passes(args: argparse.Namespace) -> int:
    from .passes import build_pipeline
    from .plan import Plan

    plan = Plan.from_string(args.plan)
    print(f"# passes for plan {plan.to_string()} (world size {plan.world_size})")
    for i, p in enumerate(build_pipeline(plan), start=1):
        info = p.info
        kind = "rewrite" if info.mutates_graph else "analysis"
        print(f"{i}. {info.name} [{kind}] reads {sorted(info.reads) or '-'} writes {sorted(info.writes) or '-'}")
        print(f"   {info.doc}")
    return 0


def _cmd_coverage(args: argparse.Namespace) -> int:
    from .coverage import main as coverage_main

    return coverage_main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xdit-fx", description="Parallel inference for Diffusion Transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="serial vs sequence-parallel Flux-architecture forward on local processes")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--plan", action="append", help="plan string, repeatable (default: ulysses=N and ring=N)")
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser("run", help="run a script on N local processes (torchrun's launcher)")
    p.add_argument("--nproc", type=int, required=True)
    p.add_argument("script")
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    p.set_defaults(fn=_cmd_run)

    p = sub.add_parser("passes", help="list the passes a plan runs, in order, with what they read and write")
    p.add_argument("--plan", default="ulysses=2")
    p.set_defaults(fn=_cmd_passes)

    p = sub.add_parser("coverage", help="run zoo models (or yours) under sequence-parallel plans; write COVERAGE.md")
    from .coverage import add_arguments as _coverage_arguments

    _coverage_arguments(p)
    p.set_defaults(fn=_cmd_coverage)

    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except XditFxError as e:  # a user error: the message says what to change; no traceback
        print(f"xdit-fx {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
