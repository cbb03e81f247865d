"""PipeFusion on CPU: quality on the digits model (stale K/V) and time / bubble / memory / bytes on a Flux model.

Run by hand on an otherwise idle machine (a few minutes):

    .venv/bin/python benchmarks/pipefusion_cpu.py [--per-class 20] [--repeats 2]

Quality: the embedded digits model generates ``--per-class`` images of every digit (default sampler: 20
Euler steps, batched CFG) serially (the exact run) and with ``pipefusion=2`` at M = 2 and 4 patches (one
warm-up step, then stale K/V): digit accuracy of each, and the SQNR of the images against the exact ones.

Time: the Flux-architecture model of sequence_parallel_cpu.py (2 double + 6 single blocks, hidden 512,
1024 image + 64 text tokens), one process (1 and 2 threads) vs ``pipefusion=2`` (2 processes x 1 thread)
at M = 2, 4, 8: median time of a patched call, the measured bubble of each stage (1 - its compute time /
the call's time, per rank) against the theory (N-1)/(M+N-1), parameter bytes and K/V buffer bytes per
rank, bytes received per rank per call. Results: ``benchmarks/results/pipefusion_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

MODEL = dict(num_layers=2, num_single_layers=6, heads=8, head_dim=64, text_dim=64, axes_dims_rope=(16, 24, 24))
TEXT_TOKENS = 64
GRID = (32, 32)


def quality_worker(plan: str | None, labels: list[int], guidance: float) -> dict[str, Any]:
    import xdit_fx
    from xdit_fx.digits import load_pipeline

    torch.set_num_threads(1)
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    if plan is not None:
        xdit_fx.init_distributed()
        pipe = xdit_fx.parallelize(pipe, plan)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = pipe(labels, guidance_scale=guidance, generator=torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - t0
    warm = None
    if plan is not None:
        records = pipe.denoisers["transformer"].pipefusion.records
        warm = sum(r.warm for r in records), len(records)
    return {"images": out.images if out is not None else None, "seconds": seconds, "warm_calls": warm}


def speed_worker(plan: str | None, threads: int, repeats: int) -> dict[str, Any]:
    import torch.distributed as dist

    import xdit_fx
    from xdit_fx.runtime.pipefusion import parameter_bytes
    from xdit_fx.zoo import build_flux, flux_inputs

    torch.set_num_threads(threads)
    torch.manual_seed(0)  # the same weights in every process
    model = build_flux(**MODEL).eval()
    inputs = flux_inputs(*GRID, TEXT_TOKENS, text_dim=MODEL["text_dim"])
    total_params = parameter_bytes(model)
    target = model
    if plan is not None:
        xdit_fx.init_distributed()
        target = xdit_fx.parallelize(model, plan)
    times, busy, wall = [], [], []
    with torch.no_grad():
        for i in range(repeats + 2):  # call 0: capture + warm-up; call 1: recapture after freeing parameters
            if dist.is_initialized():
                dist.barrier()
            t0 = time.perf_counter()
            out = target(**inputs)
            seconds = time.perf_counter() - t0
            if i >= 2:
                times.append(seconds)
                if plan is not None:
                    busy.append(target.pipefusion.last_busy_s)
                    wall.append(target.pipefusion.last_wall_s)
    row = {"time_s": statistics.median(times), "params_bytes": parameter_bytes(model),
           "params_total_bytes": total_params, "output": out[0] if isinstance(out, tuple) else out}
    if plan is not None:
        row.update(bubble=1 - sum(busy) / sum(wall), kv_bytes=target.pipefusion.kv_bytes(),
                   comm=target.last_comm, warm=[r.warm for r in target.pipefusion.records],
                   summary=next(s.summary for s in target.histories[-1].snapshots if s.name == "pipefusion"))
    return row


def sqnr_db(x: torch.Tensor, ref: torch.Tensor) -> float:
    noise = (x.double() - ref.double()).pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * math.log10(ref.double().pow(2).sum().item() / noise)


def main() -> None:
    from xdit_fx.digits import digit_accuracy
    from xdit_fx.runtime.launch import launch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--skip-speed", action="store_true", help="keep the speed rows of the last results file")
    ap.add_argument("--skip-quality", action="store_true", help="keep the quality rows of the last results file")
    args = ap.parse_args()
    labels = list(range(10)) * args.per_class
    from xdit_fx.digits.pipeline import DEFAULT_GUIDANCE

    quality = []
    last = Path(args.out_dir) / "pipefusion_cpu.json"
    if args.skip_quality:
        previous = json.loads(last.read_text())
        quality, args.per_class = previous["quality"], previous["per_class"]
    for guidance in (DEFAULT_GUIDANCE, 1.0) * (not args.skip_quality):
        ref = None
        for name, nproc, plan in [("exact (1 process)", 1, None), ("pipefusion=2, M=2", 2, "pipefusion=2,patches=2"),
                                  ("pipefusion=2, M=4", 2, "pipefusion=2,patches=4")]:
            res = launch(quality_worker, nproc, (plan, labels, guidance))[0]
            images = res["images"]
            if ref is None:
                ref = images
            quality.append({"config": name, "plan": plan, "guidance": guidance,
                            "digit_accuracy": digit_accuracy(images, labels),
                            "sqnr_db": sqnr_db(images, ref) if plan else None,
                            "max_abs_diff": float((images - ref).abs().max()), "seconds": round(res["seconds"], 2),
                            "warm_calls": res["warm_calls"]})
            print(quality[-1], flush=True)

    speed = []
    ref_out = None
    if args.skip_speed:
        speed = json.loads((Path(args.out_dir) / "pipefusion_cpu.json").read_text())["speed"]
    for name, nproc, threads, plan in [("1 process x 2 threads", 1, 2, None), ("1 process x 1 thread", 1, 1, None),
                                       ("pipefusion=2, M=2", 2, 1, "pipefusion=2,patches=2"),
                                       ("pipefusion=2, M=4", 2, 1, "pipefusion=2,patches=4"),
                                       ("pipefusion=2, M=8", 2, 1, "pipefusion=2,patches=8")] * (not args.skip_speed):
        res = launch(speed_worker, nproc, (plan, threads, args.repeats))
        r0 = res[0]
        if ref_out is None:
            ref_out = r0["output"]
        row = {"config": name, "time_s": round(r0["time_s"], 3),
               "max_rel_diff": float((r0["output"] - ref_out).abs().max() / ref_out.abs().max()),
               "params_bytes_per_rank": [res[r]["params_bytes"] for r in range(nproc)],
               "params_total_bytes": r0["params_total_bytes"]}
        if plan is not None:
            m = int(plan.split("patches=")[1])
            row.update(bubble_per_rank=[round(res[r]["bubble"], 3) for r in range(nproc)],
                       bubble_theory=round(1 / (m + 1), 3), kv_bytes_per_rank=[res[r]["kv_bytes"] for r in range(nproc)],
                       bytes_received_per_rank=[res[r]["comm"] for r in range(nproc)], summary=r0["summary"])
        speed.append(row)
        print({k: v for k, v in row.items() if k != "summary"}, flush=True)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"per_class": args.per_class, "quality": quality, "speed": speed, "model": MODEL, "grid": GRID,
              "text_tokens": TEXT_TOKENS}
    (out_dir / "pipefusion_cpu.json").write_text(json.dumps(result, indent=2))
    (out_dir / "pipefusion_cpu.md").write_text(render(result))
    print(render(result))


def render(r: dict) -> str:
    mib = 1 / 2 ** 20
    lines = ["# PipeFusion on CPU", "",
             f"## Quality: digits model, {r['per_class']} images per digit, 20 steps, one warm-up step", "",
             "Guidance 1 is the model without classifier-free guidance (the harder setting for the judge); "
             "SQNR and max abs diff are against the exact images of the same guidance.", "",
             "| run | guidance | digit accuracy | SQNR vs exact images | max abs diff | warm-up calls | time |",
             "|---|---|---|---|---|---|---|"]
    for q in r["quality"]:
        sq = "-" if q["sqnr_db"] is None else f"{q['sqnr_db']:.1f} dB"
        warm = "-" if q["warm_calls"] is None else f"{q['warm_calls'][0]} of {q['warm_calls'][1]}"
        lines.append(f"| {q['config']} | {q.get('guidance', '-')} | {100 * q['digit_accuracy']:.1f}% | {sq} | {q['max_abs_diff']:.4f} | {warm} | "
                     f"{q['seconds']} s |")
    lines += ["", f"## Speed: Flux architecture {r['model']}, {r['grid'][0] * r['grid'][1]} image + {r['text_tokens']} "
              "text tokens, fp32, one transformer call (patched, stale K/V)", "",
              "| run | time | bubble per rank (measured) | bubble (N-1)/(M+N-1) | params / rank | K/V buffers / rank | "
              "received / rank / call | max rel diff vs 1 process |", "|---|---|---|---|---|---|---|---|"]
    for s in r["speed"]:
        params = " / ".join(f"{b * mib:.1f}" for b in s["params_bytes_per_rank"]) + " MiB"
        if "bubble_per_rank" in s:
            recv = " / ".join(f"{sum(sum(o.values()) for o in c.values()) * mib:.2f}" for c in s["bytes_received_per_rank"])
            lines.append(f"| {s['config']} | {s['time_s'] * 1000:.0f} ms | {' / '.join(map(str, s['bubble_per_rank']))} | "
                         f"{s['bubble_theory']} | {params} | "
                         f"{' / '.join(f'{b * mib:.1f}' for b in s['kv_bytes_per_rank'])} MiB | {recv} MiB | "
                         f"{s['max_rel_diff']:.2e} |")
        else:
            lines.append(f"| {s['config']} | {s['time_s'] * 1000:.0f} ms | - | - | {params} | - | - | - |")
    stage = next((s["summary"] for s in r["speed"] if "summary" in s), "")
    lines += ["", f"Stage cut (M=2): {stage}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
