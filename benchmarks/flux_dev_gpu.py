"""One-GPU step of a FLUX.1-dev-sized transformer, and the per-rank programs of ulysses/ring on that one GPU.

Prepared for a CUDA machine (not run on the CPU-only machine it was written on; `--tiny --device cpu` is its
smoke test there):

    python benchmarks/flux_dev_gpu.py                        # bf16, 4096 + 512 tokens, every configuration
    python benchmarks/flux_dev_gpu.py --only diffusers-eager,xdit-compile --steps 3
    python benchmarks/flux_dev_gpu.py --tiny --device cpu --dtype fp32 --steps 1   # smoke test

Model: diffusers' FluxTransformer2DModel with FLUX.1-dev's config (19 double + 38 single blocks, 24 heads x 128,
joint attention dim 4096, pooled 768, guidance embedding, RoPE axes 16/56/56), random weights, bf16; one
1024 x 1024 image: 4096 image + 512 text tokens. Configurations:

* ``diffusers-eager``, ``diffusers-compile`` (``torch.compile(model)``): the step as diffusers runs it;
* ``xdit-compile``: ``xdit_fx.parallelize(model, Plan(compile=True))`` on one process (the serial plan:
  capture, passes, Inductor);
* ``sim-ulysses=N`` / ``sim-ring=N`` (N = 2, 4): the per-rank program of that plan, rank 0 of a simulated
  world of N ranks on this one GPU: torch's ``fake`` process group, with every collective xdit_fx calls
  replaced by a local copy of the same bytes (an all-to-all copies its send buffer into its receive buffer, a
  ring step copies the K/V it sends into what it receives, an all-gather copies its input N times). Outputs
  are not the model's (each rank sees its own chunks again); the time is the compute and the copies of one
  rank's program, to set against 1/N of the one-GPU step.

Per configuration: ``--warmup`` untimed steps (compiles), then ``--steps`` timed steps with CUDA events
(median). The FLOP floor: 2 x (multiply-adds of every linear on its tokens) + 4 x L^2 x D per head and attention;
about 84 TFLOP per step for this shape. Results: ``<out-dir>/flux_dev_gpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
TINY = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))
CONFIGS = ["diffusers-eager", "diffusers-compile", "xdit-compile", "sim-ulysses=2", "sim-ring=2", "sim-ulysses=4",
           "sim-ring=4"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build(cfg: dict, device: str, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(**cfg)
    return model.to(dtype).eval()


def inputs(cfg: dict, grid: int, txt: int, device: str, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(grid, grid, 3)
    ids[..., 1] = torch.arange(grid, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(grid, dtype=torch.float32)[None, :]
    return {"hidden_states": torch.randn(1, grid * grid, cfg["in_channels"], generator=g).to(device, dtype),
            "encoder_hidden_states": torch.randn(1, txt, cfg["joint_attention_dim"], generator=g).to(device, dtype),
            "pooled_projections": torch.randn(1, cfg["pooled_projection_dim"], generator=g).to(device, dtype),
            "timestep": torch.full((1,), 0.5, device=device, dtype=dtype),
            "guidance": torch.full((1,), 3.5, device=device, dtype=dtype),
            "img_ids": ids.reshape(-1, 3).to(device), "txt_ids": torch.zeros(txt, 3, device=device),
            "return_dict": False}


def flop_floor(cfg: dict, tokens: int) -> float:
    """FLOPs of one step: the linears of the blocks (2 x in x out per token) and attention (4 L^2 D per head)."""
    h = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    double = 2 * (4 * h * h + 2 * 4 * h * h + 6 * h * h) * tokens  # qkv+out, MLP 4x, adaLN is per sample (small)
    single = 2 * (3 * h * h + 4 * h * h + 5 * h * h) * tokens      # qkv, MLP in, out over [attn, MLP]
    attn = 4 * tokens * tokens * h
    return cfg["num_layers"] * (double + attn) + cfg["num_single_layers"] * (single + attn)


@contextlib.contextmanager
def simulated_collectives():
    """Every torch.distributed collective xdit_fx calls, as a local copy of the same bytes (fake group)."""
    saved = {name: getattr(dist, name) for name in ("all_to_all_single", "all_gather", "batch_isend_irecv",
                                                     "all_reduce", "broadcast", "barrier")}

    def all_to_all_single(recv, send, *a, **k):
        recv.copy_(send)

    def all_gather(parts, x, *a, **k):
        for p in parts:
            p.copy_(x)

    def batch_isend_irecv(ops):
        sends = [op.tensor for op in ops if op.op is dist.isend]
        recvs = [op.tensor for op in ops if op.op is dist.irecv]
        for s, r in zip(sends, recvs):
            r.copy_(s)
        return []

    dist.all_to_all_single, dist.all_gather, dist.batch_isend_irecv = all_to_all_single, all_gather, batch_isend_irecv
    dist.all_reduce = dist.broadcast = dist.barrier = lambda *a, **k: None
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def runner(config: str, model, device: str):
    """(callable step, context to run it in) for a configuration."""
    import xdit_fx

    if config == "diffusers-eager":
        return model, contextlib.nullcontext()
    if config == "diffusers-compile":
        return torch.compile(model), contextlib.nullcontext()
    if config == "xdit-compile":
        return xdit_fx.parallelize(model, xdit_fx.Plan(compile=True)), contextlib.nullcontext()
    plan = config.removeprefix("sim-")
    world = int(plan.split("=")[1])
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    import os

    os.environ.update(RANK="0", WORLD_SIZE=str(world), LOCAL_RANK="0")
    return xdit_fx.parallelize(model, f"{plan},compile=1"), simulated_collectives()


def time_steps(step, args_in: dict, ctx, warmup: int, steps: int, device: str) -> list[float]:
    times = []
    with torch.no_grad(), ctx:
        for i in range(warmup + steps):
            if device.startswith("cuda"):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step(**args_in)
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                step(**args_in)
                ms = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                times.append(ms)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--tiny", action="store_true", help="a small model and 8 x 8 + 8 tokens (smoke test)")
    ap.add_argument("--only", default=",".join(CONFIGS))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    cfg, grid, txt = (TINY, 8, 8) if args.tiny else (FLUX_DEV, 64, 512)
    dtype = DTYPES[args.dtype]
    floor = flop_floor(cfg, grid * grid + txt)
    rows: list[dict[str, Any]] = []
    for config in args.only.split(","):
        torch._dynamo.reset()
        model = build(cfg, args.device, dtype)
        x = inputs(cfg, grid, txt, args.device, dtype)
        try:
            step, ctx = runner(config, model, args.device)
            ms = time_steps(step, x, ctx, args.warmup, args.steps, args.device)
            med = statistics.median(ms)
            world = int(config.split("=")[1]) if config.startswith("sim-") else 1
            rows.append({"config": config, "ms": med, "min_ms": min(ms), "world": world,
                         "tflops": floor / world / (med / 1e3) / 1e12})
        except Exception as e:  # one configuration failing must not lose the others' numbers
            rows.append({"config": config, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
        print(rows[-1], flush=True)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    data = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": device_name,
            "torch": torch.__version__, "dtype": args.dtype, "tiny": args.tiny, "tokens": [grid * grid, txt],
            "flop_floor": floor, "rows": rows}
    out = Path(args.out_dir)
    stem = "flux_dev_gpu" + ("_tiny" if args.tiny else "")
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1))
    one = next((r["ms"] for r in rows if r.get("config") == "diffusers-eager" and "ms" in r), None)
    lines = [f"# FLUX.1-dev-sized step on one device ({device_name}, {args.dtype}, {grid * grid} + {txt} tokens)", "",
             f"{data['when']}, torch {torch.__version__}; FLOP floor {floor / 1e12:.1f} TFLOP per step.", "",
             "| config | ms/step (median) | min | TFLOP/s of the floor (per rank) | vs 1/N of diffusers eager |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | fails: {r['error']} | | | |")
            continue
        share = f"{r['ms'] / (one / r['world']):.2f}x" if one else "-"
        lines.append(f"| {r['config']} | {r['ms']:.1f} | {r['min_ms']:.1f} | {r['tflops']:.0f} | {share} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
