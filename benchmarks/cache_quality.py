"""Cache acceleration on the embedded digits model: the quality/speed curve over skip thresholds.

Run by hand (a few minutes on 2 idle cores):

    .venv/bin/python benchmarks/cache_quality.py
    .venv/bin/python benchmarks/cache_quality.py --per-class 10 --fbc 0.05 0.1 --teacache 0.2 0.4

For every threshold of First-Block-Cache and of TeaCache (with coefficients fitted first by
`xdit_fx.cli.calibrate.calibrate` on generations with other seeds than the evaluation) it generates the same
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
from xdit_fx.cache_config import FirstBlockCache, TeaCache
from xdit_fx.cli.calibrate import calibrate
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
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--compile", action="store_true", help="every run (the reference too) with Plan(compile=True)")
    p.add_argument("--tag", default="", help="suffix of the result files, e.g. _h200")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    return p.parse_args(argv)


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    noise = float(((out.double() - ref.double()) ** 2).sum())
    return float("inf") if noise == 0 else 10.0 * torch.log10(torch.tensor(float((ref.double() ** 2).sum()) / noise)).item()


def main(argv=None) -> int:
    argv = list(argv) if argv is not None else __import__('sys').argv[1:]
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline().to(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    pipe.set_progress_bar_config(disable=True)
    labels = [d for d in range(10) for _ in range(args.per_class)]

    def run(p):
        # wall time, and the process's CPU time (all threads): on a shared CPU the second is the steadier one
        times, cpu_times, out = [], [], None
        for i in range(args.repeats + 1):  # the first run captures the graph
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.no_grad():
                out = p(labels, generator=torch.Generator().manual_seed(0)).images
            sync()
            if i:
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
        return out.cpu(), statistics.median(times), statistics.median(cpu_times)

    base = xdit_fx.parallelize(pipe, xdit_fx.Plan(compile=True)) if args.compile else pipe
    ref, ref_s, ref_cpu = run(base)
    if args.compile:
        base.unwrap()
    ref_acc = digit_accuracy(ref, labels)
    t0 = time.perf_counter()
    fit = calibrate(pipe, [{"class_labels": list(range(10)), "generator": torch.Generator().manual_seed(1000 + g)}
                           for g in range(args.calibration_generations)])
    calibration_s = time.perf_counter() - t0
    coeffs = tuple(fit["coefficients"])

    rows = [{"cache": "none", "threshold": 0.0, "skipped": 0.0, "accuracy": ref_acc, "sqnr_db": float("inf"),
             "seconds": ref_s, "cpu_seconds": ref_cpu, "full_steps": list(range(20))}]
    configs = [FirstBlockCache(t) for t in args.fbc] + [TeaCache(t, coefficients=coeffs) for t in args.teacache]
    for config in configs:
        torch._dynamo.reset()
        ppipe = xdit_fx.parallelize(pipe, xdit_fx.Plan(cache=config, compile=args.compile))
        out, seconds, cpu_seconds = run(ppipe)
        stats = ppipe.cache_stats
        rows.append({"cache": config.kind, "threshold": config.threshold, "skipped": stats.skipped_fraction,
                     "accuracy": digit_accuracy(out, labels), "sqnr_db": sqnr_db(out, ref), "seconds": seconds,
                     "cpu_seconds": cpu_seconds,
                     "full_steps": stats.full_steps()})
        ppipe.unwrap()
        r = rows[-1]
        print(f"{config.kind:8s} {config.threshold:5.2f}  skipped {100 * r['skipped']:5.1f}%  accuracy "
              f"{100 * r['accuracy']:5.1f}%  SQNR {r['sqnr_db']:5.1f} dB  {r['seconds']:.2f} s", flush=True)

    meets = [r for r in rows[1:] if r["skipped"] >= GOAL_SKIP - 1e-9 and r["accuracy"] >= ref_acc - GOAL_ACCURACY_DROP]
    # per kind, the lowest threshold that meets the goal: the safest setting that gets there
    first = {}
    for r in meets:
        first.setdefault(r["cache"], r)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{os.cpu_count()} CPUs"
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "threads": args.threads,
            "device": device_name, "compile": args.compile,
            "cpus": os.cpu_count(), "images": len(labels), "steps": 20, "calibration": fit,
            "calibration_seconds": calibration_s, "load_average": os.getloadavg()}
    (args.out_dir / f"cache_quality{args.tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Cache acceleration on the digits model: skipped blocks vs quality",
        "",
        f"Generated by `benchmarks/cache_quality.py{' ' + ' '.join(argv) if argv else ''}` on {meta['date']} "
        f"({device_name}, {args.threads} CPU threads, load average at the end {meta['load_average'][0]:.1f}; torch "
        f"{torch.__version__}{', compile=True' if args.compile else ''}). {len(labels)} images "
        f"({args.per_class} per digit), 20 Euler steps, batched CFG at guidance 2.0, 4 blocks; the no-cache run "
        f"is the reference for SQNR. TeaCache coefficients fitted by `calibrate` on "
        f"{args.calibration_generations} generations with other seeds ({fit['points']} step pairs, R^2 = "
        f"{fit['r2']:.3f}, {calibration_s:.1f} s). Time: median of {args.repeats} generations after a warm-up; wall seconds and the "
        f"process's CPU seconds (all threads; steadier than wall time on a shared machine).",
        "",
        "| cache | threshold | block evaluations skipped | digit accuracy | SQNR vs no cache (dB) | s / generation | CPU s / generation | full-stack steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['cache']} | {r['threshold']:g} | {100 * r['skipped']:.1f}% | {100 * r['accuracy']:.1f}% | "
                     f"{r['sqnr_db']:.1f} | {r['seconds']:.3f} | {r['cpu_seconds']:.2f} | {len(r['full_steps'])}/20 |")
    lines += ["", f"Goal: skip >= {100 * GOAL_SKIP:.0f}% of block evaluations while losing <= "
                  f"{100 * GOAL_ACCURACY_DROP:.0f} point of digit accuracy (reference {100 * ref_acc:.1f}%). "
              + ("Lowest threshold that meets it: " + "; ".join(
                  f"{r['cache']} {r['threshold']:g} ({100 * r['skipped']:.1f}% skipped, {100 * r['accuracy']:.1f}% "
                  f"accuracy, SQNR {r['sqnr_db']:.1f} dB, {ref_s / r['seconds']:.2f}x faster in wall time)"
                  for r in first.values()) + "." if first else "Not met by any row."), ""]
    (args.out_dir / f"cache_quality{args.tag}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
