"""Rank-0 CPU time per forward against the ideal, with diffusers' own context parallelism in the same run.

    .venv/bin/python benchmarks/cpu_overhead.py                     # 3 interleaved rounds, every case
    .venv/bin/python benchmarks/cpu_overhead.py --profile           # one profiled forward per config and case
    .venv/bin/python benchmarks/cpu_overhead.py --render benchmarks/results/cpu_overhead.json

Cases (random weights, seed 0, fp32, batch 1, `torch.no_grad()`):

* ``even``     tiny Flux (3 double + 6 single blocks, 4 heads x 32, RoPE axes 8/12/12, text dim 64): 48 x 48 = 2304 image + 128
  text tokens (divisible by 2);
* ``uneven``   the same model, 47 x 49 = 2303 image + 127 text tokens (the last rank's chunks padded);
* ``mask``     the even case with a boolean text mask (the last 32 text tokens hidden from every query),
  passed as diffusers' Flux takes it (``joint_attention_kwargs={"attention_mask": [B, 1, 1, L]}``);
* ``flux4096`` benchmarks/sequence_parallel_cpu.py's Flux (2 + 6 blocks, 8 heads x 64): 64 x 64 = 4096 image
  + 64 text tokens.

Configurations, each in fresh processes with 1 thread per process:

* ``ideal``            one process, the plain model: its CPU time per forward halved (two ranks that split
  the work perfectly and move nothing);
* ``xdit ulysses=2`` / ``xdit ring=2``: ``xdit_fx.parallelize(model, plan)`` on 2 gloo ranks;
* ``diffusers ulysses=2`` / ``diffusers ring=2``: diffusers' ``enable_parallelism(ContextParallelConfig(...))``
  on the same 2 gloo ranks and the same weights and inputs. Two shims make it run on a CPU, both outside the
  timed forwards' work: ``torch.accelerator.device_count`` answers 1 during ``enable_parallelism`` (diffusers
  takes ``rank % device_count()`` for a device index, 0 on a CPU-only machine), and for ring, whose merge needs
  a log-sum-exp, ``aten::_scaled_dot_product_flash_attention`` (CUDA only) is answered by the CPU flash kernel
  ``_scaled_dot_product_flash_attention_for_cpu`` (the same kernel xdit_fx's ring chunks run; diffusers'
  ``native`` backend returns no log-sum-exp). Ulysses runs diffusers' ``native`` backend (SDPA).

Per configuration and round: 2 untimed calls (capture / warm-up), then ``--repeats`` forwards, each after a
barrier; the number is rank 0's CPU time (``time.process_time``: every thread of the process, gloo's
included) per forward. Rounds run the configurations interleaved (a different order each round); the table
gives the median over all timed forwards of all rounds. The machine's cores are shared: ``uptime``'s load
average is recorded before and after every configuration, and CPU time (not wall time) is what is compared.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

CASES = {
    # name: (model kwargs for zoo.build_flux, (h, w), text tokens, masked text tokens)
    "even": (dict(num_layers=3, num_single_layers=6, heads=4, head_dim=32, text_dim=64, axes_dims_rope=(8, 12, 12)), (48, 48), 128, 0),
    "uneven": (dict(num_layers=3, num_single_layers=6, heads=4, head_dim=32, text_dim=64, axes_dims_rope=(8, 12, 12)), (47, 49), 127, 0),
    "mask": (dict(num_layers=3, num_single_layers=6, heads=4, head_dim=32, text_dim=64, axes_dims_rope=(8, 12, 12)), (48, 48), 128, 32),
    "flux4096": (dict(num_layers=2, num_single_layers=6, heads=8, head_dim=64, text_dim=64,
                      axes_dims_rope=(16, 24, 24)), (64, 64), 64, 0),
}
CONFIGS = ["ideal", "xdit ulysses=2", "xdit ring=2", "diffusers ulysses=2", "diffusers ring=2"]


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def build_case(case: str):
    from xdit_fx import zoo

    kwargs, (h, w), txt, masked = CASES[case]
    torch.manual_seed(0)
    model = zoo.build_flux(**kwargs).eval()
    inputs = zoo.flux_inputs(h, w, txt, text_dim=kwargs["text_dim"])
    if masked:
        keep = torch.ones(1, txt + h * w, dtype=torch.bool)
        keep[:, txt - masked:txt] = False  # joint order: text first
        inputs["joint_attention_kwargs"] = {"attention_mask": keep[:, None, None, :]}
    return model, inputs


def _cpu_flash_with_lse(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, scale=None):
    """aten::_scaled_dot_product_flash_attention's outputs from the CPU flash kernel (for diffusers' ring)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                           scale=scale)
    return out, lse, None, None, query.shape[2], key.shape[2], None, None, None


def parallel_model(config: str, model):
    """The model as `config` runs it (the plain model for `ideal`)."""
    if config == "ideal":
        return model
    kind, plan = config.split(" ")
    if kind == "xdit":
        import xdit_fx

        return xdit_fx.parallelize(model, plan)
    from diffusers import ContextParallelConfig

    degree = {"ulysses_degree": 2} if plan.startswith("ulysses") else {"ring_degree": 2}
    if plan.startswith("ring"):
        torch.ops.aten._scaled_dot_product_flash_attention = _cpu_flash_with_lse
        model.set_attention_backend("_native_flash")
    else:
        model.set_attention_backend("native")
    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        model.enable_parallelism(config=ContextParallelConfig(**degree))
    finally:
        torch.accelerator.device_count = count
    return model


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def time_case(config: str, case: str, repeats: int, profile: bool) -> dict[str, Any]:
    import torch.distributed as dist

    dist_on = dist.is_available() and dist.is_initialized()
    model, inputs = build_case(case)
    try:
        pm = parallel_model(config, model)
    except Exception as e:  # a configuration the library cannot run: reported, not timed
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    cpu, wall = [], []
    with torch.no_grad():
        try:
            for _ in range(2):
                pm(**inputs)
        except Exception as e:
            return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        for _ in range(repeats):
            if dist_on:
                dist.barrier()
            c0, w0 = time.process_time(), time.perf_counter()
            out = _first(pm(**inputs))
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
        res: dict[str, Any] = {"cpu_s": cpu, "wall_s": wall, "out_sum": float(out.double().sum())}
        if profile:
            res["profile"] = profile_forward(pm, inputs, dist_on)
    return res


def profile_forward(pm, inputs, dist_on: bool, top: int = 14) -> dict[str, Any]:
    """One forward under torch.profiler (self CPU time per op) and cProfile (time per Python function)."""
    import cProfile
    import pstats

    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    if dist_on:
        dist.barrier()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        pm(**inputs)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    if dist_on:
        dist.barrier()
    pr = cProfile.Profile()
    pr.enable()
    pm(**inputs)
    pr.disable()
    stats = pstats.Stats(pr)
    frames = sorted(((v[2], v[3], v[1], f"{Path(k[0]).name}:{k[1]}({k[2]})") for k, v in stats.stats.items()),
                    reverse=True)[:top]  # (own time, cumulative, calls, where)
    return {"ops": [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in ops],
            "frames": [(w, t * 1e3, c * 1e3, n) for t, c, n, w in frames]}


def _worker(rank: int, world: int, init_file: str, config: str, cases: list[str], repeats: int, profile: bool,
            out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=900))
    try:
        results = {}
        for case in cases:
            torch._dynamo.reset()
            results[case] = time_case(config, case, repeats, profile)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        if world > 1:
            dist.barrier()
    finally:
        if world > 1:
            dist.destroy_process_group()


def run_config(config: str, cases: list[str], repeats: int, profile: bool) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    world = 1 if config == "ideal" else 2
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), config, cases, repeats, profile, tmp),
                 nprocs=world, join=True)
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def summarize(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per case and config: median rank-0 CPU s/forward over every timed forward of every round (the ideal:
    the single process's, halved), and the ratio to the ideal."""
    table: dict[str, dict[str, Any]] = {}
    for case in data["cases"]:
        row: dict[str, Any] = {}
        for config in data["configs"]:
            runs = [r["ranks"][0].get(case, {}) for r in data["runs"] if r["config"] == config]
            errors = [r["error"] for r in runs if "error" in r]
            cpu = [c for r in runs for c in r.get("cpu_s", [])]
            if not cpu:
                row[config] = {"error": errors[0] if errors else "not run"}
                continue
            med = statistics.median(cpu) / (2 if config == "ideal" else 1)
            row[config] = {"cpu_s": med, "min_s": min(cpu) / (2 if config == "ideal" else 1), "n": len(cpu)}
        ideal = row.get("ideal", {}).get("cpu_s")
        for config, cell in row.items():
            if ideal and "cpu_s" in cell:
                cell["ratio"] = cell["cpu_s"] / ideal
        table[case] = row
    return table


def _tokens(case: str) -> int:
    _, (h, w), txt, _ = CASES[case]
    return h * w + txt


def write_markdown(data: dict[str, Any], path: Path) -> None:
    table = summarize(data)
    lines = ["# Rank-0 CPU time per forward against the ideal, xdit_fx and diffusers' context parallel (CPU)", "",
             f"{data['when']}, torch {data['torch']}, diffusers {data['diffusers']}, xdit_fx from "
             f"{data.get('xdit_fx_from')} (benchmark at {data['commit']}); "
             f"{data['rounds']} interleaved rounds x {data['repeats']} timed forwards per configuration; "
             f"2 gloo ranks x 1 thread (ideal: 1 process x 1 thread, halved). Load average (1, 5, 15 min) "
             f"from {data['load_first']} at the start to {data['load_last']} at the end, on {os.cpu_count()} cores.",
             "", "Median rank-0 CPU s/forward (ratio to the ideal).", "",
             "| case | tokens (image + text) | " + " | ".join(data["configs"]) + " |",
             "|---|---|" + "---|" * len(data["configs"])]
    for case, row in table.items():
        _, (h, w), txt, masked = CASES[case]
        tokens = f"{h * w} + {txt}" + (f", {masked} text masked" if masked else "")
        cells = []
        for config in data["configs"]:
            cell = row.get(config, {})
            if "cpu_s" in cell:
                cells.append(f"{cell['cpu_s']:.3f} ({cell.get('ratio', float('nan')):.2f}x)")
            else:
                cells.append(f"fails: {cell.get('error', '-')[:80]}")
        lines.append(f"| {case} | {tokens} | " + " | ".join(cells) + " |")
    if "even" in table and "uneven" in table:
        lines += ["", "Uneven against even split, rank-0 CPU time per token (uneven / even; the ideal's own ratio is "
                  "what the model's compute alone does):", ""]
        for config in data["configs"]:
            ev, un = table["even"].get(config, {}), table["uneven"].get(config, {})
            if "cpu_s" in ev and "cpu_s" in un:
                per = (un["cpu_s"] / _tokens("uneven")) / (ev["cpu_s"] / _tokens("even"))
                lines.append(f"- {config}: {per:.3f}")
    lines += ["", "Load average before each configuration's processes started and after they ended:", "",
              "| round | config | load before | load after |", "|---|---|---|---|"]
    lines += [f"| {r['round']} | {r['config']} | {r['load_before']} | {r['load_after']} |" for r in data["runs"]]
    if data.get("notes"):
        lines += ["", data["notes"]]
    path.write_text("\n".join(lines) + "\n")


def write_profile(data: dict[str, Any], path: Path) -> None:
    lines = ["# One profiled forward per configuration and case (self CPU ms per op; own ms per Python function)", "",
             f"{data['when']}, xdit_fx from {data.get('xdit_fx_from')} (benchmark at {data['commit']}), load {data['load_first']} -> {data['load_last']}.", ""]
    for run in data["runs"]:
        for case in data["cases"]:
            for rank, res in enumerate(run["ranks"]):
                prof = res.get(case, {}).get("profile")
                if not prof:
                    continue
                lines += [f"## {run['config']}, {case}, rank {rank}", "", "| op | self CPU ms | calls |", "|---|---|---|"]
                lines += [f"| `{k}` | {ms:.1f} | {n} |" for k, ms, n in prof["ops"]]
                lines += ["", "| Python function | own ms | cumulative ms | calls |", "|---|---|---|---|"]
                lines += [f"| `{w}` | {t:.1f} | {c:.1f} | {n} |" for w, t, c, n in prof["frames"]]
                lines.append("")
    path.write_text("\n".join(lines) + "\n")


def git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--profile", action="store_true", help="one round, one profiled forward per config and case")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--name", default=None, help="file stem (default cpu_overhead, or cpu_overhead_profile)")
    ap.add_argument("--render", default=None, help="re-write the markdown of a saved JSON")
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or ("cpu_overhead_profile" if args.profile else "cpu_overhead")
    if args.render:
        data = json.loads(Path(args.render).read_text())
        (write_profile if data.get("profile") else write_markdown)(data, Path(args.render).with_suffix(".md"))
        return
    import diffusers

    import xdit_fx

    cases, configs = args.cases.split(","), args.configs.split(",")
    data: dict[str, Any] = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            "torch": torch.__version__, "diffusers": diffusers.__version__, "commit": git_commit(),
                            "xdit_fx_from": str(Path(xdit_fx.__file__).parent.parent),
                            "rounds": 1 if args.profile else args.rounds, "repeats": args.repeats, "cases": cases,
                            "configs": configs, "profile": args.profile, "load_first": load(), "runs": []}
    for rnd in range(data["rounds"]):
        order = configs[rnd % len(configs):] + configs[:rnd % len(configs)]  # a different order each round
        for config in order:
            before = load()
            t0 = time.perf_counter()
            ranks = run_config(config, cases, args.repeats, args.profile)
            data["runs"].append({"round": rnd, "config": config, "ranks": ranks, "load_before": before,
                                 "load_after": load(), "wall_s": time.perf_counter() - t0})
            print(f"round {rnd} {config}: {time.perf_counter() - t0:.0f} s, load {load()}", file=sys.stderr)
            data["load_last"] = load()
            Path(out, f"{stem}.json").write_text(json.dumps(data, indent=1))
    (write_profile if args.profile else write_markdown)(data, Path(out, f"{stem}.md"))
    print(Path(out, f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
