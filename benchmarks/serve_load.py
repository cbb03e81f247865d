"""Open-loop load on `xdit-fx serve` (the digits model): images/s and p50/p99 latency per request rate.

Configurations: one rank one-at-a-time (--max-batch 1), one rank batched, and cfg=2 / dp=2 on 2 ranks
(batched). Each is started as a real server on loopback; requests (n=1, a random digit, default 20 steps)
arrive as a Poisson process at each rate, whatever the server's progress (open loop), for
--seconds seconds each. Rates are multiples of 1 / (single-request latency of one rank alone), so "1x"
is the rate one rank can just keep up with one at a time.

    python benchmarks/serve_load.py                     # writes benchmarks/results/serve_load.{json,md}
    python benchmarks/serve_load.py --seconds 5 --multiples 1,4
    python benchmarks/serve_load.py --configs cfg2,dp2 --multiples 8 --out /tmp/two_ranks   # some configs only

Before the servers, the pipeline alone is timed in this process (no server, the same torch threads) at
batches of --ceiling-sizes images: what batching can give on this machine at best (the compute ceiling),
and the batch where images/s peaks. Batched configurations run with --max-batch (default "best": that
peak batch; a larger running set only makes each step slower per image; twice that under cfg=2, whose
two ranks share each call; under dp=2 --max-batch bounds each rank's own call).

Goals (issue): batching gives >= 2x the images/s of one-at-a-time at saturation, and p99 latency at half
the saturation rate stays <= 2x the single-request latency. Saturation is each configuration's highest
images/s over the rates; after the rates, each configuration runs once more at half that rate (the "half sat."
row), which is where its p99 / single-request ratio is read. Batched configurations use step-level batching
(requests join the running batch at step boundaries); "request-level batched" is the former scheme, for
reference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MAX_BATCH = "{max_batch}"  # replaced by --max-batch (times the ranks that share each call, see SHARED)
CONFIGS = {  # name: (description, serve flags)
    "serial": ("1 rank, one at a time", ["--max-batch", "1", "--batch-window-ms", "0"]),
    "batched": ("1 rank, batched", ["--max-batch", MAX_BATCH, "--batch-window-ms", "20"]),
    "request": ("1 rank, request-level batched", ["--batching", "request", "--max-batch", MAX_BATCH,
                                                  "--batch-window-ms", "20"]),
    "cfg2": ("cfg=2 on 2 ranks, batched", ["--plan", "cfg=2", "--max-batch", MAX_BATCH, "--batch-window-ms", "20"]),
    "dp2": ("dp=2 on 2 ranks, batched", ["--plan", "dp=2", "--max-batch", MAX_BATCH, "--batch-window-ms", "20"]),
}
# ranks that share each pipeline call: under cfg=2 each rank computes half of a call's rows, so its call of
# 2 x the peak batch gives each rank the peak; under dp=2 --max-batch is per rank (each runs its own requests)
SHARED = {"cfg2": 2}


def compute_ceiling(sizes: list[int], threads: int, steps: int = 20, repeats: int = 3) -> dict[int, float]:
    """images/s of the digits pipeline alone (this process, `threads` torch threads) per batch of n images:
    the best of `repeats` timings of one n-image generation, 20 steps with CFG, as the service runs it."""
    import torch

    from xdit_fx.digits import load_pipeline

    torch.set_num_threads(threads)
    pipe = load_pipeline()
    rates = {}
    for n in sizes:
        best = float("inf")
        for r in range(repeats + 1):  # the first one warms up
            t0 = time.perf_counter()
            pipe([i % 10 for i in range(n)], num_inference_steps=steps, progress=False, output_type="pil",
                 generator=[torch.Generator().manual_seed(r * n + i) for i in range(n)])
            if r:
                best = min(best, time.perf_counter() - t0)
        rates[n] = n / best
    return rates


class Server:
    def __init__(self, args: list[str], threads: int) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        port_file = Path(self.tmp.name) / "port"
        self.log = open(Path(self.tmp.name) / "log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "xdit_fx.cli", "serve", "--port", "0", "--port-file",
                                      str(port_file), "--threads", str(threads), "--max-queue", "100000",
                                      "--request-timeout", "3600", "--warmup-batch", "8", *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        while not port_file.is_file():
            if self.proc.poll() is not None:
                raise RuntimeError((Path(self.tmp.name) / "log").read_text())
            time.sleep(0.2)
        self.url = f"http://127.0.0.1:{int(port_file.read_text())}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)


async def _one(client: httpx.AsyncClient, seed: int) -> float:
    t0 = time.perf_counter()
    r = await client.post("/v1/images/generations", json={"prompt": str(seed % 10), "seed": seed})
    r.raise_for_status()
    return time.perf_counter() - t0


async def single_latency(url: str, repeats: int) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await _one(client, 0)
        return statistics.median([await _one(client, i) for i in range(repeats)])


async def open_loop(url: str, rate: float, seconds: float, seed: int) -> dict:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        tasks, t, start = [], 0.0, time.perf_counter()
        while t < seconds:
            delay = start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(_one(client, rng.randrange(1 << 30))))
            t += rng.expovariate(rate)
        latencies = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    latencies = sorted(latencies)
    return {"rate": rate, "requests": len(latencies), "images_per_s": len(latencies) / elapsed,
            "p50_s": latencies[len(latencies) // 2],
            "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=8.0, help="arrival window per rate")
    p.add_argument("--multiples", default="0.5,1,2,4,8", help="rates, in units of 1 / single-request latency")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names from CONFIGS")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (1: a 2-rank config uses 2 cores)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load"))
    p.add_argument("--note", default="", help="a line for the results (e.g. the machine's load average)")
    p.add_argument("--max-batch", default="best",
                   help="--max-batch of the batched configurations: an int, or 'best' (the ceiling's peak batch)")
    p.add_argument("--ceiling-sizes", default="1,2,4,8,16,32",
                   help="batches at which to time the pipeline alone ('' to skip; then --max-batch must be an int)")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    results = {"machine": f"{platform.machine()}, {cores} cores shared with other jobs, {args.threads} torch "
                          f"thread(s) per rank", "seconds": args.seconds, "note": args.note,
               "load_before": os.getloadavg(),
               "configs": {}}
    for name in names:
        if name not in CONFIGS:
            raise SystemExit(f"--configs: unknown {name!r}; choose from {', '.join(CONFIGS)}")
    sizes = [int(x) for x in args.ceiling_sizes.split(",") if x.strip()]
    if sizes:
        ceiling = compute_ceiling(sizes, args.threads)
        results["ceiling_images_per_s"] = ceiling
        print("pipeline alone: " + ", ".join(f"n={n} {r:.1f} images/s" for n, r in ceiling.items()), flush=True)
    if args.max_batch == "best":
        if not sizes:
            raise SystemExit("--max-batch best needs --ceiling-sizes")
        max_batch = max(results["ceiling_images_per_s"].items(), key=lambda kv: kv[1])[0]
    elif args.max_batch.isdigit() and int(args.max_batch) >= 1:
        max_batch = int(args.max_batch)
    else:
        raise SystemExit(f"--max-batch must be a positive int or 'best', got {args.max_batch!r}")
    results["max_batch"] = max_batch
    base_rate = None
    for name in names:
        description, extra = CONFIGS[name]
        extra = [str(max_batch * SHARED.get(name, 1)) if x == MAX_BATCH else x for x in extra]
        server = Server(extra, threads=args.threads)
        try:
            single = asyncio.run(single_latency(server.url, 5))
            if base_rate is None:
                base_rate = 1.0 / single
            rows = []
            for m in (float(x) for x in args.multiples.split(",")):
                row = asyncio.run(open_loop(server.url, m * base_rate, args.seconds, seed=int(m * 100)))
                row["multiple"] = m
                rows.append(row)
                print(f"{description}: {m:g}x ({row['rate']:.1f} req/s): {row['images_per_s']:.1f} images/s, "
                      f"p50 {row['p50_s']:.3f} s, p99 {row['p99_s']:.3f} s", flush=True)
            saturation = max(r["images_per_s"] for r in rows)
            half = asyncio.run(open_loop(server.url, saturation / 2, args.seconds, seed=7))
            half["multiple"] = "half sat."
            rows.append(half)
            print(f"{description}: half saturation ({half['rate']:.1f} req/s): p99 {half['p99_s']:.3f} s = "
                  f"{half['p99_s'] / single:.2f}x single", flush=True)
            results["configs"][description] = {"single_latency_s": single, "saturation_images_per_s": saturation,
                                               "half_saturation_p99_ratio": half["p99_s"] / single, "rows": rows}
        finally:
            server.close()
    results["base_rate"] = base_rate
    results["load_after"] = os.getloadavg()
    Path(args.out + ".json").write_text(json.dumps(results, indent=1))
    Path(args.out + ".md").write_text(to_markdown(results))
    print(to_markdown(results))
    return 0


def to_markdown(results: dict) -> str:
    load = ", ".join(f"{x:.1f}" for x in results.get("load_before", ()))
    lines = ["# xdit-fx serve under open-loop load (digits model, n=1, 20 steps, CFG 2)", "",
             f"{results['machine']}; {results['seconds']:g} s of Poisson arrivals per rate; rate multiples of "
             f"1 / (one rank's single-request latency) = {results['base_rate']:.1f} req/s; \"half sat.\": half the "
             "configuration's highest images/s. Load average (1, 5, 15 min) before the run: "
             f"{load}; after: {', '.join(f'{x:.1f}' for x in results.get('load_after', ()))}.", ""]
    if results.get("note"):
        lines += [results["note"], ""]
    ceiling = results.get("ceiling_images_per_s")
    if ceiling:
        best = max(ceiling.values())
        lines += ["The pipeline alone in this process before the servers (no HTTP, the same torch threads), images/s "
                  "per batch of n: " + ", ".join(f"n={n} {r:.1f}" for n, r in ceiling.items()) +
                  (f"; the most batching can give over one at a time here: {best / ceiling[1]:.2f}x." if 1 in ceiling
                   else "."), ""]
    if "max_batch" in results:
        lines += [f"Batched configurations: --max-batch {results['max_batch']} (cfg=2, whose ranks share each call: "
                  f"{results['max_batch'] * SHARED['cfg2']}; under dp=2 it bounds each rank's call).", ""]
    lines += ["| config | single-request latency | rate (req/s) | images/s | p50 latency | p99 latency | p99 / single |",
              "|---|---|---|---|---|---|---|"]
    for name, c in results["configs"].items():
        single = c["single_latency_s"]
        for row in c["rows"]:
            m = row["multiple"]
            label = m if isinstance(m, str) else f"{m:g}x"
            lines.append(f"| {name} | {single * 1000:.0f} ms | {row['rate']:.1f} ({label}) | {row['images_per_s']:.1f} "
                         f"| {row['p50_s'] * 1000:.0f} ms | {row['p99_s'] * 1000:.0f} ms | {row['p99_s'] / single:.2f} |")
    serial = results["configs"].get(CONFIGS["serial"][0])
    if serial and "saturation_images_per_s" in serial:
        lines += ["", "| config | saturation images/s | vs one at a time | p99 at half sat. / single-request latency |",
                  "|---|---|---|---|"]
        for name, c in results["configs"].items():
            lines.append(f"| {name} | {c['saturation_images_per_s']:.1f} | "
                         f"{c['saturation_images_per_s'] / serial['saturation_images_per_s']:.1f}x | "
                         f"{c['half_saturation_p99_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
