"""`xdit-fx demo` (`make demo`): the embedded digits model draws all ten digits, serial and in parallel.

Every rank generates the single-process images itself (same seed, same weights), then the same images
through `parallelize(pipe, plan)` for each plan. Rank 0 saves the grid of the first parallel plan as
demo.png and reports, per plan: the largest difference from the serial images, the time per generation,
the digit accuracy (a classifier trained on the real digits labels each image) and the bytes received.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

DIGITS = list(range(10))
SEED = 0


def _timed(fn, repeats: int) -> tuple[Any, float]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def demo_worker(plans: list[str], output: str, repeats: int = 2) -> dict[str, Any]:
    import xdit_fx
    from xdit_fx.digits import digit_accuracy, load_pipeline, make_grid

    torch.set_num_threads(1)
    xdit_fx.init_distributed()
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def generate(p):
        return p(DIGITS, generator=torch.Generator().manual_seed(SEED), output_type="pt")

    with torch.no_grad():
        generate(pipe)  # warm-up: first-call allocations and kernel selection are not part of the time
        ref, serial_s = _timed(lambda: generate(pipe).images, repeats)
        report: dict[str, Any] = {"serial_s": serial_s, "serial_accuracy": digit_accuracy(ref, DIGITS), "plans": []}
        for i, text in enumerate(plans):
            torch._dynamo.reset()
            ppipe = xdit_fx.parallelize(pipe, text)
            t0 = time.perf_counter()
            generate(ppipe)  # the first generation captures and rewrites the graph
            first_s = time.perf_counter() - t0
            with xdit_fx.counting() as counter:  # every generation of the timed repeats
                out, par_s = _timed(lambda: generate(ppipe), repeats)
            comm = counter.snapshot()
            if ppipe.rank == 0:
                images = out.images
                report["plans"].append({
                    "plan": text, "max_abs_err": (images - ref).abs().max().item(), "seconds": par_s,
                    "first_s": first_s, "accuracy": digit_accuracy(images, DIGITS),
                    "kib": sum(sum(ops.values()) for ops in comm.values()) / 1024 / repeats,
                })
                if i == 0:
                    make_grid(images, nrow=10).save(output)
                    report["output"] = output
            ppipe.unwrap()
    return report


def format_report(report: dict[str, Any], nproc: int) -> str:
    lines = [
        "xdit_fx demo: the embedded class-conditional DiT (DiTTransformer2DModel trained on scikit-learn digits), "
        "all ten digits, 16x16, default sampler (CFG), fp32, CPU",
        f"single process (1 thread): {report['serial_s']:.2f} s per generation, "
        f"digit accuracy {report['serial_accuracy']:.0%}",
        "",
        f"| plan ({nproc} ranks x 1 thread) | max abs err vs serial | s / generation | speed-up | digit accuracy "
        f"| KiB received / rank | first run (capture) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in report["plans"]:
        lines.append(
            f"| {p['plan']} | {p['max_abs_err']:.2e} | {p['seconds']:.2f} | {report['serial_s'] / p['seconds']:.2f}x "
            f"| {p['accuracy']:.0%} | {p['kib']:.1f} | {p['first_s']:.1f} s |")
    if report.get("output"):
        lines += ["", f"saved {report['output']} ({report['plans'][0]['plan']})"]
    return "\n".join(lines)
