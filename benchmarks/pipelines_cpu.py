"""Whole-pipeline parallelism on CPU: the embedded digits model, serial vs cfg=2 / dp=2 / ulysses=2.

Run by hand on an otherwise idle machine (a few minutes):

    .venv/bin/python benchmarks/pipelines_cpu.py [--images-per-class 2] [--repeats 3]

Each configuration runs in fresh processes (``xdit_fx.runtime.launch.launch``) and generates the same
images (all ten digits, ``--images-per-class`` each, default sampler: 20 Euler steps, batched CFG):

* ``serial-1t`` / ``serial-2t``: one process with 1 / 2 threads, the plain pipeline (the reference);
* ``cfg=2``, ``dp=2``, ``ulysses=2``: two ranks x 1 thread, ``xdit_fx.parallelize(pipe, plan)``.

Reported per configuration: the median time of ``--repeats`` generations after one warm-up generation
(which also captures the graph), the slowest rank's; the first generation's time; the max abs difference
from the ``serial-1t`` images; the digit accuracy; bytes received per rank per generation.
Results: ``benchmarks/results/pipelines_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

CONFIGS = {"serial-1t": (1, 1, None), "serial-2t": (1, 2, None), "cfg=2": (2, 1, "cfg=2"),
           "dp=2": (2, 1, "dp=2"), "ulysses=2": (2, 1, "ulysses=2")}


def worker(config: str, labels: list[int], repeats: int) -> dict[str, Any]:
    import torch.distributed as dist

    import xdit_fx
    from xdit_fx.digits import load_pipeline
    from xdit_fx.ops.comm import counting

    nproc, threads, plan = CONFIGS[config]
    torch.set_num_threads(threads)
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    if plan is not None:
        xdit_fx.init_distributed()
        pipe = xdit_fx.parallelize(pipe, plan)

    def generate():
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = pipe(labels, generator=torch.Generator().manual_seed(0))
        return out, time.perf_counter() - t0

    _, first_s = generate()
    times, out = [], None
    with counting() as counter:
        for _ in range(repeats):
            out, seconds = generate()
            times.append(seconds)
    comm = counter.snapshot()
    return {"times_s": times, "first_s": first_s, "images": out.images if out is not None else None,
            "bytes": sum(sum(ops.values()) for ops in comm.values()) / repeats}


def main() -> None:
    from xdit_fx.digits import digit_accuracy
    from xdit_fx.runtime.launch import launch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images-per-class", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    labels = list(range(10)) * args.images_per_class
    rows, ref = [], None
    for config, (nproc, threads, plan) in CONFIGS.items():
        results = launch(worker, nproc, (config, labels, args.repeats))
        ranks = [results[r] for r in sorted(results)]
        per_gen = [max(r["times_s"][i] for r in ranks) for i in range(args.repeats)]
        images = ranks[0]["images"]
        ref = images if ref is None else ref
        rows.append({"config": config, "processes": nproc, "threads": threads,
                     "median_s": statistics.median(per_gen), "first_s": max(r["first_s"] for r in ranks),
                     "max_abs_err": (images - ref).abs().max().item(), "accuracy": digit_accuracy(images, labels),
                     "kib_per_rank": ranks[0]["bytes"] / 1024})
        print(rows[-1], flush=True)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "pipelines_cpu.json").write_text(json.dumps({"images": len(labels), "rows": rows}, indent=1))
    base = rows[0]["median_s"]
    lines = [f"# Digits pipeline on CPU: {len(labels)} images, 20 steps, batched CFG", "",
             "| config | processes x threads | s / generation | vs serial-1t | first generation | max abs err "
             "vs serial-1t | digit accuracy | KiB received / rank |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['processes']} x {r['threads']} | {r['median_s']:.2f} | "
                     f"{base / r['median_s']:.2f}x | {r['first_s']:.2f} s | {r['max_abs_err']:.1e} | "
                     f"{r['accuracy']:.0%} | {r['kib_per_rank']:.0f} |")
    (out_dir / "pipelines_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
