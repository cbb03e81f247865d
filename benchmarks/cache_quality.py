"""Cache acceleration on the embedded digits model: the quality/speed curve over skip thresholds.

Run by hand (a few minutes on 2 idle cores):

    .venv/bin/python benchmarks/cache_quality.py
    .venv/bin/python benchmarks/cache_quality.py --per-class 10 --fbc 0.05 0.1 --teacache 0.2 0.4

For every threshold of First-Block-Cache and of TeaCache (with coefficients fitted first by
`xdit_fx.calibrate.calibrate` on generations with other seeds than the evaluation) it generates the same
``--per-class`` x 10 images as the no-cache run, at the default 20 Euler steps with batched CFG, and
reports: the fraction of block evaluations skipped, digit accuracy (the SVC judge of xdit_fx.digits), the
SQNR of the images against the no-cache images (10 log10(sum ref^2 / sum (out - ref)^2), in dB) and the
time per generation (median of ``--repeats`` after a warm-up run). Writes ``cache_quality.json`` and
``cache_quality.md`` under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch

import xdit_fx
from xdit_fx.cache import FirstBlockCache, TeaCache
from xdit_fx.calibrate import calibrate
from xdit_fx.digits import digit_accuracy, load_pipeline

GOAL_SKIP, GOAL_ACCURACY_DROP = 0.45, 0.01


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--fbc", type=float, nargs="*", default=[0.05, 0.1, 0.15, 0.2, 0.3, 0.5])
    p.add_argument("--teacache", type=float, nargs="*", default=[0.1, 0.2, 0.3, 0.5, 0.8, 1.2])
    p.add_argument("--calibration-generations", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    return p.parse_args(argv)


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    noise = float(((out.double() - ref.double()) ** 2).sum())
    return float("inf") if noise == 0 else 10.0 * torch.log10(torch.tensor(float((ref.double() ** 2).sum()) / noise)).item()


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    labels = [d for d in range(10) for _ in range(args.per_class)]

    def run(p):
        times, out = [], None
        for i in range(args.repeats + 1):  # the first run captures the graph
            t0 = time.perf_counter()
            with torch.no_grad():
                out = p(labels, generator=torch.Generator().manual_seed(0)).images
            if i:
                times.append(time.perf_counter() - t0)
        return out, statistics.median(times)

    ref, ref_s = run(pipe)
    ref_acc = digit_accuracy(ref, labels)
    t0 = time.perf_counter()
    fit = calibrate(pipe, [{"class_labels": list(range(10)), "generator": torch.Generator().manual_seed(1000 + g)}
                           for g in range(args.calibration_generations)])
    calibration_s = time.perf_counter() - t0
    coeffs = tuple(fit["coefficients"])

    rows = [{"cache": "none", "threshold": 0.0, "skipped": 0.0, "accuracy": ref_acc, "sqnr_db": float("inf"),
             "seconds": ref_s, "full_steps": list(range(20))}]
    configs = [FirstBlockCache(t) for t in args.fbc] + [TeaCache(t, coefficients=coeffs) for t in args.teacache]
    for config in configs:
        torch._dynamo.reset()
        ppipe = xdit_fx.parallelize(pipe, xdit_fx.Plan(cache=config))
        out, seconds = run(ppipe)
        stats = ppipe.cache_stats
        rows.append({"cache": config.kind, "threshold": config.threshold, "skipped": stats.skipped_fraction,
                     "accuracy": digit_accuracy(out, labels), "sqnr_db": sqnr_db(out, ref), "seconds": seconds,
                     "full_steps": stats.full_steps()})
        ppipe.unwrap()
        r = rows[-1]
        print(f"{config.kind:8s} {config.threshold:5.2f}  skipped {100 * r['skipped']:5.1f}%  accuracy "
              f"{100 * r['accuracy']:5.1f}%  SQNR {r['sqnr_db']:5.1f} dB  {r['seconds']:.2f} s", flush=True)

    meets = [r for r in rows[1:] if r["skipped"] >= GOAL_SKIP and r["accuracy"] >= ref_acc - GOAL_ACCURACY_DROP]
    best = max(meets, key=lambda r: r["skipped"], default=None)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "threads": args.threads,
            "cpus": os.cpu_count(), "images": len(labels), "steps": 20, "calibration": fit,
            "calibration_seconds": calibration_s, "load_average": os.getloadavg()}
    (args.out_dir / "cache_quality.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Cache acceleration on the digits model: skipped blocks vs quality",
        "",
        f"Generated by `benchmarks/cache_quality.py` on {meta['date']} ({meta['cpus']} CPUs, {args.threads} threads, "
        f"load average at the end {meta['load_average'][0]:.1f}; torch {torch.__version__}). {len(labels)} images "
        f"({args.per_class} per digit), 20 Euler steps, batched CFG at guidance 2.0, 4 blocks; the no-cache run "
        f"is the reference for SQNR. TeaCache coefficients fitted by `calibrate` on "
        f"{args.calibration_generations} generations with other seeds ({fit['points']} step pairs, R^2 = "
        f"{fit['r2']:.3f}, {calibration_s:.1f} s). Time: median of {args.repeats} generations after a warm-up.",
        "",
        "| cache | threshold | block evaluations skipped | digit accuracy | SQNR vs no cache (dB) | s / generation | full-stack steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['cache']} | {r['threshold']:g} | {100 * r['skipped']:.1f}% | {100 * r['accuracy']:.1f}% | "
                     f"{r['sqnr_db']:.1f} | {r['seconds']:.2f} | {len(r['full_steps'])}/20 |")
    lines += ["", f"Goal: skip >= {100 * GOAL_SKIP:.0f}% of block evaluations while losing <= "
                  f"{100 * GOAL_ACCURACY_DROP:.0f} point of digit accuracy (reference {100 * ref_acc:.1f}%). "
              + (f"Met by {best['cache']} at threshold {best['threshold']:g}: {100 * best['skipped']:.1f}% skipped, "
                 f"{100 * best['accuracy']:.1f}% accuracy, {best['seconds']:.2f} s vs {ref_s:.2f} s."
                 if best else "Not met by any row."), ""]
    (args.out_dir / "cache_quality.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
