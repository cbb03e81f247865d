"""Sequence-parallel forward of a Flux-architecture transformer.

    xdit-fx run --nproc 2 examples/flux_sequence_parallel.py --plan ulysses=2
    xdit-fx run --nproc 4 examples/flux_sequence_parallel.py --plan ulysses=2,ring=2
    xdit-fx run --nproc 8 examples/flux_sequence_parallel.py --plan pipefusion=2,ring=2,ulysses=2 --grid 16

The last one is PipeFusion with USP inside each stage (the first call of a generation is a warm-up call,
so it matches the single process exactly; 45 s on 2 CPU cores).

With a real checkpoint: FluxTransformer2DModel.from_pretrained("/path/to/FLUX.1-dev", subfolder="transformer").
"""

import argparse

import torch
import torch.distributed as dist

import xdit_fx
from xdit_fx.zoo import build_flux, flux_inputs

parser = argparse.ArgumentParser()
parser.add_argument("--plan", default="ulysses=2")
parser.add_argument("--grid", type=int, default=32, help="packed latent grid side (tokens = grid^2)")
args = parser.parse_args()

xdit_fx.init_distributed()
torch.manual_seed(0)
model = build_flux(num_layers=2, num_single_layers=2, heads=8, head_dim=32, text_dim=64,
                   axes_dims_rope=(8, 12, 12)).eval()
inputs = flux_inputs(args.grid, args.grid, txt=64, text_dim=64)

with torch.no_grad():
    reference = model(**inputs)[0]
    parallel = xdit_fx.parallelize(model, args.plan)
    out = parallel(**inputs)[0]

if dist.get_rank() == 0:
    print(f"plan {args.plan}: max abs diff vs single process {(out - reference).abs().max().item():.2e}")
    print(f"bytes received per axis: {parallel.last_comm}")
    for snapshot in parallel.histories[0].snapshots[1:]:
        print(f"  [{snapshot.name}] {snapshot.summary}")
