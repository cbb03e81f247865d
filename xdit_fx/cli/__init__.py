"""`xdit-fx`: demo | generate | calibrate-cache | plan | calibrate-hardware | run | serve | coverage | passes | dump | diff (the last three live in
dump_cli.py)."""

from __future__ import annotations

import argparse
import sys

from xdit_fx.cli.dump import add_subcommands
from xdit_fx.errors import XditFxError
from xdit_fx.plan import Plan


def _cmd_demo(args: argparse.Namespace) -> int:
    from xdit_fx.cli.demo import demo_worker, format_report
    from xdit_fx.runtime.launch import launch

    plans = args.plan or (["cfg=2", f"ulysses={args.nproc}"] if args.nproc == 2 else [f"ulysses={args.nproc}"])
    for text in plans:
        Plan.from_string(text).check_world_size(args.nproc)
    results = launch(demo_worker, args.nproc, (plans, args.output))
    print(format_report(results[0], args.nproc))
    worst = max((p["max_abs_err"] for p in results[0]["plans"]), default=0.0)
    return 0 if worst < 1e-4 else 1


def _cmd_generate(args: argparse.Namespace) -> int:
    from xdit_fx.cli.generate import run

    return run(args)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from xdit_fx.cli.calibrate import run

    return run(args)


def _cmd_plan(args: argparse.Namespace) -> int:
    from xdit_fx.cli.plan import run

    return run(args)


def _cmd_calibrate_hardware(args: argparse.Namespace) -> int:
    from xdit_fx.cli.calibrate_hardware import run

    return run(args)


def _cmd_run(args: argparse.Namespace) -> int:
    from xdit_fx.runtime.launch import run_script

    return run_script(args.script, args.nproc, args.script_args)


def _cmd_serve(args: argparse.Namespace) -> int:
    from xdit_fx.serve.cli import run

    return run(args)


def _cmd_coverage(args: argparse.Namespace) -> int:
    from xdit_fx.cli.coverage import main as coverage_main

    return coverage_main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xdit-fx", description="Parallel inference for Diffusion Transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the embedded digits model, serial vs parallel on local processes: "
                                    "parity, time, digit accuracy, demo.png")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--plan", action="append", help="plan string, repeatable (default: cfg=2 and ulysses=2)")
    p.add_argument("--output", default="demo.png")
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser("generate", help="generate images with a pipeline folder or the embedded digits model, "
                                        "in parallel (xDiT-style flags)")
    from xdit_fx.cli.generate import add_arguments
    add_arguments(p)
    p.set_defaults(fn=_cmd_generate)

    p = sub.add_parser("calibrate-cache", help="fit TeaCache's rescaling coefficients on a model from a few "
                                               "generations; writes a JSON file generate --cache_coefficients reads")
    from xdit_fx.cli.calibrate import add_arguments as _calibrate_arguments
    _calibrate_arguments(p)
    p.set_defaults(fn=_cmd_calibrate)

    p = sub.add_parser("plan", help="rank the plans a model allows on N ranks by predicted time per step "
                                    "(cost model over the captured graph; no weights needed)")
    from xdit_fx.cli.plan import add_arguments as _plan_arguments
    _plan_arguments(p)
    p.set_defaults(fn=_cmd_plan)

    p = sub.add_parser("calibrate-hardware", help="measure this machine's GEMM / attention / memory rates and "
                                                  "collective bandwidth; write a hardware profile (JSON)")
    from xdit_fx.cli.calibrate_hardware import add_arguments as _hw_arguments
    _hw_arguments(p)
    p.set_defaults(fn=_cmd_calibrate_hardware)

    p = sub.add_parser("run", help="run a script on N local processes (torchrun's launcher)")
    p.add_argument("--nproc", type=int, required=True)
    p.add_argument("script")
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    p.set_defaults(fn=_cmd_run)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP service (images, batched) over N ranks; "
                                     "the embedded digits model unless --model DIR")
    from xdit_fx.serve.cli import add_arguments as _serve_arguments

    _serve_arguments(p)
    p.set_defaults(fn=_cmd_serve)

    add_subcommands(sub)  # passes, dump, diff

    p = sub.add_parser("coverage", help="run zoo models (or yours) under sequence-parallel plans; write COVERAGE.md")
    from xdit_fx.cli.coverage import add_arguments as _coverage_arguments

    _coverage_arguments(p)
    p.set_defaults(fn=_cmd_coverage)

    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except XditFxError as e:  # a user error: the message says what to change; no traceback
        print(f"xdit-fx {args.command}: error: {e}", file=sys.stderr)
        return 2

