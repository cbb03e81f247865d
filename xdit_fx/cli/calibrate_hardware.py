"""`xdit-fx calibrate-hardware`: measure this machine and write a hardware profile for the plan cost model.

Two processes (torchrun's launcher, one torch thread each unless OMP_NUM_THREADS says otherwise: how
`xdit-fx run` starts ranks) measure at the same time, so the compute rates are those of ranks that share the
machine as a parallel run does:

Each size's time per call is the fastest of --repeats batches of calls of at least 0.15 s (see `timed`).

* GEMM: linears of the sizes a DiT runs (tokens x width x width), fitted ``t = overhead + flops / rate``;
* attention: SDPA on [1, 8, L, 64] for L = 128..2048, fitted the same way;
* memory: elementwise adds of 1e3..4e6 elements, fitted ``t = overhead + bytes / bandwidth``; views;
* act: gelu, silu, softmax and layer_norm over the same sizes (their own curve: transcendental math);
* host: per node of a GraphModule of tiny ops beyond the same ops called directly (``node_overhead``), and per
  call of a runtime custom op beyond its kernels (``runtime_op_overhead``);
* the link: ping-pong send/recv of 1 KiB..16 MiB between the two ranks, fitted ``latency + bytes / bandwidth``
  (one way), over gloo on CPU or NCCL on CUDA; and how much of a P2P transfer hides behind a matmul running
  meanwhile (``ring_overlap``).

Every value is written with its source (the measurement, its sizes and the fit's worst relative residual).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Callable

import torch

SOURCE = "measured by `xdit-fx calibrate-hardware` on {host} ({when}, {threads} thread(s) per rank, 2 ranks)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--name", default="cpu-gloo", help="profile name (default cpu-gloo)")
    p.add_argument("--memory-gib", type=float, default=None,
                   help="usable memory per rank (default: the GPU's, or the machine's RAM / 2)")
    p.add_argument("--repeats", type=int, default=3, help="batches per size; the fastest counts (default 3)")


def timed(fn: Callable[[], object], repeats: int, sync: Callable[[], None], batch_s: float = 0.15,
          agree: Callable[[int], int] | None = None) -> float:
    """Seconds per call: `fn` runs in batches of at least `batch_s` seconds (so that every size sees the
    machine's contention over the same stretch of time, as a model's forward does), and the fastest of
    `repeats` batches counts (other jobs on a shared machine only ever add time)."""
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - t0, 1e-7)
    n = max(1, int(batch_s / once))
    if agree is not None:  # calls that talk to the other rank: both must make the same number
        n = agree(n)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def monotone(points: list[tuple[float, float]]) -> list[list[float]]:
    """Sorted by size, each time capped by every larger size's time (a larger op of the same kind is never
    faster: a time above that is an interruption)."""
    pts = sorted(points)
    out: list[list[float]] = []
    cap = float("inf")
    for x, t in reversed(pts):
        cap = min(cap, t)
        out.append([x, cap])
    return out[::-1]


def fit_affine(xs: list[float], ts: list[float]) -> tuple[float, float, float]:
    """(intercept >= 0, slope, worst relative residual) of t = a + b x by least squares on relative error."""
    # weight 1/t so that small and large sizes count alike
    w = [1.0 / t for t in ts]
    sw = sum(wi * wi for wi in w)
    sx = sum(wi * wi * x for wi, x in zip(w, xs))
    sxx = sum(wi * wi * x * x for wi, x in zip(w, xs))
    st = sum(wi * wi * t for wi, t in zip(w, ts))
    sxt = sum(wi * wi * x * t for wi, x, t in zip(w, xs, ts))
    det = sw * sxx - sx * sx
    b = (sw * sxt - sx * st) / det
    a = (st - b * sx) / sw
    if a < 0:
        a, b = 0.0, sxt / sxx
    worst = max(abs(a + b * x - t) / t for x, t in zip(xs, ts))
    return a, b, worst


def _compute(dev: torch.device, repeats: int, sync) -> dict:
    gemm_x, gemm_t = [], []
    for m in (64, 256, 1024, 4096, 16384):
        for k in (256, 512, 2048):
            if 2.0 * m * k * k > 4e10:  # seconds per call on a CPU; larger sizes scale from the last point
                continue
            a, w = torch.randn(m, k, device=dev), torch.randn(k, k, device=dev)
            gemm_x.append(2.0 * m * k * k)
            gemm_t.append(timed(lambda: torch.nn.functional.linear(a, w), repeats, sync))
    att_x, att_t = [], []
    for length in (64, 128, 256, 512, 1024, 2048):
        q = torch.randn(1, 8, length, 64, device=dev)
        att_x.append(4.0 * 8 * length * length * 64)
        att_t.append(timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), repeats, sync))
    mem_x, mem_t = [], []
    for n in (100, 1_000, 10_000, 100_000, 300_000, 1_000_000, 4_000_000, 16_000_000):
        x = torch.randn(n, device=dev)
        mem_x.append(3.0 * n * 4)
        mem_t.append(timed(lambda: x + x, repeats, sync))
    act_x, act_t = [], []
    for n in (1_024, 16_384, 131_072, 1_048_576, 4_194_304):
        x = torch.randn(n // 256, 256, device=dev)
        act_x.append(2.0 * n * 4)
        act_t.append(sum(timed(lambda: f(x), repeats, sync) for f in ACT_MIX) / len(ACT_MIX))
    v = torch.randn(64, 64, device=dev)
    view_t = timed(lambda: [v.view(4096) for _ in range(100)], repeats, sync) / 100
    return {"gemm": (gemm_x, gemm_t), "attn": (att_x, att_t), "mem": (mem_x, mem_t), "act": (act_x, act_t),
            "view": view_t, "node": _node_overhead(dev, repeats, sync)}


#: the `act` class's representative ops (plan_facts.ACT_OPS): exact and tanh gelu, silu, softmax, layer_norm
ACT_MIX = (torch.nn.functional.gelu, lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
           torch.nn.functional.silu, lambda x: torch.softmax(x, -1),
           lambda x: torch.nn.functional.layer_norm(x, x.shape[-1:]))

#: tiny ops of the kinds a captured graph holds (elementwise, activation, view, small linear)
_TINY_OPS = ("neg", "gelu", "view", "linear", "mul", "silu", "transpose", "add")


def _tiny_graph(nodes: int):
    """A GraphModule of `nodes` tiny ops on a [4, 4] tensor, and the same ops as a plain Python list."""
    import torch.fx as fx

    F = torch.nn.functional
    calls = {"neg": lambda y, w: torch.neg(y), "gelu": lambda y, w: F.gelu(y), "view": lambda y, w: y.view(4, 4),
             "linear": lambda y, w: F.linear(y, w), "mul": lambda y, w: torch.mul(y, 0.5),
             "silu": lambda y, w: F.silu(y), "transpose": lambda y, w: y.transpose(0, 1), "add": lambda y, w: y + w}
    g = fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    y = x
    for i in range(nodes):
        op = _TINY_OPS[i % len(_TINY_OPS)]
        if op == "view":
            y = g.call_method("view", (y, 4, 4))
        elif op == "transpose":
            y = g.call_method("transpose", (y, 0, 1))
        elif op == "linear":
            y = g.call_function(F.linear, (y, w))
        elif op == "add":
            y = g.call_function(torch.add, (y, w))
        else:
            y = g.call_function({"neg": torch.neg, "gelu": F.gelu, "mul": torch.mul, "silu": F.silu}[op],
                                (y, 0.5) if op == "mul" else (y,))
    g.output(y)
    return fx.GraphModule(torch.nn.Module(), g), [calls[_TINY_OPS[i % len(_TINY_OPS)]] for i in range(nodes)]


def _node_overhead(dev: torch.device, repeats: int, sync, nodes: int = 400) -> dict:
    """Host seconds per executed node of a GraphModule, beyond the same ops called one by one: a graph of
    `nodes` tiny ops (so their kernels take no time) run through its generated forward, per node, minus the
    same ops in a plain loop, per op. Both are reported."""
    gm, ops = _tiny_graph(nodes)
    x, w = torch.randn(4, 4, device=dev), torch.randn(4, 4, device=dev)

    def loop():
        y = x
        for f in ops:
            y = f(y, w)
        return y
    graph = timed(lambda: gm(x, w), repeats, sync) / nodes
    bare = timed(loop, repeats, sync) / nodes
    return {"graph": graph, "bare": bare}


def _runtime_op_overhead(dev: torch.device, repeats: int, sync) -> dict:
    """Host seconds per call of a runtime op beyond its kernels: `xdit_fx::shard` (a torch.library custom op
    the sequence-parallel rewrite inserts; no communication) on a tiny tensor, minus the narrow + clone it
    runs."""
    import torch.distributed as dist

    from xdit_fx.ops.collectives import shard

    group = dist.group.WORLD.group_name
    n, r = dist.get_world_size(), dist.get_rank()
    x = torch.randn(8 * n, 4, device=dev)
    op = timed(lambda: shard(x, 0, 8 * n, group), repeats, sync)
    bare = timed(lambda: x.narrow(0, 8 * r, 8).clone(), repeats, sync)
    return {"op": op, "bare": bare}


def _agree(n: int) -> int:
    import torch.distributed as dist

    t = torch.tensor([n], dtype=torch.int64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def _round_trip(buf: torch.Tensor, rank: int) -> None:
    """Rank 0 sends `buf` to rank 1 and receives it back (one round trip between the two ranks)."""
    import torch.distributed as dist

    if rank == 0:
        dist.send(buf, 1)
        dist.recv(buf, 1)
    else:
        dist.recv(buf, 0)
        dist.send(buf, 0)


def _link(dev: torch.device, repeats: int, sync) -> dict:
    import torch.distributed as dist

    rank = dist.get_rank()
    xs, ts = [], []
    for n in (16, 256, 4096, 65536, 1 << 18, 1 << 20, 4 << 20, 16 << 20):
        buf = torch.zeros(n, device=dev)

        dist.barrier()
        xs.append(n * 4.0)
        ts.append(timed(lambda: _round_trip(buf, rank), repeats, sync, agree=_agree) / 2)
    return {"p2p": (xs, ts)}


def _overlap(dev: torch.device, repeats: int, sync) -> float:
    """Fraction of a P2P exchange hidden behind a matmul started after it."""
    import torch.distributed as dist

    peer = 1 - dist.get_rank()
    a = torch.randn(512, 1024, device=dev)
    w = torch.randn(1024, 1024, device=dev)
    send, recv = torch.randn(1 << 20, device=dev), torch.empty(1 << 20, device=dev)

    def exchange():
        for r in dist.batch_isend_irecv([dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, recv, peer)]):
            r.wait()

    def compute():
        for _ in range(4):
            torch.nn.functional.linear(a, w)

    def both():
        reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, recv, peer)])
        compute()
        for r in reqs:
            r.wait()
    t_comm, t_comp, t_both = (timed(f, repeats, sync, agree=_agree) for f in (exchange, compute, both))
    return max(0.0, min(1.0, (t_comm + t_comp - t_both) / max(min(t_comm, t_comp), 1e-9)))


def _sync_latency(dev: torch.device, repeats: int, sync) -> float:
    """Extra seconds per message exchanged between stretches of compute (a model's pattern: compute, then a
    collective), over the same compute alone: where ranks share cores with other jobs, the peer may have to
    be scheduled again before it answers. Per message of a round trip."""
    import torch.distributed as dist

    rank = dist.get_rank()
    a, w = torch.randn(256, 512, device=dev), torch.randn(512, 512, device=dev)
    buf = torch.zeros(1024, device=dev)

    def compute():
        for _ in range(8):
            torch.nn.functional.linear(a, w)

    def step():
        compute()
        _round_trip(buf, rank)

    t_step = timed(step, repeats, sync, agree=_agree)
    t_compute = timed(compute, repeats, sync, agree=_agree)
    t_pp = timed(lambda: _round_trip(buf, rank), repeats, sync, agree=_agree)
    return max(0.0, (t_step - t_compute - t_pp) / 2)


def _solo_speedup(dev: torch.device, repeats: int, sync) -> float:
    """How much faster one rank computes while the other waits in a receive (PipeFusion's fill and drain)
    than while both compute: 1 where each rank has a device of its own, more where ranks share CPU cores."""
    import torch.distributed as dist

    rank = dist.get_rank()
    a, w = torch.randn(1024, 512, device=dev), torch.randn(512, 512, device=dev)
    flag = torch.zeros(1, device=dev)

    def work():
        for _ in range(20):
            torch.nn.functional.linear(a, w)

    both = timed(work, repeats, sync, agree=_agree)
    solo = []
    for _ in range(repeats):
        dist.barrier()
        if rank == 0:
            t0 = time.perf_counter()
            work()
            sync()
            solo.append(time.perf_counter() - t0)
            dist.send(flag, 1)
        else:
            dist.recv(flag, 0)
    t = torch.tensor([min(solo) if solo else 0.0], dtype=torch.float64, device=dev)
    dist.broadcast(t, 0)
    return max(1.0, both / float(t))


def calibrate_worker(repeats: int) -> dict:
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if cuda else "gloo")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    with torch.no_grad():
        out = {"compute": _compute(dev, repeats, sync), "link": _link(dev, repeats, sync),
               "overlap": _overlap(dev, repeats, sync), "solo_speedup": _solo_speedup(dev, repeats, sync),
               "sync_latency": _sync_latency(dev, repeats, sync),
               "runtime_op": _runtime_op_overhead(dev, repeats, sync),
               "threads": torch.get_num_threads(), "cuda": cuda,
               "memory": torch.cuda.get_device_properties(dev).total_memory if cuda else None}
    dist.barrier()
    dist.destroy_process_group()
    return out


def build_profile(raw: dict, name: str, memory: float) -> dict:
    """The profile JSON from rank 0's measurements."""
    c = raw["compute"]
    src = SOURCE.format(host=platform.node() or "this machine", when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                        threads=raw["threads"])
    ga, gb, gw = fit_affine(*c["gemm"])
    aa, ab, aw = fit_affine(*c["attn"])
    ma, mb, mw = fit_affine(*c["mem"])
    la, lb, lw = fit_affine(*raw["link"]["p2p"])
    link = {"bandwidth": 1.0 / lb, "latency": la, "points": monotone(list(zip(*raw["link"]["p2p"]))),
            "sync": raw.get("sync_latency", 0.0)}
    curves = {k: monotone(list(zip(*c[k]))) for k in ("gemm", "attn", "mem", "act")}
    node = c["node"]
    rt = raw["runtime_op"]
    return {
        "name": name, "gemm_rate": 1.0 / gb, "attn_rate": 1.0 / ab, "mem_bw": 1.0 / mb, "op_overhead": ma,
        "view_overhead": c["view"], "memory": memory, "intra": link, "inter": link, "gpus_per_node": 2,
        "ring_overlap": raw["overlap"], "gemm_overhead": max(0.0, ga - ma), "attn_overhead": max(0.0, aa - ma),
        "curves": curves, "solo_speedup": raw["solo_speedup"],
        "node_overhead": max(0.0, node["graph"] - node["bare"]), "runtime_op_overhead": max(0.0, rt["op"] - rt["bare"]),
        "host_async": bool(raw["cuda"]),
        "sources": {
            "gemm_rate": f"{src}: linear [M,K]x[K,K], M 64..4096, K 256..2048, fit worst residual {gw:.0%}",
            "attn_rate": f"{src}: SDPA [1,8,L,64], L 128..2048, fit worst residual {aw:.0%}",
            "mem_bw": f"{src}: elementwise add, 1e3..4e6 fp32 elements, fit worst residual {mw:.0%}",
            "op_overhead": f"{src}: intercept of the elementwise fit",
            "view_overhead": f"{src}: median of 100 views",
            "intra": f"{src}: send/recv ping-pong 1 KiB..16 MiB, fit worst residual {lw:.0%}",
            "inter": "no second node here: the intra-node link",
            "intra.sync": f"{src}: round trips of 4 KiB after 8 linears 256x512x512 each, minus the compute and "
                          f"the bare round trip, per message",
            "ring_overlap": f"{src}: isend/irecv of 4 MiB beside 4 linears 512x1024x1024",
            "curves": f"{src}: per size, the fastest of --repeats batches of >= 0.15 s, capped by larger sizes' times (interpolated log-log; used instead of the fits)",
            "solo_speedup": f"{src}: 20 linears 1024x512x512 on rank 0 while rank 1 waits in recv, vs both computing",
            "memory": "--memory-gib, or the device's / half the machine's RAM",
            "curves.act": f"{src}: per size, the mean of gelu (exact, tanh), silu, softmax and layer_norm on "
                          f"[n/256, 256] fp32, 1e3..4e6 elements",
            "node_overhead": f"{src}: a GraphModule of 400 tiny ops (neg, gelu, view, linear, mul, silu, transpose, "
                             f"add on [4,4]) through its forward, {node['graph'] * 1e6:.2f} us per node, minus the "
                             f"same ops in a Python loop, {node['bare'] * 1e6:.2f} us per op",
            "runtime_op_overhead": f"{src}: the xdit_fx::shard custom op on [16,4], {rt['op'] * 1e6:.2f} us per "
                                   f"call, minus the narrow + clone it runs, {rt['bare'] * 1e6:.2f} us",
            "host_async": "CUDA: the host enqueues kernels ahead of the device" if raw["cuda"] else
                          "CPU ranks: host and compute share the core",
        }}


def run(args: argparse.Namespace) -> int:
    from xdit_fx.runtime.launch import launch

    results = launch(calibrate_worker, 2, (args.repeats,))
    raw = results[0]
    if args.memory_gib is not None:
        memory = args.memory_gib * 2 ** 30
    elif raw["memory"]:
        memory = float(raw["memory"])
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2
    profile = build_profile(raw, args.name, memory)
    with open(args.out, "w") as f:
        json.dump(profile, f, indent=1)
    with open(args.out + ".raw.json", "w") as f:
        json.dump(raw, f)
    print(f"xdit-fx calibrate-hardware: {args.name} -> {args.out}")
    for key in ("gemm_rate", "attn_rate", "mem_bw"):
        print(f"  {key}: {profile[key] / 1e9:.3g} G/s")
    print(f"  node_overhead {profile['node_overhead'] * 1e6:.2f} us, runtime_op_overhead "
          f"{profile['runtime_op_overhead'] * 1e6:.2f} us")
    print(f"  op_overhead {profile['op_overhead'] * 1e6:.1f} us, link {profile['intra']['bandwidth'] / 1e9:.3g} GB/s, "
          f"latency {profile['intra']['latency'] * 1e6:.1f} us, ring_overlap {profile['ring_overlap']:.2f}")
    return 0
