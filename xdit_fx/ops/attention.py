"""Sequence-parallel attention: Ulysses (all-to-all), ring (P2P + log-sum-exp merge), or both (USP).

`sp_attention` replaces `F.scaled_dot_product_attention` at every attention site whose queries are
sharded along the token sequence. Its inputs are the rank-local q, k, v in [B, H, L, D] and the model's
mask (if any) in global token order. Each token dim is described by *segments* ((length, sharded), ...):
a joint text+image sequence is two segments. Sharded segments hold ceil(length / n) tokens per rank
(the last ranks zero-padded); replicated segments hold all tokens.

Attention does not care where a key sits in the sequence (positions were already applied by RoPE), so
the keys may arrive in any order as long as the mask follows them: after the all-to-all a rank holds the
chunks of its Ulysses group in rank order, and the ring brings the other groups' chunks. Padded keys get
-inf in the mask; padded queries compute garbage that is dropped at the exit gather.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from xdit_fx.ops.collectives import _group, all_gather, all_to_all, local_len, ring_attention, shard

Segments = Sequence[Sequence]  # ((length, sharded), ...)


@lru_cache(maxsize=4096)
def _positions(segments: tuple, n: int, r: int, all_sharded: bool) -> tuple[int, ...]:
    """Global position of every local token on sp rank r (-1 for padding). With `all_sharded`, a
    replicated segment is treated as chunked too (what `_shard_replicated` makes of it)."""
    out: list[int] = []
    offset = 0
    for length, sharded in segments:
        if sharded or all_sharded:
            c = -(-length // n)
            out.extend(offset + r * c + i if r * c + i < length else -1 for i in range(c))
        else:
            out.extend(range(offset, offset + length))
        offset += length
    return tuple(out)


def _shard_replicated(x: torch.Tensor, segments: Segments, n: int, group: str) -> torch.Tensor:
    """Chunk the replicated segments of x's sequence dim (dim 2) so that every segment is sharded."""
    if all(s for _, s in segments):
        return x
    pieces = x.split([local_len(length, s, n) for length, s in segments], dim=2)
    return torch.cat([p if s else shard(p, 2, -(-length // n) * n, group)
                      for p, (length, s) in zip(pieces, segments)], dim=2)


def _gather_replicated(x: torch.Tensor, segments: Segments, n: int, group: str) -> torch.Tensor:
    if all(s for _, s in segments):
        return x
    c = [-(-length // n) for length, _ in segments]
    pieces = x.split(c, dim=2)
    return torch.cat([p if s else all_gather(p, 2, length, group)
                      for p, (length, s) in zip(pieces, segments)], dim=2)


def _mask_bias(mask, qpos, kpos, dtype, device, heads_slice=None):
    """Additive bias [.., len(qpos), len(kpos)] from the model's global mask and the padding."""
    q_idx = torch.tensor(qpos, device=device)
    k_idx = torch.tensor(kpos, device=device)
    if mask is None:
        bias = torch.zeros((1, 1, len(qpos), len(kpos)), dtype=dtype, device=device)
    else:
        m = mask
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=device).masked_fill(~m, float("-inf"))
        else:
            m = m.to(dtype)
        while m.dim() < 4:
            m = m.unsqueeze(0)
        if heads_slice is not None and m.shape[1] > 1:
            m = m[:, heads_slice]
        m = m.index_select(-2, q_idx.clamp(min=0)) if m.shape[-2] > 1 else m
        m = m.index_select(-1, k_idx.clamp(min=0)) if m.shape[-1] > 1 else m
        bias = m.expand(*m.shape[:-2], len(qpos), len(kpos)).clone()
    if (k_idx < 0).any():
        bias = bias.masked_fill((k_idx < 0).view(1, 1, 1, -1), float("-inf"))
    if (q_idx < 0).any():
        bias = bias.masked_fill((q_idx < 0).view(1, 1, -1, 1), 0.0)
    return bias


def causal_mask(q_segments: Segments, kv_segments: Segments | None, k: torch.Tensor) -> torch.Tensor:
    """SDPA's `is_causal` (top-left aligned) as a boolean mask over global positions [Lq, Lk], so that every
    chunk a rank sees is masked by where its tokens sit in the whole sequence."""
    lq = sum(length for length, _ in q_segments)
    lk = sum(length for length, _ in kv_segments) if kv_segments is not None else k.shape[2]
    return torch.ones(lq, lk, dtype=torch.bool, device=k.device).tril()


def repeat_kv(k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention: give each of the `heads` query heads its own K/V head."""
    if k.shape[1] != heads:
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
        v = v.repeat_interleave(heads // v.shape[1], dim=1)
    return k, v


def ulysses_in(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: str):
    """Ulysses' first all-to-all: [B, H, local tokens, D] on each rank -> [B, H/U, the U ranks' tokens, D].
    Q, K and V of one shape go in one all-to-all (same bytes, a third of the latency)."""
    if q.shape == k.shape == v.shape:
        return all_to_all(torch.stack([q, k, v]), 2, 3, group).unbind(0)
    return all_to_all(q, 1, 2, group), all_to_all(k, 1, 2, group), all_to_all(v, 1, 2, group)


def ulysses_out(out: torch.Tensor, group: str) -> torch.Tensor:
    """Ulysses' last all-to-all: [B, H/U, the U ranks' tokens, D] -> [B, H, local tokens, D]."""
    return all_to_all(out.contiguous(), 2, 1, group)


def sp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    q_segments: tuple,
    kv_segments: tuple | None,
    scale: float | None,
    ulysses: int,
    ring: int,
    sp_group: str,
    ulysses_group: str,
    ring_group: str,
    is_causal: bool = False,
) -> torch.Tensor:
    """Attention of rank-local q over the whole sequence (see the module docstring).

    `is_causal` (SDPA's top-left aligned causal mask) becomes an explicit mask over global positions,
    so that every chunk a rank sees is masked by where its tokens sit in the whole sequence."""
    n = ulysses * ring
    if is_causal:
        attn_mask = causal_mask(q_segments, kv_segments, k)
    heads = q.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    k, v = repeat_kv(k, v, heads)
    r = dist.get_rank(_group(sp_group))

    if kv_segments is None or not any(s for _, s in kv_segments):
        # cross-attention to replicated keys: each rank attends with its own queries, no communication
        bias = None
        if attn_mask is not None:
            kpos = tuple(range(k.shape[2]))
            bias = _mask_bias(attn_mask, _positions(tuple(q_segments), n, r, False), kpos, q.dtype, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)

    q_in = _shard_replicated(q, q_segments, n, sp_group)
    k = _shard_replicated(k, kv_segments, n, sp_group)
    v = _shard_replicated(v, kv_segments, n, sp_group)

    u = r % ulysses
    g = r // ulysses
    padded = any(length % n for length, _ in kv_segments)
    bias = None
    if attn_mask is not None or padded:
        qs = tuple(q_segments)
        ks = tuple(kv_segments)
        qpos = sum((_positions(qs, n, g * ulysses + j, True) for j in range(ulysses)), ()) if ulysses > 1 \
            else _positions(qs, n, r, True)
        kpos = sum((_positions(ks, n, src, True) for src in range(n)), ()) if ring > 1 \
            else sum((_positions(ks, n, g * ulysses + j, True) for j in range(ulysses)), ())
        hs = slice(u * heads // ulysses, (u + 1) * heads // ulysses) if ulysses > 1 else None
        bias = _mask_bias(attn_mask, qpos, kpos, q.dtype, q.device, hs)

    if ulysses > 1:
        if heads % ulysses:
            raise ValueError(f"{heads} attention heads are not divisible by ulysses_degree={ulysses}")
        q_in, k, v = ulysses_in(q_in, k, v, ulysses_group)
    if ring > 1:
        out = ring_attention(q_in, k, v, bias, scale, ring_group)
    else:
        out = F.scaled_dot_product_attention(q_in, k, v, attn_mask=bias, scale=scale)
    if ulysses > 1:
        out = ulysses_out(out, ulysses_group)
    return _gather_replicated(out, q_segments, n, sp_group)
