"""yunchang's LongContextAttention (USP) vs xdit_fx's `sp_attention` on CPU: 2 gloo ranks x 1 thread.

Run by hand, in an environment where yunchang is installed (it is not a dependency of xdit_fx):

    python -m venv /tmp/ycvenv && /tmp/ycvenv/bin/pip install torch yunchang && /tmp/ycvenv/bin/pip install -e .
    /tmp/ycvenv/bin/python benchmarks/yunchang_cpu.py                 # L = 2048 and 4096, 10 calls each
    /tmp/ycvenv/bin/python benchmarks/yunchang_cpu.py --tokens 1024 --calls 3 --out-dir /tmp/yc

Inputs: B=1, H=8, D=64, fp32, seed 0, no mask; every rank builds the same global q, k, v and takes its
token chunk (in each library's own layout: xdit_fx [B, H, L, D], yunchang [B, L, H, D], made contiguous
before timing). Configurations, interleaved per call:

* ``xdit_fx ulysses=2`` / ``xdit_fx ring=2``: `xdit_fx.ops.attention.sp_attention`;
* ``yunchang ulysses=2`` / ``yunchang ring=2``: `yunchang.LongContextAttention` after
  `set_seq_parallel_pg(ulysses, ring, ...)`, for every attention backend yunchang offers in its
  `AttnType` / ring implementation table that could run without CUDA: a backend that raises is recorded
  with its error and not timed.

Reported per configuration and token count: the max abs difference of the gathered output vs one process's
`F.scaled_dot_product_attention` on the whole sequence, the median time per call (ranks meet at a barrier
before each call; a call's time is the slower rank's), and the bytes rank 0 receives per call, counted at
the torch.distributed primitives (`all_to_all_single`: (N-1)/N of the output buffer; `batch_isend_irecv`:
every irecv buffer), the same way for both libraries. `uptime` is recorded before and after.

Results: ``<out-dir>/yunchang_cpu.json`` and ``<out-dir>/yunchang_cpu.md`` (``--render JSON --conclusion TEXT``
rewrites the markdown from a JSON with a closing paragraph, and runs nothing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

B, H, D = 1, 8, 64
WORLD = 2


# ---- byte counting at the torch.distributed primitives (both libraries call them as `dist.<name>`) ----

class PrimitiveCounter:
    def __init__(self) -> None:
        self.bytes = 0
        self._a2a = dist.all_to_all_single
        self._p2p = dist.batch_isend_irecv

    def install(self) -> None:
        def all_to_all_single(output, input, *args, group=None, **kwargs):
            n = dist.get_world_size(group)
            self.bytes += output.numel() * output.element_size() * (n - 1) // n
            return self._a2a(output, input, *args, group=group, **kwargs)

        def batch_isend_irecv(p2p_op_list):
            for op in p2p_op_list:
                if op.op is dist.irecv:
                    self.bytes += op.tensor.numel() * op.tensor.element_size()
            return self._p2p(p2p_op_list)

        dist.all_to_all_single = all_to_all_single
        dist.batch_isend_irecv = batch_isend_irecv


# ---- the two libraries, one callable per configuration ----------------------------------------------

def xdit_fx_fn(q, k, v, ulysses: int, ring: int):
    """sp_attention on [B, H, L/N, D] chunks; the world group serves as sp, ulysses and ring group."""
    from xdit_fx.ops.attention import sp_attention

    name = dist.group.WORLD.group_name
    segs = ((q.shape[2] * WORLD, True),)
    qx, kx, vx = (t.contiguous() for t in (q, k, v))

    def call():
        return sp_attention(qx, kx, vx, None, q_segments=segs, kv_segments=segs, scale=None, ulysses=ulysses,
                            ring=ring, sp_group=name, ulysses_group=name, ring_group=name)
    return call, lambda out: out  # already [B, H, L/N, D]


def yunchang_variants(ulysses: int, ring: int) -> list[tuple[str, str, Any]]:
    """(label, ring_impl_type, AttnType) for every yunchang backend worth trying on CPU."""
    from yunchang.kernels import AttnType

    out = []
    for impl in ("basic", "basic_pytorch"):
        for attn in (AttnType.TORCH_FLASH, AttnType.TORCH_EFFICIENT, AttnType.TORCH_MATH, AttnType.FA):
            if impl == "basic_pytorch" and attn is not AttnType.TORCH_FLASH:
                continue  # basic_pytorch ignores attn_type (always aten._scaled_dot_product_flash_attention)
            out.append((f"{impl}/{attn.value}", impl, attn))
    return out


def yunchang_fn(q, k, v, ulysses: int, ring: int, impl: str, attn_type):
    """LongContextAttention on [B, L/N, H, D] chunks."""
    from yunchang import LongContextAttention, set_seq_parallel_pg

    set_seq_parallel_pg(ulysses, ring, dist.get_rank(), WORLD)  # collective: new groups for this config
    layer = LongContextAttention(ring_impl_type=impl, attn_type=attn_type)
    qy, ky, vy = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    scale = D ** -0.5

    def call():
        return layer(qy, ky, vy, softmax_scale=scale, causal=False)
    return call, lambda out: out.transpose(1, 2)


# ---- one rank -----------------------------------------------------------------------------------------

def worker(rank: int, init_file: str, tokens_list: list[int], calls: int, warmup: int, result_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    counter = PrimitiveCounter()
    counter.install()
    results: list[dict[str, Any]] = []
    try:
        import yunchang  # noqa: F401
        have_yunchang = True
    except ImportError:
        have_yunchang = False

    for tokens in tokens_list:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, tokens, D, generator=g) for _ in range(3))
        t0 = time.perf_counter()
        ref = F.scaled_dot_product_attention(q, k, v)
        ref_s = time.perf_counter() - t0
        c = tokens // WORLD
        ql, kl, vl = (t[:, :, rank * c:(rank + 1) * c] for t in (q, k, v))

        configs: list[dict[str, Any]] = []
        for ulysses, ring in ((2, 1), (1, 2)):
            deg = "ulysses=2" if ulysses > 1 else "ring=2"
            configs.append({"library": "xdit_fx", "config": deg, "backend": "sp_attention (CPU flash kernel)",
                            "make": lambda u=ulysses, r=ring: xdit_fx_fn(ql, kl, vl, u, r)})
            if have_yunchang:
                for label, impl, attn in yunchang_variants(ulysses, ring):
                    configs.append({"library": "yunchang", "config": deg, "backend": label,
                                    "make": lambda u=ulysses, r=ring, i=impl, a=attn: yunchang_fn(ql, kl, vl, u, r, i, a)})

        # build every callable and run it once (errors recorded), then time the runnable ones interleaved
        live = []
        for cfg in configs:
            row = {k2: cfg[k2] for k2 in ("library", "config", "backend")}
            row["tokens"] = tokens
            try:
                call, to_bhld = cfg["make"]()
                dist.barrier()
                counter.bytes = 0
                with torch.no_grad():
                    out = to_bhld(call())
                row["bytes_received_per_call"] = counter.bytes
                full = [torch.empty_like(out) for _ in range(WORLD)]
                dist.all_gather(full, out.contiguous())
                row["max_abs_err"] = float((torch.cat(full, dim=2) - ref).abs().max())
                live.append((row, call))
            except Exception as e:  # noqa: BLE001 - a backend that cannot run here is a result
                msg = str(e).splitlines()[0] if str(e) else ""
                row["error"] = f"{type(e).__name__}: {msg.split(' This could be')[0][:120]}"
                dist.barrier()
            results.append(row)
        times: dict[int, list[float]] = {id(r): [] for r, _ in live}
        with torch.no_grad():
            for i in range(warmup + calls):
                for row, call in live:
                    dist.barrier()
                    t0 = time.perf_counter()
                    call()
                    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                    if i >= warmup:
                        times[id(row)].append(float(dt))
        for row, _ in live:
            row["median_ms"] = 1e3 * statistics.median(times[id(row)])
            row["min_ms"] = 1e3 * min(times[id(row)])
            row["calls"] = len(times[id(row)])
        results.append({"library": "torch", "config": "single process, 1 thread", "backend": "F.sdpa (one call)",
                        "tokens": tokens, "median_ms": 1e3 * ref_s, "max_abs_err": 0.0, "bytes_received_per_call": 0})
    if rank == 0:
        Path(result_file).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


# ---- report -------------------------------------------------------------------------------------------

def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "n/a"


def render(data: dict[str, Any]) -> str:
    lines = [
        "# yunchang vs xdit_fx sequence-parallel attention on CPU",
        "",
        f"{data['date']}, torch {data['torch']}, yunchang {data['yunchang']}, {data['machine']}; 2 gloo ranks x 1 "
        f"thread; B={B}, H={H}, D={D}, fp32, no mask; median of {data['calls']} calls after {data['warmup']} "
        "warm-up (a call's time is the slower rank's); bytes rank 0 receives per call, counted at "
        "torch.distributed's all_to_all_single / batch_isend_irecv.",
        "",
        f"Load before: `{data['uptime_before']}`  ",
        f"Load after: `{data['uptime_after']}`",
        "",
        "| tokens | config | library | backend | median ms | max abs err vs SDPA | KiB received/call | note |",
        "|---:|---|---|---|---:|---:|---:|---|",
    ]
    for r in data["results"]:
        ms = f"{r['median_ms']:.1f}" if "median_ms" in r else "-"
        err = f"{r['max_abs_err']:.1e}" if "max_abs_err" in r else "-"
        kib = f"{r['bytes_received_per_call'] / 1024:.0f}" if "bytes_received_per_call" in r else "-"
        note = r.get("error", "")
        if not note and r.get("max_abs_err", 0) > 1e-3:
            note = "runs, wrong result"
        lines.append(f"| {r['tokens']} | {r['config']} | {r['library']} | `{r['backend']}` | {ms} | {err} | {kib} | "
                     f"{note} |")
    if data.get("conclusion"):
        lines += ["", data["conclusion"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--conclusion", default="", help="a paragraph appended to the markdown")
    ap.add_argument("--render", type=Path, help="rewrite the markdown from this JSON (and --conclusion); run nothing")
    args = ap.parse_args(argv)
    if args.render:
        data = json.loads(args.render.read_text())
        if args.conclusion:
            data["conclusion"] = args.conclusion
            args.render.write_text(json.dumps(data, indent=1) + "\n")
        args.render.with_suffix(".md").write_text(render(data))
        return 0
    try:
        import yunchang
        yc_version = getattr(yunchang, "__version__", "?")
    except ImportError:
        yc_version = "not installed"
    before = uptime()
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "results.json")
        torch.multiprocessing.spawn(worker, args=(os.path.join(tmp, "init"), args.tokens, args.calls, args.warmup,
                                                  result_file), nprocs=WORLD, join=True)
        results = json.loads(Path(result_file).read_text())
    data = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "yunchang": yc_version, "python": sys.version.split()[0],
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "calls": args.calls, "warmup": args.warmup,
            "uptime_before": before, "uptime_after": uptime(), "results": results, "conclusion": args.conclusion}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "yunchang_cpu.json").write_text(json.dumps(data, indent=1) + "\n")
    (args.out_dir / "yunchang_cpu.md").write_text(render(data))
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
