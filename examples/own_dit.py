"""Your own DiT (not a diffusers class) parallelizes the same way: nothing to register.

    xdit-fx run --nproc 2 examples/own_dit.py
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import xdit_fx


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d))
        return x + self.mlp(self.norm2(x))


class TinyDiT(nn.Module):
    def __init__(self, dim=128, heads=4, depth=4, tokens=1000):
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.head = nn.Linear(dim, 16)

    def forward(self, x):
        x = self.embed(x) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(x)


xdit_fx.init_distributed()
torch.manual_seed(0)
model = TinyDiT().eval()
x = torch.randn(1, 1000, 16)
with torch.no_grad():
    ref = model(x)
    out = xdit_fx.parallelize(model, xdit_fx.Plan(ring_degree=dist.get_world_size()))(x)
if dist.get_rank() == 0:
    print(f"max abs diff vs single process: {(out - ref).abs().max().item():.2e}")
