"""`xdit-fx calibrate-cache`: fit TeaCache's rescaling polynomial on the model itself.

TeaCache decides from the change of the first block's modulated input, but what matters is the change of
the stack's output. How one maps to the other depends on the model, so it is measured: a few generations
run with every step computed (a TeaCache region at threshold 0 that records), and for each pair of
consecutive steps we keep x = relative L1 change of the modulated input and y = relative L1 change of the
stack's output. A polynomial y ≈ p(x) (numpy.polyfit, highest power first) is fitted and written, with the
plan that uses it, to a JSON file that `xdit-fx generate --cache teacache --cache_coefficients FILE` and
`load_coefficients` read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xdit_fx.cache_config import TeaCache
from xdit_fx.errors import PlanError
from xdit_fx.plan import Plan


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="digits", help="a local diffusers pipeline folder, or 'digits' (default)")
    p.add_argument("--prompt", action="append", help="prompts to calibrate on (pipeline folders), repeatable")
    p.add_argument("--generations", type=int, default=4, help="generations to record (different seeds)")
    p.add_argument("--num_inference_steps", type=int, default=None)
    p.add_argument("--degree", type=int, default=4, help="polynomial degree")
    p.add_argument("--threshold", type=float, default=0.2, help="threshold stored in the plan of the output file")
    p.add_argument("--out", default="teacache_coefficients.json")


def calibrate(pipe: Any, call_kwargs: list[dict[str, Any]], degree: int = 4) -> dict[str, Any]:
    """Record (input change, output change) pairs over the given pipeline calls and fit the polynomial."""
    import xdit_fx

    ppipe = xdit_fx.parallelize(pipe, Plan(cache=TeaCache(threshold=0.0)))
    try:
        caches = [pm.cache for pm in ppipe.denoisers.values()]
        for cache in caches:
            cache.calibrating = True
        for kwargs in call_kwargs:
            with torch.no_grad():
                ppipe(**kwargs)
        points = [(x, y) for cache in caches for _, x, y in cache.calibration]
    finally:
        ppipe.unwrap()
    if len(points) <= degree:
        raise PlanError(f"calibration recorded {len(points)} step pairs, too few for a degree-{degree} fit; "
                        "run more generations or steps, or lower --degree")
    x, y = np.array(points).T
    coeffs = np.polyfit(x, y, degree)
    fit = np.polyval(coeffs, x)
    r2 = 1.0 - float(np.sum((y - fit) ** 2)) / max(float(np.sum((y - y.mean()) ** 2)), 1e-30)
    return {"coefficients": [float(c) for c in coeffs], "points": len(points), "r2": r2,
            "input_change": [float(x.min()), float(x.max())], "output_change": [float(y.min()), float(y.max())]}


def run(args: argparse.Namespace) -> int:
    from xdit_fx.loading import DIGITS, load_pipeline, pipeline_index

    if args.model != DIGITS:
        pipeline_index(args.model)  # not a pipeline folder: one line before loading
    if args.generations < 1:
        raise PlanError("--generations must be >= 1")
    pipe = load_pipeline(args.model)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    calls = []
    for g in range(args.generations):
        kwargs: dict[str, Any] = {"generator": torch.Generator().manual_seed(1000 + g)}
        if args.num_inference_steps is not None:
            kwargs["num_inference_steps"] = args.num_inference_steps
        if args.model == DIGITS:
            kwargs["class_labels"] = list(range(10))
        else:
            prompts = args.prompt or ["a photo of a cat"]
            kwargs["prompt"] = prompts[g % len(prompts)]
        calls.append(kwargs)
    result = calibrate(pipe, calls, args.degree)
    plan = Plan(cache=TeaCache(threshold=args.threshold, coefficients=tuple(result["coefficients"])))
    result = {"model": args.model, **result, "plan": plan.to_dict()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"xdit-fx calibrate-cache: {args.model}, {result['points']} step pairs from {args.generations} "
          f"generation(s); fit R^2 = {result['r2']:.3f}\n  coefficients (highest power first): "
          f"{', '.join(f'{c:.4g}' for c in result['coefficients'])}\n  written to {args.out}; use it with "
          f"`xdit-fx generate --cache teacache --cache_threshold T --cache_coefficients {args.out}`")
    return 0
