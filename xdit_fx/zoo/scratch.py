"""Two more DiTs written from scratch, in styles a user's own model might have.

* ``MHAUViT``: ``nn.MultiheadAttention`` self- and cross-attention (the default ``need_weights=True`` call,
  weights discarded), learned absolute position embedding, U-ViT long skip connections (first half of the
  blocks feeds the second half through ``cat`` + linear), a time token prepended to the sequence.
* ``ManualVideoDiT``: attention written by hand (``softmax(q @ k.transpose(-2, -1) * scale + bias) @ v``),
  3-D (t, h, w) patching with ``Conv3d``, 3-D RoPE on interleaved pairs, a boolean text mask applied with
  ``masked_fill``, text tokens concatenated after the video tokens (joint attention), ``bmm`` with
  ``baddbmm`` in the cross-attention to a reference image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xdit_fx.zoo.core import ZooModel, _randn, _seeded_build

# ------------------------------------------------------------------------------------------------
# MHAUViT
# ------------------------------------------------------------------------------------------------


class _MHABlock(nn.Module):
    def __init__(self, dim: int, heads: int, text_dim: int, skip: bool):
        super().__init__()
        self.skip = nn.Linear(2 * dim, dim) if skip else None
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross = nn.MultiheadAttention(dim, heads, kdim=text_dim, vdim=text_dim, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, text, text_pad, skip=None):
        if self.skip is not None:
            x = self.skip(torch.cat([x, skip], dim=-1))
        h = self.norm1(x)
        a, _ = self.attn(h, h, h)
        x = x + a
        c, _ = self.cross(self.norm2(x), text, text, key_padding_mask=text_pad)
        x = x + c
        return x + self.mlp(self.norm3(x))


class MHAUViT(nn.Module):
    """A U-ViT built on nn.MultiheadAttention: time token + patches, long skips, cross-attention to text."""

    def __init__(self, in_channels=4, dim=32, heads=4, depth=4, patch=2, text_dim=24, max_tokens=256):
        super().__init__()
        self.patch, self.in_channels = patch, in_channels
        self.x_embed = nn.Linear(in_channels * patch * patch, dim)
        self.pos = nn.Parameter(torch.randn(1, max_tokens, dim) * 0.02)
        self.t_embed = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        half = depth // 2
        self.in_blocks = nn.ModuleList([_MHABlock(dim, heads, text_dim, skip=False) for _ in range(half)])
        self.out_blocks = nn.ModuleList([_MHABlock(dim, heads, text_dim, skip=True) for _ in range(depth - half)])
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, in_channels * patch * patch)

    def forward(self, x, t, text, text_mask):
        b, c, hh, ww = x.shape
        p = self.patch
        h, w = hh // p, ww // p
        tokens = x.reshape(b, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * p * p)
        tokens = self.x_embed(tokens) + self.pos[:, : h * w]
        t_tok = self.t_embed(t.float().view(b, 1, 1) / 1000.0)  # [B, 1, dim]
        seq = torch.cat([t_tok, tokens], dim=1)
        pad = ~text_mask.bool()
        skips = []
        for blk in self.in_blocks:
            seq = blk(seq, text, pad)
            skips.append(seq)
        for blk in self.out_blocks:
            seq = blk(seq, text, pad, skips.pop())
        out = self.proj(self.norm(seq[:, 1:]))
        out = out.reshape(b, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, hh, ww)


def _mha_uvit_inputs(uneven: bool = False, seed: int = 0, batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    hw = (6, 10) if uneven else (8, 8)
    n_txt = 7 if uneven else 8
    mask = (torch.arange(n_txt) < n_txt - 2).expand(batch, n_txt).clone()
    return {"x": _randn(g, batch, 4, *hw), "t": torch.rand(batch, generator=g) * 1000,
            "text": _randn(g, batch, n_txt, 24), "text_mask": mask}


# ------------------------------------------------------------------------------------------------
# ManualVideoDiT
# ------------------------------------------------------------------------------------------------


def _rope_3d(f: int, h: int, w: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved-pair 3-D RoPE tables [f*h*w, head_dim/2] (frames, rows, columns share the pairs)."""
    n = head_dim // 2
    parts = [n - 2 * (n // 3), n // 3, n // 3]
    grids = torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij")
    angles = []
    for pos, k in zip(grids, parts):
        freqs = 1.0 / (100.0 ** (torch.arange(k, dtype=torch.float32) / max(k, 1)))
        angles.append(pos.reshape(-1, 1).float() * freqs)
    a = torch.cat(angles, dim=-1)
    return a.cos(), a.sin()


def _rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x = x.unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


class _ManualBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.qkv_txt = nn.Linear(dim, 3 * dim)
        self.out, self.out_txt = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.q_ref, self.kv_ref, self.out_ref = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.norm, self.norm_txt, self.norm_ref = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))
        self.mod = nn.Linear(dim, 2 * dim)

    def forward(self, x, txt, ref, cond, cos, sin, keep):
        b, n, d = x.shape
        m = txt.shape[1]
        scale, shift = self.mod(F.silu(cond)).unsqueeze(1).chunk(2, dim=-1)
        hx = self.norm(x) * (1 + scale) + shift
        q, k, v = self.qkv(hx).view(b, n, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        tq, tk, tv = self.qkv_txt(self.norm_txt(txt)).view(b, m, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        q, k = _rope_pairs(q, cos, sin), _rope_pairs(k, cos, sin)
        q, k, v = torch.cat([q, tq], dim=2), torch.cat([k, tk], dim=2), torch.cat([v, tv], dim=2)  # video first
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.hd)
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        o = F.dropout(scores.softmax(dim=-1), p=0.1, training=self.training) @ v  # [B, H, n + m, hd]
        o = o.transpose(1, 2).reshape(b, n + m, d)
        x = x + self.out(o[:, :n])
        txt = txt + self.out_txt(o[:, n:])
        # cross-attention to reference-image tokens with bmm / baddbmm over folded heads
        rq = self.q_ref(self.norm_ref(x)).view(b, n, self.heads, self.hd).transpose(1, 2).reshape(b * self.heads, n, self.hd)
        rk, rv = self.kv_ref(ref).view(b, -1, 2, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        rk, rv = rk.reshape(b * self.heads, -1, self.hd), rv.reshape(b * self.heads, -1, self.hd)
        bias = torch.zeros(1, 1, rk.shape[1], dtype=x.dtype, device=x.device)
        w = torch.baddbmm(bias, rq, rk.transpose(1, 2), beta=1.0, alpha=self.hd ** -0.5)
        ro = torch.bmm(torch.softmax(w, dim=-1), rv).view(b, self.heads, n, self.hd).transpose(1, 2).reshape(b, n, d)
        x = x + self.out_ref(ro)
        return x + self.ff(x), txt


class ManualVideoDiT(nn.Module):
    """A video DiT with hand-written attention: Conv3d patching, 3-D RoPE, joint video+text attention."""

    def __init__(self, in_channels=4, dim=48, heads=4, depth=2, patch=(1, 2, 2), text_dim=16, ref_dim=8):
        super().__init__()
        self.patch, self.in_channels, self.heads = patch, in_channels, heads
        self.x_embed = nn.Conv3d(in_channels, dim, kernel_size=patch, stride=patch)
        self.txt_embed, self.ref_embed = nn.Linear(text_dim, dim), nn.Linear(ref_dim, dim)
        self.t_embed = nn.Sequential(nn.Linear(32, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList([_ManualBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, in_channels * math.prod(patch))

    def forward(self, video, timestep, text, text_mask, reference):
        b, c, f, hh, ww = video.shape
        pt, ph, pw = self.patch
        t, h, w = f // pt, hh // ph, ww // pw
        x = self.x_embed(video).flatten(2).transpose(1, 2)  # [B, t*h*w, dim]
        freqs = torch.exp(-math.log(10000.0) * torch.arange(16, dtype=torch.float32) / 16)
        tf = timestep.float()[:, None] * freqs
        cond = self.t_embed(torch.cat([tf.cos(), tf.sin()], dim=-1))
        cos, sin = _rope_3d(t, h, w, x.shape[-1] // self.heads)
        keep = torch.cat([torch.ones(b, x.shape[1], dtype=torch.bool), text_mask.bool()], dim=1)
        txt, ref = self.txt_embed(text), self.ref_embed(reference)
        for blk in self.blocks:
            x, txt = blk(x, txt, ref, cond, cos, sin, keep)
        out = self.proj(self.norm(x)).view(b, t, h, w, c, pt, ph, pw)
        return out.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, c, f, hh, ww)


def _manual_video_inputs(uneven: bool = False, seed: int = 0, batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    f, hh, ww = (3, 6, 10) if uneven else (2, 8, 8)  # 45 vs 32 video tokens
    n_txt = 7 if uneven else 8
    mask = (torch.arange(n_txt) < n_txt - 3).expand(batch, n_txt).clone()
    return {"video": _randn(g, batch, 4, f, hh, ww), "timestep": torch.rand(batch, generator=g) * 1000,
            "text": _randn(g, batch, n_txt, 16), "text_mask": mask, "reference": _randn(g, batch, 5, 8)}


SCRATCH_ENTRIES = [
    ZooModel("scratch_mha_uvit", _seeded_build(MHAUViT), _mha_uvit_inputs, heads=4, source="xdit_fx.zoo.MHAUViT",
             note="nn.MultiheadAttention self+cross, U-ViT long skips, time token, learned positions"),
    ZooModel("scratch_manual_video", _seeded_build(ManualVideoDiT), _manual_video_inputs, heads=4,
             source="xdit_fx.zoo.ManualVideoDiT",
             note="hand-written softmax(q k^T) v, masked_fill mask, bmm/baddbmm, Conv3d patching, 3-D RoPE"),
]
