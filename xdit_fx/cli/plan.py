"""`xdit-fx plan MODEL --world-size N`: the plans the model allows, ranked by the cost model's prediction.

MODEL is what `xdit-fx dump` takes (a zoo name, a diffusers model or pipeline folder built on the meta
device, package.module:Class with --config). Prints the ranked candidates (time per step, memory per rank,
bytes per mesh axis and the link it crosses, the bottleneck), one sentence on why the winner wins, and the
factorizations the model refuses with the reason.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--world-size", type=int, required=True, help="ranks to plan for")
    p.add_argument("--hardware", default="cpu-gloo", help="profile name (cpu-gloo, h100-nvlink, h100-pcie, h200, "
                                                          "l40, b200, a100-nvlink) or a JSON file from "
                                                          "calibrate-hardware (default cpu-gloo)")
    p.add_argument("--nodes", type=int, default=1, help="nodes the ranks are spread over (default 1)")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--frames", type=int, default=1)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    p.add_argument("--guidance", choices=("none", "batched", "two-call"),
                   help="classifier-free guidance (default: from a pipeline folder's call signature, else none)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    p.add_argument("--dtype", help="parameter dtype (default: bfloat16 on meta)")
    p.add_argument("--config", help="JSON file or object for package.module:Class")
    p.add_argument("--input", action="append", default=[], metavar="NAME=SHAPE[:DTYPE]")
    p.add_argument("--top", type=int, default=20, help="candidates shown (default 20)")
    p.add_argument("--json", metavar="FILE", help="also write every prediction as JSON")


def prediction_dict(p) -> dict:
    return {"plan": p.plan.to_string(), "per_step_s": p.per_step_s, "step_s": p.step_s, "warmup_s": p.warmup_s,
            "parts": p.parts, "memory": p.memory, "bytes": p.bytes, "links": p.links, "fits": p.fits,
            "bottleneck": p.bottleneck}


def run(args: argparse.Namespace) -> int:
    from xdit_fx.compiler.plan_search import GIB, explain, format_table
    from xdit_fx.debug.planning import plan_report

    preds, rejected, facts, hw, work = plan_report(args)
    print(f"xdit-fx plan: {facts.description}, {facts.tokens} tokens (segments {list(facts.segments)}), "
          f"batch {facts.batch} per call, guidance {work.guidance}, {facts.blocks} blocks, "
          f"{facts.param_bytes / GIB:.3g} GiB of weights; {args.world_size} ranks on {hw.name} "
          f"({hw.gpus_per_node} per node, {hw.memory / GIB:.3g} GiB each)")
    print(format_table(preds, args.top))
    if preds:
        print(explain(preds))
        if not preds[0].fits:
            print("no candidate fits in the device's memory")
    for r in rejected:
        print(f"  refused {r.plan}: {r.reason}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([prediction_dict(p) for p in preds], f, indent=1)
    return 0 if preds and preds[0].fits else 1
