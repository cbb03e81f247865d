"""`xdit-fx generate`: run a diffusers pipeline (a local folder) or the embedded digits model over N ranks.

The flags follow xDiT's (``--ulysses_degree``, ``--ring_degree``, ``--use_cfg_parallel``,
``--data_parallel_degree``, ...), so commands carry over. With ``--nproc N`` the command launches N local
processes itself (torchrun's launcher); under ``torchrun`` it joins the running job instead.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch

from .errors import PlanError, XditFxError
from .plan import Plan

DIGITS = "digits"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DIGITS,
                   help="a local diffusers pipeline folder, or 'digits' (the embedded model; default)")
    p.add_argument("--prompt", action="append",
                   help="prompt, repeatable; for 'digits': digits such as '3' or '0,1,2' (default: all ten)")
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--ulysses_degree", type=int, default=1)
    p.add_argument("--ring_degree", type=int, default=1)
    p.add_argument("--pipefusion_parallel_degree", type=int, default=1,
                   help="PipeFusion: pipeline stages over the block stack (cost-balanced)")
    p.add_argument("--num_pipeline_patch", type=int, default=None,
                   help="PipeFusion: patches the token sequence is split into (default: one per stage)")
    p.add_argument("--warmup_steps", type=int, default=1,
                   help="PipeFusion: denoising steps that run the whole sequence synchronously (exact) before "
                        "patches use stale K/V")
    p.add_argument("--use_cfg_parallel", action="store_true", help="split the two CFG branches over 2 ranks")
    p.add_argument("--data_parallel_degree", type=int, default=1)
    p.add_argument("--no_parallel_vae", action="store_true", help="decode the VAE on every rank whole")
    p.add_argument("--use_torch_compile", action="store_true", help="compile the parallel graph with Inductor")
    p.add_argument("--cache", choices=["fbc", "teacache"], default=None,
                   help="skip the block stack on steps where it changes little: First-Block-Cache or TeaCache")
    p.add_argument("--cache_threshold", type=float, default=None,
                   help="skip threshold (default: 0.08 for fbc, 0.2 for teacache; 0 never skips)")
    p.add_argument("--cache_coefficients", default=None,
                   help="TeaCache rescaling coefficients: a JSON file written by `xdit-fx calibrate-cache`")
    p.add_argument("--cache_warmup_steps", type=int, default=1, help="steps that always run the whole stack")
    p.add_argument("--num_inference_steps", type=int, default=None)
    p.add_argument("--guidance_scale", type=float, default=None)
    p.add_argument("--num_images_per_prompt", type=int, default=1)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--warmup", action="store_true",
                   help="run once before the timed run (the first run includes graph capture)")
    p.add_argument("--output", default="output.png", help="image path (several images: a grid, or NAME_i.png)")
    p.add_argument("--nproc", type=int, default=None, help="launch this many local processes (default: the plan's)")


def plan_from_args(args: argparse.Namespace) -> Plan:
    return Plan(ulysses_degree=args.ulysses_degree, ring_degree=args.ring_degree,
                pipefusion_degree=args.pipefusion_parallel_degree, cfg_degree=2 if args.use_cfg_parallel else 1,
                pipefusion_patches=args.num_pipeline_patch or 0, pipefusion_warmup_steps=args.warmup_steps,
                dp_degree=args.data_parallel_degree, compile=args.use_torch_compile,
                parallel_vae=not args.no_parallel_vae, cache=cache_from_args(args))


def cache_from_args(args: argparse.Namespace):
    from .cache import FirstBlockCache, TeaCache, load_coefficients

    kind = getattr(args, "cache", None)
    if kind is None:
        if getattr(args, "cache_threshold", None) is not None or getattr(args, "cache_coefficients", None):
            raise PlanError("--cache_threshold / --cache_coefficients need --cache fbc or --cache teacache")
        return None
    fields: dict[str, Any] = {"warmup_steps": args.cache_warmup_steps}
    if args.cache_threshold is not None:
        fields["threshold"] = args.cache_threshold
    if args.cache_coefficients:
        if kind != "teacache":
            raise PlanError("--cache_coefficients are TeaCache's; use --cache teacache")
        try:
            fields["coefficients"] = load_coefficients(args.cache_coefficients)
        except (OSError, ValueError, KeyError) as e:
            raise PlanError(f"--cache_coefficients {args.cache_coefficients!r}: {e}; pass the JSON file "
                            "`xdit-fx calibrate-cache --out FILE` wrote.") from None
    return (FirstBlockCache if kind == "fbc" else TeaCache)(**fields)


def run(args: argparse.Namespace) -> int:
    """The CLI entry: validate everything that needs no process, then run here or launch N processes."""
    plan = plan_from_args(args)
    nproc = args.nproc if args.nproc is not None else plan.world_size
    plan.check_world_size(nproc)
    _check_model(args.model)
    options = vars(args).copy()
    options.pop("fn", None)
    _call_kwargs(options)  # bad prompts or sizes fail here, before any process starts
    if nproc > 1 and "RANK" not in os.environ:
        from .runtime.launch import launch
        report = launch(generate_worker, nproc, (options,))[0]
    else:
        report = generate_worker(options)
    print(format_report(report))
    return 0


def _check_model(model: str) -> None:
    if model == DIGITS:
        return
    path = Path(model)
    if not (path / "model_index.json").is_file():
        raise PlanError(f"--model {model!r}: not a diffusers pipeline folder (no model_index.json there). "
                        f"Pass a folder saved with save_pretrained, or '{DIGITS}'.")


def _load(model: str):
    if model == DIGITS:
        from .digits import load_pipeline
        return load_pipeline()
    from diffusers import DiffusionPipeline
    return DiffusionPipeline.from_pretrained(model)


def _call_kwargs(opts: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for key in ("num_inference_steps", "guidance_scale", "height", "width"):
        if opts[key] is not None:
            kwargs[key] = opts[key]
    if opts["model"] == DIGITS:
        if opts["height"] is not None or opts["width"] is not None:
            raise PlanError("the digits model makes 16x16 images; drop --height/--width")
        kwargs.pop("height", None), kwargs.pop("width", None)
        kwargs["class_labels"] = digit_labels(opts["prompt"]) * opts["num_images_per_prompt"]
        return kwargs
    kwargs["prompt"] = opts["prompt"] or ["a photo of a cat"]
    if opts["negative_prompt"] is not None:
        kwargs["negative_prompt"] = opts["negative_prompt"]
    kwargs["num_images_per_prompt"] = opts["num_images_per_prompt"]
    return kwargs


def digit_labels(prompts: list[str] | None) -> list[int]:
    if not prompts:
        return list(range(10))
    labels = []
    for text in prompts:
        for part in filter(None, (p.strip() for p in text.split(","))):
            if not (part.isdigit() and len(part) == 1):
                raise PlanError(f"--prompt {text!r}: the digits model takes digits 0-9, e.g. --prompt 3 or '0,1,2'")
            labels.append(int(part))
    return labels


def generate_worker(opts: dict[str, Any]) -> dict[str, Any]:
    """Runs on every rank: load, parallelize, generate (timed); rank 0 saves the images."""
    import xdit_fx

    plan = plan_from_args(argparse.Namespace(**opts))
    world = plan.world_size
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    pipe = _load(opts["model"])
    kwargs = _call_kwargs(opts)
    parallel = world > 1 or plan.cache is not None
    if parallel:
        pipe = xdit_fx.parallelize(pipe, plan)
    rank = pipe.rank if parallel else 0
    if rank != 0 and hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)

    def generate():
        t0 = time.perf_counter()
        with torch.no_grad():
            out = pipe(**kwargs, generator=torch.Generator().manual_seed(opts["seed"]), output_type="pil")
        return out, time.perf_counter() - t0

    first_s = None
    if opts["warmup"]:
        _, first_s = generate()
    out, seconds = generate()
    report = {"plan": plan.to_string(), "world_size": world, "seconds": seconds, "first_run_s": first_s,
              "model": opts["model"]}
    if rank == 0:
        report["outputs"] = save_images(out, opts["output"], opts["model"] == DIGITS)
        if plan.cache is not None:
            stats = pipe.cache_stats
            report["cache"] = stats.summary() if hasattr(stats, "summary") else \
                "; ".join(f"{name}: {s.summary()}" for name, s in stats.items())
    return report


def save_images(out, output: str, grid: bool) -> list[str]:
    images = getattr(out, "images", None)
    if images is None:
        images = getattr(out, "frames", None)
        if images is None:
            raise XditFxError(f"the pipeline returned {type(out).__name__} with neither .images nor .frames")
        images = images[0]  # video: the frames of the first video
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(images) == 1:
        images[0].save(path)
        return [str(path)]
    if grid:
        from .digits import make_grid
        import numpy as np
        batch = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)[None] for im in images])
        make_grid(batch, nrow=min(10, len(images))).save(path)
        return [str(path)]
    paths = []
    for i, image in enumerate(images):
        p = path.with_name(f"{path.stem}_{i}{path.suffix}")
        image.save(p)
        paths.append(str(p))
    return paths


def format_report(report: dict[str, Any]) -> str:
    lines = [f"xdit-fx generate: {report['model']}, plan {report['plan']} on {report['world_size']} process(es)"]
    if report.get("first_run_s") is not None:
        lines.append(f"  first run (graph capture included): {report['first_run_s']:.2f} s")
    lines.append(f"  generation: {report['seconds']:.2f} s")
    if report.get("cache"):
        lines.append(f"  {report['cache']}")
    lines.append(f"  saved: {', '.join(report.get('outputs', []))}")
    return "\n".join(lines)

