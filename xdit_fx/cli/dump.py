"""The debugging subcommands of `xdit-fx`: passes | dump | diff. `cli.py` registers them with `add_subcommands`."""

from __future__ import annotations

import argparse
import sys
import time

from xdit_fx.errors import XditFxError

FORMATS = ("text", "html")


def add_subcommands(sub) -> None:
    """Register `passes`, `dump` and `diff` on an argparse subparsers object."""
    p = sub.add_parser("passes", help="list the passes a plan runs, in order, with what they read and write")
    p.add_argument("--plan", default="ulysses=2", help="plan string, e.g. ulysses=2,ring=2 or ulysses=2,cfg=2")
    p.set_defaults(fn=cmd_passes)

    p = sub.add_parser(
        "dump", help="write what every pass does to a model's graph (no GPU, no weights)",
        description="Capture MODEL's forward, run the passes of --plan and write one annotated text file per "
                    "pass, a diff per rewriting pass, index.md and plan.json (and index.html with --format html). "
                    "MODEL: a zoo name (e.g. flux, scratch_dit), a diffusers model folder with config.json "
                    "(built on the meta device: no weights needed), or package.module:Class with --config.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--plan", default="ulysses=2", help="plan string (default ulysses=2), or 'auto' with "
                                                       "--world-size: the cost model's choice, written to "
                                                       "plan_choice.md beside the dump")
    p.add_argument("--world-size", type=int, default=None, help="with --plan auto: the ranks to plan for")
    p.add_argument("--hardware", default="cpu-gloo", help="with --plan auto: the hardware profile (see xdit-fx plan)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--format", default="text", help="text, html or text,html (html implies text)")
    p.add_argument("--config", help="JSON file or JSON object for package.module:Class")
    p.add_argument("--dtype", help="parameter and input dtype (default: bfloat16 on meta, float32 on cpu)")
    p.add_argument("--device", choices=("meta", "cpu"),
                   help="where to build the model (default: meta for folders and classes, cpu for the zoo)")
    p.add_argument("--height", type=int, default=1024, help="image height in pixels (default 1024)")
    p.add_argument("--width", type=int, default=1024, help="image width in pixels (default 1024)")
    p.add_argument("--frames", type=int, default=1, help="video frames in pixels-space (default 1)")
    p.add_argument("--text-len", type=int, default=512, help="text tokens (default 512)")
    p.add_argument("--batch", type=int, default=1, help="batch per rank (default 1)")
    p.add_argument("--input", action="append", default=[], metavar="NAME=SHAPE[:DTYPE]",
                   help="override or add a tensor input, e.g. hidden_states=1,4096,64:bfloat16 (repeatable)")
    p.set_defaults(fn=cmd_dump)

    p = sub.add_parser("diff", help="compare two dumps pass by pass (exit 0: same, 1: different)")
    p.add_argument("a", metavar="DIR_A")
    p.add_argument("b", metavar="DIR_B")
    p.add_argument("--max-nodes", type=int, default=20, help="nodes listed per pass and kind (default 20)")
    p.set_defaults(fn=cmd_diff)


def _formats(text: str) -> tuple[str, ...]:
    formats = tuple(f.strip() for f in text.split(",") if f.strip())
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise XditFxError(f"--format {text!r}: use text, html or text,html")
    return ("text",) + tuple(f for f in formats if f != "text")


def cmd_passes(args: argparse.Namespace) -> int:
    from xdit_fx.debug.model import outside_graph_note, parse_tool_plan
    from xdit_fx.errors import PlanError
    from xdit_fx.compiler.passes import build_pipeline
    from xdit_fx.plan import AXES, Plan, _SHORT_NAMES

    tp = parse_tool_plan(args.plan)
    plan = tp.graph
    passes = build_pipeline(plan)
    serial = {p.info.name for p in build_pipeline(Plan())}
    writers: dict[str, str] = {}
    print(f"# passes for plan {tp_string(tp)} (world size {tp.world_size})")
    for i, p in enumerate(passes, start=1):
        info = p.info
        kind = "rewrite" if info.mutates_graph else "analysis"
        print(f"{i}. {info.name} [{kind}] reads {sorted(info.reads) or '-'} writes {sorted(info.writes) or '-'}")
        print(f"   {info.doc}")
        why = []
        if info.name in serial:
            why.append("runs for every plan")
        else:
            axes = []
            for axis in AXES:
                degree = plan.degree(axis)
                if degree <= 1:
                    continue
                try:
                    alone = Plan(**{_SHORT_NAMES[axis]: degree})
                except PlanError:
                    continue
                if info.name in {q.info.name for q in build_pipeline(alone)}:
                    axes.append(f"{axis}={degree}")
            why.append(f"runs because of {' or '.join(axes)}" if axes else "runs for this combination of axes")
        needs = [f"{fact} from {writers[fact]}" for fact in sorted(info.reads) if fact in writers]
        if needs:
            why.append("needs " + ", ".join(needs))
        print(f"   why: {'; '.join(why)}")
        for fact in info.writes:
            writers.setdefault(fact, info.name)
    note = outside_graph_note(tp)
    if note:
        print(f"# {note}.")
    return 0


def tp_string(tp) -> str:
    from xdit_fx.debug.format import plan_string
    return plan_string(tp.requested)


def cmd_dump(args: argparse.Namespace) -> int:
    from xdit_fx.debug.dump import dump_module
    from xdit_fx.debug.model import InputSizes, load_model, parse_tool_plan

    formats = _formats(args.format)
    choice = _auto_choice(args) if args.plan.strip().lower() == "auto" else None
    tp = parse_tool_plan(args.plan)  # plan errors before any model is built
    sizes = InputSizes(height=args.height, width=args.width, frames=args.frames, text_len=args.text_len,
                       batch=args.batch)
    t0 = time.perf_counter()
    loaded = load_model(args.model, config=args.config, dtype=args.dtype, device=args.device, sizes=sizes,
                        overrides=args.input)
    build_s = time.perf_counter() - t0
    res = dump_module(loaded.model, loaded.inputs, tp, args.out, formats=formats, model_name=loaded.description,
                      notes=loaded.notes)
    total = time.perf_counter() - t0
    if choice is not None:
        import os

        with open(os.path.join(args.out, "plan_choice.md"), "w") as f:
            f.write(choice)
        print(f"xdit-fx dump: --plan auto chose {args.plan} -> {args.out}/plan_choice.md")
    graphs = f"{res.graphs} graph{'s' if res.graphs != 1 else ''}"
    print(f"xdit-fx dump: {loaded.description} under {tp_string(tp)}: {graphs} -> {args.out}/index.md"
          + (f" and {args.out}/index.html" if "html" in formats and res.graphs == 1 else ""))
    for h in res.histories:
        for s in h.snapshots[1:]:
            print(f"  {s.index}. {s.name:<24} {'changed' if s.changed else '       '}  {s.summary}")
    print(f"  time: build {build_s:.1f}s, capture {res.capture_s:.1f}s, passes {res.passes_s:.1f}s, total {total:.1f}s")
    return 0


def _auto_choice(args: argparse.Namespace) -> str:
    """Resolve --plan auto (sets args.plan) and return the plan_choice.md text: the ranking and the reason."""
    from xdit_fx.debug.planning import plan_report
    from xdit_fx.compiler.plan_search import choose_plan, explain, format_table

    if args.world_size is None:
        raise XditFxError("--plan auto needs --world-size N")
    ns = argparse.Namespace(**{**vars(args), "nodes": 1, "guidance": None, "steps": 20})
    preds, rejected, facts, hw, work = plan_report(ns)
    best = choose_plan(facts, args.world_size, hw, work)
    args.plan = best.plan.to_string()
    refused = "".join(f"- {r.plan}: {r.reason}\n" for r in rejected)
    return (f"# Plan choice: {args.plan}\n\n{facts.description}, {args.world_size} ranks, hardware {hw.name}; "
            f"predicted {best.per_step_s * 1e3:.4g} ms per step, {best.memory['total'] / 2 ** 30:.3g} GiB per "
            f"rank.\n\n{explain(preds)}\n\n{format_table(preds)}\n\nRefused:\n{refused}")


def cmd_diff(args: argparse.Namespace) -> int:
    from xdit_fx.debug.diff import diff_dumps

    text, same = diff_dumps(args.a, args.b, max_nodes=args.max_nodes)
    sys.stdout.write(text)
    return 0 if same else 1
