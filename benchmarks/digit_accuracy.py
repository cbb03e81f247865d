"""Digit accuracy of the embedded digits model (``xdit_fx.digits``) at its default sampler settings.

Run by hand (about a minute on 2 idle cores):

    .venv/bin/python benchmarks/digit_accuracy.py                         # 100 per class, default settings
    .venv/bin/python benchmarks/digit_accuracy.py --per-class 50 --guidance 1 1.5 2 3 4

For every guidance scale (``1`` = no CFG) it samples ``--per-class`` images of each digit with
``num_inference_steps`` Euler steps from one seeded generator, and reports the share that the scikit-learn
judge (``xdit_fx.digits.digit_classifier``, an SVC fitted on real digits, whose own held-out accuracy is
reported too) reads as the requested digit, overall and per digit. Writes ``digit_accuracy.json``
(raw numbers), ``digit_accuracy.md`` (summary) and ``digit_accuracy.png`` (one row per digit, default
settings) under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from xdit_fx.digits import CHECKPOINT_DIR, digit_classifier, load_pipeline, make_grid
from xdit_fx.digits.pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS

NUM_CLASSES = 10
GRID_PER_CLASS = 10


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, DEFAULT_GUIDANCE])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    return parser.parse_args(argv)


def measure(pipe, per_class: int, steps: int, guidance: float, seed: int) -> tuple[dict, torch.Tensor]:
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    start = time.perf_counter()
    images = pipe(labels.tolist(), num_inference_steps=steps, guidance_scale=guidance,
                  generator=torch.Generator().manual_seed(seed), progress=False).images
    seconds = time.perf_counter() - start
    correct = torch.from_numpy(digit_classifier().predict(images)) == labels
    per_digit = {str(c): float(correct[labels == c].float().mean()) for c in range(NUM_CLASSES)}
    row = dict(guidance_scale=guidance, steps=steps, samples=len(labels), digit_accuracy=float(correct.float().mean()),
               per_digit=per_digit, seconds=round(seconds, 2))
    return row, images


def render_markdown(result: dict) -> str:
    lines = [
        "# Digit accuracy of the embedded digits model (xdit_fx.digits)",
        "",
        f"Checkpoint `{result['checkpoint']}` ({result['params']:,} parameters); {result['per_class']} samples per "
        f"digit, seed {result['seed']}, {result['steps']} Euler steps (FlowMatchEulerDiscreteScheduler).",
        f"Judge: scikit-learn SVC on real 16x16 digits, held-out accuracy {result['classifier_held_out_accuracy']:.2%} "
        f"({result['classifier_held_out']} real digits). Default guidance scale: {result['default_guidance']}.",
        f"Machine: torch {result['torch']}, {result['threads']} threads, {result['date']}.",
        "",
        "| guidance scale | digit accuracy | " + " | ".join(str(c) for c in range(NUM_CLASSES)) + " | sampling s |",
        "|---|---|" + "---|" * NUM_CLASSES + "---|",
    ]
    for row in result["rows"]:
        name = f"{row['guidance_scale']:g}" + (" (no CFG)" if row["guidance_scale"] <= 1 else "")
        digits = " | ".join(f"{row['per_digit'][str(c)]:.0%}" for c in range(NUM_CLASSES))
        lines.append(f"| {name} | **{row['digit_accuracy']:.1%}** | {digits} | {row['seconds']:.1f} |")
    lines += ["", "![one row per digit, default settings](digit_accuracy.png)", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline()
    judge = digit_classifier()
    rows = []
    for guidance in args.guidance:
        row, images = measure(pipe, args.per_class, args.steps, guidance, args.seed)
        rows.append(row)
        print(f"guidance {guidance:g}: digit accuracy {row['digit_accuracy']:.1%} ({row['seconds']:.1f} s)", flush=True)
        if guidance == DEFAULT_GUIDANCE and args.steps == DEFAULT_STEPS:
            grid = images.reshape(NUM_CLASSES, args.per_class, 1, 16, 16)[:, :GRID_PER_CLASS].reshape(-1, 1, 16, 16)
            args.out_dir.mkdir(parents=True, exist_ok=True)
            make_grid(grid, nrow=min(GRID_PER_CLASS, args.per_class)).save(args.out_dir / "digit_accuracy.png")
    result = dict(
        checkpoint=str(CHECKPOINT_DIR.relative_to(Path(__file__).resolve().parents[1])),
        params=sum(p.numel() for p in pipe.transformer.parameters()), per_class=args.per_class, seed=args.seed,
        steps=args.steps, default_guidance=DEFAULT_GUIDANCE, classifier_held_out_accuracy=judge.held_out_accuracy,
        classifier_held_out=judge.num_held_out, torch=torch.__version__, threads=args.threads,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), rows=rows,
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "digit_accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "digit_accuracy.md").write_text(render_markdown(result))
    print(f"wrote {args.out_dir}/digit_accuracy.{{json,md,png}}")


if __name__ == "__main__":
    main()
