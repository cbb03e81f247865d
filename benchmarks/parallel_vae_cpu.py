"""Parallel VAE decode on CPU: one process (1 or 2 threads) vs 2 ranks x 1 thread (row split + halos).

Run by hand (a few minutes; wants an otherwise idle machine):

    .venv/bin/python benchmarks/parallel_vae_cpu.py                 # latent 64x64 -> 512x512 image
    .venv/bin/python benchmarks/parallel_vae_cpu.py --latent 32 --repeats 2

Model: a random-weight (seed 0) AutoencoderKL, fp32, decoder blocks of (64, 64, 32, 16) channels from the
latent up (block_out_channels=(16, 32, 64, 64)), 1 layer per block (+1 in the decoder), 8 norm groups, mid-block
attention over the 64x64 = 4096 latent pixels, 3 nearest x2 upsamplings. Every configuration runs in fresh
processes started by `xdit_fx.runtime.launch.launch`:

* ``single-1t``  one process, 1 thread: the reference output and the baseline;
* ``single-2t``  one process, 2 threads;
* ``rows=2``     two ranks x 1 thread, ``parallel_decode`` (gloo).

Each does one warm-up decode, then ``repeats`` timed decodes under ``torch.no_grad()`` (ranks meet at a
barrier before each; a decode's time is the slowest rank's). Reported: median and min time, max abs error
vs ``single-1t``, bytes each rank received per decode by kind, halo bytes as a share of the bytes of all
conv inputs on the rank, the largest single activation per rank, peak RSS, and how busy other processes
kept the machine (from /proc/stat minus our own CPU time: the machine is shared).

Results: ``<out-dir>/parallel_vae_cpu.json`` (raw numbers) and ``<out-dir>/parallel_vae_cpu.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

CONFIGS = {"single-1t": (1, 1), "single-2t": (1, 2), "rows=2": (2, 1)}   # name: (processes, threads each)
BASELINE = "single-1t"
VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4)


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return total - idle, total


def wait_for_quiet(max_wait_s: float, threshold: float = 0.15, window_s: float = 3.0) -> float:
    """Wait (up to max_wait_s) until other processes keep the machine at most `threshold` busy over
    `window_s`; return the last busy fraction seen."""
    start = time.monotonic()
    while True:
        (b0, t0), _ = _busy_jiffies(), time.sleep(window_s)
        b1, t1 = _busy_jiffies()
        busy = (b1 - b0) / max(t1 - t0, 1)
        waited = time.monotonic() - start
        if busy <= threshold or waited > max_wait_s:
            print(f"  machine {busy:.0%} busy after waiting {waited:.0f} s", flush=True)
            return busy


def _own_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _conv_input_stats(vae) -> tuple[dict[str, int], list]:
    """Hooks that add up the bytes of every conv input and track the largest conv/norm activation."""
    stats = {"conv_input_bytes": 0, "largest_activation_bytes": 0}

    def hook(module, args, out):
        stats["conv_input_bytes"] += args[0].nbytes
        stats["largest_activation_bytes"] = max(stats["largest_activation_bytes"], args[0].nbytes, out.nbytes)

    kinds = (torch.nn.Conv2d, torch.nn.GroupNorm)
    return stats, [m.register_forward_hook(hook) for m in vae.modules() if isinstance(m, kinds)]


def bench_worker(config: str, latent: int, repeats: int) -> dict[str, Any]:
    """One configuration on this process (RANK/WORLD_SIZE set by launch); returns raw numbers."""
    import torch.distributed as dist
    from diffusers import AutoencoderKL

    from xdit_fx.runtime import init_distributed
    from xdit_fx.ops.comm import counting
    from xdit_fx.runtime.vae import parallel_decode

    nproc, threads = CONFIGS[config]
    torch.set_num_threads(threads)
    if nproc > 1:
        init_distributed()
    rank = dist.get_rank() if nproc > 1 else 0
    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE).eval()
    z = torch.randn((1, 4, latent, latent), generator=torch.Generator().manual_seed(1))

    def decode():
        if nproc > 1:
            dist.barrier()
            return parallel_decode(vae, z, return_dict=False)[0]
        return vae.decode(z, return_dict=False)[0]

    with torch.no_grad():
        stats, hooks = _conv_input_stats(vae)
        decode()   # warm-up, and one decode's conv input bytes
        for h in hooks:
            h.remove()
        times, cpu0, (busy0, total0) = [], _own_cpu_s(), _busy_jiffies()
        for _ in range(repeats):
            with counting() as counter:  # the last decode's bytes
                t = time.perf_counter()
                out = decode()
                times.append(time.perf_counter() - t)
        own_cpu, (busy1, total1) = _own_cpu_s() - cpu0, _busy_jiffies()
    return {"rank": rank, "times_s": times, "comm": {op: v for (_, op), v in counter.bytes.items()}, **stats,
            "own_cpu_s": own_cpu, "busy_s": (busy1 - busy0) / os.sysconf("SC_CLK_TCK"),
            "wall_cpu_s": (total1 - total0) / os.sysconf("SC_CLK_TCK"),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "output": out if rank == 0 else None}


def run_config(config: str, latent: int, repeats: int, max_wait_s: float) -> dict[str, Any]:
    from xdit_fx.runtime.launch import launch

    busy_before = wait_for_quiet(max_wait_s)
    ranks = launch(bench_worker, CONFIGS[config][0], (config, latent, repeats))
    ranks = [ranks[r] for r in sorted(ranks)]
    slowest = [max(r["times_s"][i] for r in ranks) for i in range(repeats)]
    own = sum(r["own_cpu_s"] for r in ranks)
    other = max(0.0, ranks[0]["busy_s"] - own) / max(ranks[0]["wall_cpu_s"], 1e-9)
    return {"config": config, "median_s": statistics.median(slowest), "min_s": min(slowest), "times_s": slowest,
            "other_cpu_share": other, "busy_before": busy_before, "output": ranks[0]["output"],
            "ranks": [{k: v for k, v in r.items() if k != "output"} for r in ranks]}


def _describe(vae: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in vae.items() if not k.endswith("_block_types"))


def render(data: dict[str, Any]) -> str:
    base = next(r for r in data["runs"] if r["config"] == BASELINE)
    lines = [
        "# Parallel VAE decode on CPU (xdit_fx)", "",
        f"AutoencoderKL, random weights (seed 0), fp32, {_describe(data['vae'])}; "
        f"latent {data['latent']}x{data['latent']} -> image {8 * data['latent']}x{8 * data['latent']}, batch 1, "
        "`torch.no_grad()`.",
        f"Machine: {data['machine']}, torch {data['torch']}, diffusers {data['diffusers']}, {data['date']}; "
        f"xdit_fx commit {data['commit']}; {data['repeats']} timed decodes per configuration after one warm-up.",
        "",
        "| config | s/decode (median) | min s | speed-up vs single-1t | max abs err | KiB received/rank "
        "(halo / norm stats / K,V / output) | halo / conv-input bytes | largest activation MiB/rank | "
        "peak RSS MiB/rank | other processes' CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in data["runs"]:
        r0 = run["ranks"][0]
        comm = r0["comm"]
        kinds = ("vae_halo", "vae_norm_stats", "vae_kv_gather", "vae_output")
        kib = " / ".join(f"{comm.get(k, 0) / 1024:,.1f}" for k in kinds) if comm else "-"
        halo_share = f"{comm['vae_halo'] / r0['conv_input_bytes']:.2%}" if comm else "-"
        err = "reference" if run["config"] == BASELINE else f"{run['max_abs_err']:.2e}"
        rss = " / ".join(f"{r['peak_rss_mib']:.0f}" for r in run["ranks"])
        lines.append(
            f"| {run['config']} | {run['median_s']:.2f} | {run['min_s']:.2f} | "
            f"{base['median_s'] / run['median_s']:.2f}x | {err} | {kib} | {halo_share} | "
            f"{r0['largest_activation_bytes'] / 2**20:.1f} | "
            f"{rss} | {run['other_cpu_share']:.0%} |")
    lines += ["", f"Max abs value of the reference image: {data['ref_max_abs']:.3f}."]
    busiest = max(run["other_cpu_share"] for run in data["runs"])
    if busiest > 0.25:
        lines.append(f"**Other processes used up to {busiest:.0%} of the machine during the timed decodes: the "
                     f"times compare nothing. Bytes, errors and sizes are unaffected.**")
    return "\n".join(lines + [""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=64, help="latent height = width")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-wait", type=float, default=600, help="seconds to wait for an idle machine")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    import diffusers

    runs = [run_config(c, args.latent, args.repeats, args.max_wait) for c in CONFIGS]
    ref = next(r for r in runs if r["config"] == BASELINE)["output"]
    for run in runs:
        run["max_abs_err"] = (run.pop("output") - ref).abs().max().item()
    data = {"latent": args.latent, "repeats": args.repeats, "vae": VAE, "runs": runs,
            "ref_max_abs": ref.abs().max().item(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "machine": f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=Path(__file__).parent).stdout.strip()}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "parallel_vae_cpu.json").write_text(json.dumps(data, indent=1, default=list))
    (out / "parallel_vae_cpu.md").write_text(render(data))
    print(render(data))


if __name__ == "__main__":
    main()
