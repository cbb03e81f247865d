"""`xdit-fx demo`: a random-weight Flux-architecture transformer, serial vs parallel, on local processes.

Each rank computes the single-process output itself (same seed, same inputs), then runs the parallel
module for each plan and reports the largest difference, the forward time and the bytes it received.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

#: The demo model: hidden 256 (8 heads x 32), 2 double-stream + 4 single-stream blocks.
DEMO_MODEL = dict(num_layers=2, num_single_layers=4, heads=8, head_dim=32, text_dim=64, axes_dims_rope=(8, 12, 12))
#: 16 x 16 = 256 image tokens (a 256 x 256 image at Flux's 16x compression) and 32 text tokens.
DEMO_INPUTS = dict(h=16, w=16, txt=32, text_dim=64)


def _timed(fn, repeats: int) -> tuple[Any, float]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def demo_worker(plans: list[str], repeats: int = 3) -> dict[str, Any]:
    import xdit_fx
    from xdit_fx.zoo import build_flux, flux_inputs

    torch.set_num_threads(1)
    xdit_fx.init_distributed()
    torch.manual_seed(0)
    model = build_flux(**DEMO_MODEL).eval()
    inputs = flux_inputs(**DEMO_INPUTS)
    report: dict[str, Any] = {"plans": []}
    with torch.no_grad():
        ref, serial_s = _timed(lambda: model(**inputs)[0], repeats)
        report["serial_s"] = serial_s
        for text in plans:
            torch._dynamo.reset()
            pm = xdit_fx.parallelize(model, xdit_fx.Plan.from_string(text))
            t0 = time.perf_counter()
            pm(**inputs)  # first call captures and rewrites the graph
            capture_s = time.perf_counter() - t0
            out, par_s = _timed(lambda: pm(**inputs)[0], repeats)
            counts = pm.histories[0].counts()
            report["plans"].append({
                "plan": text, "max_abs_err": (out - ref).abs().max().item(), "ref_max": ref.abs().max().item(),
                "seconds": par_s, "capture_s": capture_s, "comm": pm.last_comm,
                "sites": counts.get("sp_attention_sites", 0), "fallback_gathers": counts.get("fallback_gathers", 0),
            })
    return report


def format_report(report: dict[str, Any], nproc: int) -> str:
    params = DEMO_MODEL
    lines = [
        f"xdit_fx demo: Flux-architecture transformer (random weights, {params['num_layers']} double + "
        f"{params['num_single_layers']} single blocks, {params['heads']} heads x {params['head_dim']}), "
        f"{DEMO_INPUTS['h'] * DEMO_INPUTS['w']} image + {DEMO_INPUTS['txt']} text tokens, fp32, CPU",
        f"single process (1 thread): {report['serial_s'] * 1e3:.1f} ms per forward",
        "",
        f"| plan ({nproc} ranks x 1 thread) | max abs err vs serial | ms / forward | speed-up | KiB received / rank "
        f"| attention sites | fallback gathers |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in report["plans"]:
        kib = sum(sum(ops.values()) for ops in p["comm"].values()) / 1024
        lines.append(
            f"| {p['plan']} | {p['max_abs_err']:.2e} | {p['seconds'] * 1e3:.1f} | "
            f"{report['serial_s'] / p['seconds']:.2f}x | {kib:.1f} | {p['sites']} | {p['fallback_gathers']} |")
    return "\n".join(lines)
