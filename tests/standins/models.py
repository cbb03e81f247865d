"""From-scratch DiT-style models written the way published DiT code is written: attention through flash-attn /
xformers, sequences packed with cu_seqlens, a view after the attention's transpose. Used by
tests/test_real_code.py (stand-in libraries: tests/standins)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HEADS, HEAD_DIM = 4, 8
DIM = HEADS * HEAD_DIM


class Block(nn.Module):
    """Pre-norm attention + MLP; `attend(q, k, v)` gets q, k, v [B, S, H, D] (or the packed forms)."""

    def __init__(self, attend):
        super().__init__()
        self.attend = attend
        self.norm1 = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.norm2 = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x, extra=None):
        shape = x.shape
        qkv = self.qkv(self.norm1(x)).view(*shape[:-1], 3, HEADS, HEAD_DIM)
        o = self.attend(qkv, extra)
        x = x + self.proj(o.reshape(shape))
        return x + self.mlp(self.norm2(x))


class Stack(nn.Module):
    def __init__(self, attends, in_dim=8):
        super().__init__()
        self.proj_in = nn.Linear(in_dim, DIM)
        self.blocks = nn.ModuleList([Block(a) for a in attends])
        self.proj_out = nn.Linear(DIM, in_dim)

    def forward(self, x, extra=None):
        h = self.proj_in(x)
        for blk in self.blocks:
            h = blk(h, extra)
        return self.proj_out(h)


# ---- flash-attn ------------------------------------------------------------------------------------------

def flash_dense(qkv, extra):  # [B, S, 3, H, D]
    from flash_attn import flash_attn_func
    q, k, v = qkv.unbind(2)
    b, s = q.shape[:2]
    return flash_attn_func(q, k, v).view(b, s, DIM)  # a view: the output is contiguous [B, S, H, D]


def flash_qkvpacked_causal(qkv, extra):
    from flash_attn import flash_attn_qkvpacked_func
    return flash_attn_qkvpacked_func(qkv, causal=True, softmax_scale=0.3)


def flash_kvpacked(qkv, extra):
    from flash_attn import flash_attn_kvpacked_func
    return flash_attn_kvpacked_func(qkv[:, :, 0], qkv[:, :, 1:])


def flash_varlen(qkv, cu_seqlens):  # [T, 3, H, D], sequences packed along T
    from flash_attn import flash_attn_varlen_func
    q, k, v = qkv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, 16, 16)


def flash_varlen_qkvpacked_causal(qkv, cu_seqlens):
    from flash_attn import flash_attn_varlen_qkvpacked_func
    return flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, 16, causal=True)


# ---- xformers --------------------------------------------------------------------------------------------

def xformers_dense(qkv, bias):
    import xformers.ops as xops
    q, k, v = qkv.unbind(2)
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias)  # a tensor bias [B, H, S, S]


def xformers_block_diagonal(seqlens, causal=False):
    def attend(qkv, extra):  # [1, total, 3, H, D]: the prompts' tokens side by side (PixArt's batch folding)
        import xformers.ops as xops
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask
        q, k, v = qkv.unbind(2)
        mask = BlockDiagonalMask.from_seqlens(seqlens)
        return xops.memory_efficient_attention(q, k, v, attn_bias=mask.make_causal() if causal else mask)
    return attend


# ---- SDPA with a view after the transpose (issue point 5) --------------------------------------------------

def sdpa_view(qkv, extra):
    b, n = qkv.shape[:2]
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).view(b, n, DIM)


def cases():
    """name -> (model, inputs, attention sites the model calls)."""
    torch.manual_seed(0)
    x = torch.randn(2, 21, 8)
    packed = torch.randn(37, 8)  # three sequences of 9, 16 and 12 tokens
    cu = torch.tensor([0, 9, 25, 37], dtype=torch.int32)
    folded = torch.randn(1, 30, 8)
    out = {
        "flash_dense": (Stack([flash_dense, flash_dense]), {"x": x}),
        "flash_packed": (Stack([flash_qkvpacked_causal, flash_kvpacked]), {"x": x}),
        "flash_varlen": (Stack([flash_varlen, flash_varlen_qkvpacked_causal]), {"x": packed, "extra": cu}),
        "xformers_bias": (Stack([xformers_dense, xformers_dense]), {"x": x, "extra": torch.randn(2, HEADS, 21, 21)}),
        "xformers_block_diagonal": (Stack([xformers_block_diagonal([7, 11, 12]),
                                           xformers_block_diagonal([7, 11, 12], causal=True)]), {"x": folded}),
        "sdpa_view": (Stack([sdpa_view, sdpa_view]), {"x": x}),
    }
    return out


# ---- graph breaks (issue point 1): a RoPE helper that loops over grid_sizes.tolist() ----------------------

def rope_table(grid_sizes: torch.Tensor, dim: int = HEAD_DIM) -> torch.Tensor:
    """Per-token rotary angles [L, dim // 2] for a (frames, height, width) grid, built in a Python loop over
    grid_sizes.tolist() (Wan-style): a graph break under dynamo."""
    tables = []
    for f, h, w in grid_sizes.tolist():
        n = f * h * w
        pos = torch.arange(n, dtype=torch.float32)
        freqs = 1.0 / (100.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        tables.append(torch.outer(pos, freqs))
    return tables[0]


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:  # x [B, L, H, D]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class RopeBlock(nn.Module):
    """SDPA self-attention with RoPE; with `inner`, the block computes the RoPE table itself (the break sits
    inside the attention's forward)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner  # False: table passed in; True: built here; "item": built here, and a .item() too
        self.norm = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x, rope_or_grid):
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, HEADS, HEAD_DIM).unbind(2)
        # inner: the break sits between the qkv projection and the SDPA
        if self.inner is False:
            angles = rope_or_grid
        else:
            angles = rope_table(rope_or_grid)
        q, k = apply_rope(q, angles), apply_rope(k, angles)
        scale = None
        if self.inner == "item":  # a size read back from a tensor right before the attention: q, k, v cross
            scale = HEAD_DIM ** -0.5 * (int(rope_or_grid.prod()) / n)  # the break as separate graph inputs
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return x + self.proj(o.transpose(1, 2).reshape(b, n, DIM))


class RopeDiT(nn.Module):
    def __init__(self, inner, depth: int = 2):
        super().__init__()
        self.inner = inner
        self.proj_in = nn.Linear(8, DIM)
        self.blocks = nn.ModuleList([RopeBlock(inner) for _ in range(depth)])
        self.proj_out = nn.Linear(DIM, 8)

    def forward(self, x, grid_sizes):
        h = self.proj_in(x)
        for blk in self.blocks:
            h = blk(h, rope_table(grid_sizes) if self.inner is False else grid_sizes)  # False: the break in the loop
        return self.proj_out(h)


def rope_apply(x: torch.Tensor, grid_sizes: torch.Tensor) -> torch.Tensor:
    """Wan's rope_apply: RoPE applied per sample in a Python loop over grid_sizes.tolist() (each sample's first
    f * h * w tokens rotated, the rest kept), x [B, L, H, D]: the break sits between the q/k projections and
    the attention, so q, k and v reach the SDPA's graph as separate inputs."""
    out = []
    for i, (f, h, w) in enumerate(grid_sizes.tolist()):
        n = f * h * w
        out.append(torch.cat([apply_rope(x[i:i + 1, :n], rope_table(grid_sizes[i:i + 1])), x[i:i + 1, n:]], dim=1))
    return torch.cat(out)


class WanRopeBlock(RopeBlock):
    """Self-attention whose q and k go through rope_apply (the break inside the attention), then a
    cross-attention to text and an MLP."""

    def __init__(self):
        super().__init__(inner=True)
        self.q2, self.kv2 = nn.Linear(DIM, DIM), nn.Linear(DIM, 2 * DIM)
        self.mlp = nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x, grid_sizes, text):
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, HEADS, HEAD_DIM).unbind(2)
        q, k = rope_apply(q, grid_sizes), rope_apply(k, grid_sizes)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.proj(o.transpose(1, 2).reshape(b, n, DIM))
        q2 = self.q2(x).view(b, n, HEADS, HEAD_DIM).transpose(1, 2)
        k2, v2 = self.kv2(text).view(b, -1, 2, HEADS, HEAD_DIM).transpose(1, 3).unbind(2)
        x = x + F.scaled_dot_product_attention(q2, k2, v2).transpose(1, 2).reshape(b, n, DIM)
        return x + self.mlp(x)


class WanRopeDiT(nn.Module):
    def __init__(self, depth: int = 2):
        super().__init__()
        self.proj_in, self.text_in = nn.Linear(8, DIM), nn.Linear(8, DIM)
        self.blocks = nn.ModuleList([WanRopeBlock() for _ in range(depth)])
        self.proj_out = nn.Linear(DIM, 8)

    def forward(self, x, grid_sizes, text):
        h, t = self.proj_in(x), self.text_in(text)
        for blk in self.blocks:
            h = blk(h, grid_sizes, t)
        return self.proj_out(h)


def break_cases():
    torch.manual_seed(0)
    x = torch.randn(1, 2 * 3 * 4, 8)
    grid = torch.tensor([[2, 3, 4]])
    return {"rope_in_loop": (RopeDiT(inner=False), {"x": x, "grid_sizes": grid}),
            "rope_in_attention": (RopeDiT(inner=True), {"x": x, "grid_sizes": grid}),
            "item_before_sdpa": (RopeDiT(inner="item"), {"x": x, "grid_sizes": grid}),
            # 25 tokens over 2 ranks (13 + 12, padded): the uneven split too
            "rope_apply_in_attention": (WanRopeDiT(), {"x": torch.randn(1, 25, 8), "grid_sizes": torch.tensor([[1, 5, 5]]),
                                                       "text": torch.randn(1, 7, 8)})}


# ---- flex_attention with a block mask and a score_mod (issue point 2) --------------------------------------

def _relative_bias(score, b, h, q_idx, kv_idx):
    """An ALiBi-like additive score_mod: a per-head slope times the distance between the positions."""
    return score - (h + 1) * 0.05 * (q_idx - kv_idx).abs()


def flex_attend(score_mod):
    def attend(qkv, block_mask):  # [B, S, 3, H, D]
        from torch.nn.attention.flex_attention import flex_attention
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask).transpose(1, 2)
    return attend


class FlexStack(Stack):
    """Two blocks attending through flex_attention under a block mask made once in the forward (as published
    code does): causal, or a document mask over packed sequences (token i sees token j of its own document)."""

    def __init__(self, mask: str, score_mod=None):
        super().__init__([flex_attend(score_mod), flex_attend(score_mod)])
        self.mask = mask

    def forward(self, x, extra=None):
        from torch.nn.attention.flex_attention import create_block_mask
        length = x.shape[1]
        if self.mask == "causal":
            def mask_mod(b, h, q_idx, kv_idx):
                return q_idx >= kv_idx
        else:
            def mask_mod(b, h, q_idx, kv_idx):
                return extra[q_idx] == extra[kv_idx]
        block_mask = create_block_mask(mask_mod, None, None, length, length, device=x.device)
        h = self.proj_in(x)
        for blk in self.blocks:
            h = blk(h, block_mask)
        return self.proj_out(h)


def flex_cases():
    """flex_causal: a causal block mask and an additive relative-position score_mod; flex_document: a document
    mask over three sequences of 7, 9 and 5 tokens packed into one (21 tokens: an uneven split over 2 ranks)."""
    torch.manual_seed(0)
    x = torch.randn(2, 21, 8)
    docs = torch.tensor([0] * 7 + [1] * 9 + [2] * 5)
    return {"flex_causal": (FlexStack("causal", _relative_bias), {"x": x}),
            "flex_document": (FlexStack("document"), {"x": x, "extra": docs})}


# ---- a batch folded into the sequence (issue point 3): PixArt's original cross-attention ------------------

class FoldedCrossBlock(nn.Module):
    """Self-attention per image, then cross-attention written as PixArt's original code writes it: every
    image's tokens and every prompt's tokens folded into one sequence (``q_linear(x).view(1, -1, H, D)``),
    with xformers' BlockDiagonalMask keeping image i on prompt i."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.q_linear, self.kv_linear, self.cproj = nn.Linear(DIM, DIM), nn.Linear(DIM, 2 * DIM), nn.Linear(DIM, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x, cond, mask):
        import xformers.ops as xops
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, DIM))
        q = self.q_linear(x).view(1, -1, HEADS, HEAD_DIM)
        k, v = self.kv_linear(cond).view(1, -1, 2, HEADS, HEAD_DIM).unbind(2)
        x = x + self.cproj(xops.memory_efficient_attention(q, k, v, attn_bias=mask).view(b, -1, DIM))
        return x + self.mlp(x)


class FoldedCrossDiT(nn.Module):
    def __init__(self, in_dim=8, text_dim=12):
        super().__init__()
        self.proj_in, self.text_in = nn.Linear(in_dim, DIM), nn.Linear(text_dim, DIM)
        self.blocks = nn.ModuleList([FoldedCrossBlock(), FoldedCrossBlock()])
        self.proj_out = nn.Linear(DIM, in_dim)

    def forward(self, x, text):
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask
        b, n, _ = x.shape
        mask = BlockDiagonalMask.from_seqlens([n] * b, [text.shape[1]] * b)
        h, cond = self.proj_in(x), self.text_in(text)
        for blk in self.blocks:
            h = blk(h, cond, mask)
        return self.proj_out(h)


def folded_cases():
    """Two images of 16 tokens on two prompts of 6 tokens, folded into one sequence in the cross-attention."""
    torch.manual_seed(0)
    return {"folded_cross": (FoldedCrossDiT(), {"x": torch.randn(2, 16, 8), "text": torch.randn(2, 6, 12)})}


# ---- per-frame attention: tokens unflattened into (frames, tokens per frame) (Wan-Animate's face adapter) ----

class PerFrameBlock(nn.Module):
    """Self-attention over all tokens, then a cross-attention per frame: the queries unflattened into
    (frames, tokens per frame) with the frames folded into the batch, each frame attending to its own few
    motion tokens."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.q, self.kv, self.out = nn.Linear(DIM, DIM), nn.Linear(DIM, 2 * DIM), nn.Linear(DIM, DIM)
        self.norm = nn.LayerNorm(DIM)

    def forward(self, x, motion):  # x [B, F * T, C], motion [B, F, N, C]
        b, n, _ = x.shape
        f, m = motion.shape[1], motion.shape[2]
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, HEADS, HEAD_DIM).transpose(1, 3).unbind(2)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, DIM))
        q = self.q(x).unflatten(2, (HEADS, -1)).unflatten(1, (f, -1)).flatten(0, 1)  # [B*F, T, H, D]
        k, v = self.kv(motion.flatten(1, 2)).view(b, f, m, 2, HEADS, HEAD_DIM).unbind(3)
        k, v = k.flatten(0, 1), v.flatten(0, 1)  # [B*F, N, H, D]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return x + self.out(o.flatten(2, 3).unflatten(0, (b, f)).flatten(1, 2))


class PerFrameDiT(nn.Module):
    def __init__(self, depth: int = 2):
        super().__init__()
        self.proj_in, self.motion_in = nn.Linear(8, DIM), nn.Linear(8, DIM)
        self.blocks = nn.ModuleList([PerFrameBlock() for _ in range(depth)])
        self.proj_out = nn.Linear(DIM, 8)

    def forward(self, x, motion):
        h, m = self.proj_in(x), self.motion_in(motion)
        for blk in self.blocks:
            h = blk(h, m)
        return self.proj_out(h)


def frame_cases():
    """3 frames of 4 tokens over 2 ranks (the sequence padded to 2 whole frames per rank) and 4 frames."""
    torch.manual_seed(0)
    return {f"per_frame_{f}": (PerFrameDiT(), {"x": torch.randn(1, f * 4, 8), "motion": torch.randn(1, f, 3, 8)})
            for f in (3, 4)}
