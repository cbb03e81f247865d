"""`xdit-fx plan MODEL --world-size N`: the plans the model allows, ranked by the cost model's prediction.

MODEL is what `xdit-fx dump` takes (a zoo name, a diffusers model or pipeline folder built on the meta
device, package.module:Class with --config). Prints the ranked candidates (time per step, memory per rank,
bytes per mesh axis and the link it crosses, the bottleneck), one sentence on why the winner wins, and the
factorizations the model refuses with the reason.
"""

from __future__ import annotations

import argparse
import json
import os

from xdit_fx.errors import XditFxError


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


def folder_guidance(path: str) -> str:
    """none | batched from a pipeline folder's model_index.json (the pipeline class's call signature)."""
    index = os.path.join(path, "model_index.json")
    if not os.path.exists(index):
        return "none"
    import diffusers

    from xdit_fx.debug.planning import pipeline_guidance

    cls = getattr(diffusers, json.load(open(index)).get("_class_name", ""), None)
    return pipeline_guidance(cls) if cls is not None else "none"


def folder_vae_bytes(path: str, sizes, dtype_bytes: int) -> float:
    cfg_path = os.path.join(path, "vae", "config.json")
    if not os.path.exists(cfg_path):
        return 0.0
    channels = (json.load(open(cfg_path)).get("block_out_channels") or [0])[0]
    return 3.0 * channels * sizes.height * sizes.width * max(1, sizes.frames) * sizes.batch * dtype_bytes


def prediction_dict(p) -> dict:
    return {"plan": p.plan.to_string(), "per_step_s": p.per_step_s, "step_s": p.step_s, "warmup_s": p.warmup_s,
            "parts": p.parts, "memory": p.memory, "bytes": p.bytes, "links": p.links, "fits": p.fits,
            "bottleneck": p.bottleneck}


def plan_report(args: argparse.Namespace):
    """(ranked predictions, rejected, facts, hardware) for the command's arguments."""
    from xdit_fx.compiler.hardware import load_profile
    from xdit_fx.compiler.plan_cost import Workload
    from xdit_fx.compiler.plan_facts import model_facts
    from xdit_fx.compiler.plan_search import rank_plans
    from xdit_fx.debug.model import InputSizes, load_model

    if args.world_size < 1:
        raise XditFxError(f"--world-size {args.world_size}: need at least 1")
    hw = load_profile(args.hardware).with_nodes(args.nodes, args.world_size)
    guidance = args.guidance or (folder_guidance(args.model) if os.path.isdir(args.model) else "none")
    sizes = InputSizes(height=args.height, width=args.width, frames=args.frames, text_len=args.text_len,
                       batch=args.batch * (2 if guidance == "batched" else 1))
    loaded = load_model(args.model, config=args.config, dtype=args.dtype, device="meta", sizes=sizes,
                        overrides=args.input)
    facts = model_facts(loaded.model, loaded.inputs, loaded.description)
    vae = folder_vae_bytes(args.model, sizes, facts.dtype_bytes) if os.path.isdir(args.model) else 0.0
    work = Workload(guidance=guidance, steps=args.steps, vae_bytes=vae)
    preds, rejected = rank_plans(facts, args.world_size, hw, work)
    return preds, rejected, facts, hw, work


def run(args: argparse.Namespace) -> int:
    from xdit_fx.compiler.plan_search import GIB, explain, format_table

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


def auto_for_model(model: str | None, world_size: int, *, hardware: str | None = None, height: int | None = None,
                   width: int | None = None, frames: int | None = None, images: int = 1, steps: int = 20):
    """The cost model's choice for a pipeline folder (or the digits model: None), as `--plan auto` of
    `generate` and `serve` resolves it before any process starts: a Prediction. The folder is read on the meta
    device; guidance comes from the pipeline class's call signature (digits: batched)."""
    from xdit_fx.compiler.plan_search import choose_plan
    from xdit_fx.plan import Plan

    if world_size == 1:
        return None, Plan()
    args = argparse.Namespace(model=model, world_size=world_size, nodes=1, frames=frames or 1, text_len=512,
                              batch=images, guidance=None, steps=steps, dtype=None, config=None, input=[],
                              hardware=hardware or _default_hardware(), height=height or 1024, width=width or 1024)
    if model is None:  # the digits model: no VAE, its 16x16 latent is the image (derive_inputs divides by 8)
        from xdit_fx.digits import pipeline as digits_pipeline

        args.model = os.path.join(os.path.dirname(digits_pipeline.__file__), "checkpoint")
        args.height = args.width = 16 * 8
        args.guidance, args.dtype = "batched", "float32"
    preds, rejected, facts, hw, work = plan_report(args)
    best = choose_plan(facts, world_size, hw, work)
    return preds, best.plan


def _default_hardware() -> str:
    import torch

    return "h100-nvlink" if torch.cuda.is_available() else "cpu-gloo"


def resolve_auto(model: str | None, world_size: int | None, **kw) -> str:
    """`--plan auto` for a command: the chosen plan's string; prints the ranking's head and the reason."""
    from xdit_fx.compiler.plan_search import explain

    if world_size is None:
        raise XditFxError("--plan auto needs --nproc N (the ranks to plan for)")
    preds, plan = auto_for_model(model, world_size, **kw)
    if preds:
        print(f"--plan auto: {plan.to_string()} on {world_size} ranks. {explain(preds)}", flush=True)
    return plan.to_string()
