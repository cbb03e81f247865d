"""Sequence-parallel attention: Ulysses (all-to-all), ring (P2P + log-sum-exp merge), or both (USP).

`sp_attention` replaces `F.scaled_dot_product_attention` at every attention site whose queries are
sharded along the token sequence. Its inputs are the rank-local q, k, v in [B, H, L, D] and the model's
mask (if any) in global token order. Each token dim is described by *segments* ((length, sharded), ...):
a joint text+image sequence is two segments. Sharded segments hold ceil(length / n) tokens per rank
(the last ranks zero-padded); replicated segments hold all tokens.

Attention does not care where a key sits in the sequence (positions were already applied by RoPE), so
the keys may arrive in any order as long as the mask follows them: after the all-to-all a rank holds the
chunks of its Ulysses group in rank order, and the ring brings the other groups' chunks. Padded keys are
cut out of each chunk before the kernel sees it (no mask is built for them); padded queries compute
garbage that is dropped at the exit gather. Where tokens sit is a `Layout`, computed once per segments,
degrees and rank (a functools cache of pure values), so a call does no per-token host work.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple, Sequence

import torch
import torch.distributed as dist

from xdit_fx.ops.collectives import _group, all_gather, all_to_all, local_len, ring_attention, shard
from xdit_fx.ops.kernels import additive
from xdit_fx.ops.kernels import local_attention as _local_attention

Segments = Sequence[Sequence]  # ((length, sharded), ...)


@lru_cache(maxsize=4096)
def _positions(segments: tuple, n: int, r: int, all_sharded: bool) -> tuple[int, ...]:
    """Global position of every local token on sp rank r (-1 for padding). With `all_sharded`, a
    replicated segment is treated as chunked too (what `_shard_replicated` makes of it)."""
    out: list[int] = []
    offset = 0
    for length, sharded in segments:
        if sharded or all_sharded:
            c = local_len(length, sharded or True, n)
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
    return torch.cat([p if s else shard(p, 2, local_len(length, True, n) * n, group)
                      for p, (length, s) in zip(pieces, segments)], dim=2)


def _gather_replicated(x: torch.Tensor, segments: Segments, n: int, group: str) -> torch.Tensor:
    if all(s for _, s in segments):
        return x
    c = [local_len(length, s or True, n) for length, s in segments]
    pieces = x.split(c, dim=2)
    return torch.cat([p if s else all_gather(p, 2, length, group)
                      for p, (length, s) in zip(pieces, segments)], dim=2)


@lru_cache(maxsize=1024)
def runs_of(positions: tuple) -> tuple[tuple[int, int, int], ...]:
    """`positions` as runs (local offset, global start or -1 for padding, length) of consecutive tokens."""
    out: list[list[int]] = []
    for i, pos in enumerate(positions):
        if out and ((pos < 0 and out[-1][1] < 0) or (pos >= 0 and out[-1][1] >= 0 and pos == out[-1][1] + out[-1][2])):
            out[-1][2] += 1
        else:
            out.append([i, pos, 1])
    return tuple(tuple(r) for r in out)


def _take(x: torch.Tensor, dim: int, spans) -> torch.Tensor:
    """The (start, length) spans of x along `dim`, concatenated: a view for one span, else one copy."""
    if len(spans) == 1:
        start, length = spans[0]
        return x if start == 0 and length == x.shape[dim] else x.narrow(dim, start, length)
    return torch.cat([x.narrow(dim, start, length) for start, length in spans], dim=dim)


def _index_rows(m: torch.Tensor, dim: int, runs) -> torch.Tensor:
    """The mask's entries along `dim` at the global positions of `runs`; padding runs take rows that keep
    every key (True, or 0 in an additive mask), so that a padded query never has a fully masked row."""
    pieces = []
    for _, start, length in runs:
        if start >= 0:
            pieces.append(m.narrow(dim, start, length))
        else:
            shape = list(m.shape)
            shape[dim] = length
            pieces.append(torch.ones(shape, dtype=m.dtype, device=m.device) if m.dtype == torch.bool
                          else torch.zeros(shape, dtype=m.dtype, device=m.device))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def index_mask(mask: torch.Tensor, q_runs, k_runs, dtype: torch.dtype, heads_slice: slice | None = None
               ) -> torch.Tensor:
    """The model's mask in global order -> the local query rows (`q_runs`, padding included) and the keys a
    rank attends (`k_runs`, valid keys only, in arrival order), in the kernel's form: a boolean mask stays
    boolean, a float mask takes the query's dtype, and a dim of size 1 stays 1 (nothing is expanded to
    [Lq, Lk] that the model did not give as such)."""
    m = mask if mask.dtype == torch.bool else mask.to(dtype)
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if heads_slice is not None and m.shape[1] > 1:
        m = m[:, heads_slice]
    if m.shape[-2] > 1:
        m = _index_rows(m, -2, q_runs)
    if m.shape[-1] > 1:
        m = _index_rows(m, -1, k_runs)
    return m


def _mask_bias(mask, qpos, kpos, dtype, device, heads_slice=None):
    """Additive mask [.., len(qpos) or 1, len(kpos) or 1] from the model's global mask at the given query and
    key positions (-1: a padded query, which keeps every key). Keys must all be valid positions."""
    return additive(index_mask(mask, runs_of(tuple(qpos)), runs_of(tuple(kpos)), dtype, heads_slice), dtype)


class Layout(NamedTuple):
    """Where a rank's tokens sit around attention, for one site's segments, degrees and sp rank (cached).

    q_runs: the query rows attention sees (after the Ulysses all-to-all), as runs_of() of their positions.
    k_runs: per ring source (one without ring), the runs of its key chunk's valid keys, local offsets within
    the chunk. keep: those runs as `ring_attention`'s flat key list, or () when no key is padded."""

    q_runs: tuple
    k_runs: tuple
    padded_keys: bool
    keep: tuple

    def key_runs(self) -> tuple:
        """Every valid key's run, in the order the keys arrive (ring source by source)."""
        return tuple(run for src in self.k_runs for run in src)


@lru_cache(maxsize=1024)
def layout(q_segments: tuple, kv_segments: tuple, n: int, ulysses: int, ring: int, r: int) -> Layout:
    """The `Layout` of sp rank r = g * ulysses + u (ring group g): its queries are the chunks of the ulysses
    group's ranks in rank order; ring source s's keys are the chunks of ranks s * ulysses + j."""
    g = r // ulysses
    qpos = sum((_positions(q_segments, n, g * ulysses + j, True) for j in range(ulysses)), ())
    k_runs, keep, padded = [], [], False
    for src in (range(ring) if ring > 1 else (g,)):
        kpos = sum((_positions(kv_segments, n, src * ulysses + j, True) for j in range(ulysses)), ())
        valid = tuple(run for run in runs_of(kpos) if run[1] >= 0)
        padded = padded or any(p < 0 for p in kpos)
        k_runs.append(valid)
        keep.append(len(valid))
        keep.extend(x for off, _, length in valid for x in (off, length))
    return Layout(runs_of(qpos), tuple(k_runs), padded, tuple(keep) if padded else ())


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
    Q, K and V go in one all-to-all (same bytes, a third of the latency), written straight into its send
    buffer (no stacked copy first); K and V may have fewer heads than Q (grouped-query attention)."""
    n = dist.get_world_size(_group(group))
    if q.shape[0] == k.shape[0] == v.shape[0] and q.shape[2:] == k.shape[2:] == v.shape[2:]:
        # [B, h, L, D] -> [U, B, h/U, L, D] each, heads of q, k, v side by side: rank i's chunk is send[i]
        send = torch.cat([t.unflatten(1, (n, -1)).movedim(1, 0) for t in (q, k, v)], dim=2)
        out = all_to_all(send.flatten(0, 1), 0, 2, group)  # -> [B, (hq + 2 hk) / U, U * L, D]
        return out.split([q.shape[1] // n, k.shape[1] // n, v.shape[1] // n], dim=1)
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
    so that every chunk a rank sees is masked by where its tokens sit in the whole sequence.

    No [Lq, Lk] tensor is built that the model did not give: padded keys of an uneven split are cut out of
    K/V (a view, or one copy of K/V), the model's mask keeps its form (boolean or float, its size-1 dims)
    and is only re-indexed to the local queries and keys, and grouped-query K/V keep their own heads."""
    n = ulysses * ring
    if is_causal:
        attn_mask = causal_mask(q_segments, kv_segments, k)
    heads = q.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    r = dist.get_rank(_group(sp_group))

    if kv_segments is None or not any(s for _, s in kv_segments):
        # cross-attention to replicated keys: each rank attends with its own queries, no communication
        mask = None
        if attn_mask is not None:
            kruns = ((0, 0, k.shape[2]),)
            mask = index_mask(attn_mask, runs_of(_positions(tuple(q_segments), n, r, False)), kruns, q.dtype)
        return _local_attention(q, k, v, mask, scale)

    if ulysses > 1 and k.shape[1] % ulysses:
        k, v = repeat_kv(k, v, heads)  # too few K/V heads to split over the ulysses ranks: one per query head
    q_in = _shard_replicated(q, q_segments, n, sp_group)
    k = _shard_replicated(k, kv_segments, n, sp_group)
    v = _shard_replicated(v, kv_segments, n, sp_group)

    lay = layout(tuple(q_segments), tuple(kv_segments), n, ulysses, ring, r)
    mask = None
    if attn_mask is not None:
        u = r % ulysses
        hs = slice(u * heads // ulysses, (u + 1) * heads // ulysses) if ulysses > 1 else None
        mask = index_mask(attn_mask, lay.q_runs, lay.key_runs(), q.dtype, hs)

    if ulysses > 1:
        if heads % ulysses:
            raise ValueError(f"{heads} attention heads are not divisible by ulysses_degree={ulysses}")
        q_in, k, v = ulysses_in(q_in, k, v, ulysses_group)
    if ring > 1:
        out = ring_attention(q_in, k, v, additive(mask, q.dtype), scale, ring_group, list(lay.keep))
    else:
        if lay.padded_keys:
            spans = tuple((off, length) for off, _, length in lay.k_runs[0])
            k, v = _take(k, 2, spans), _take(v, 2, spans)
        out = _local_attention(q_in, k, v, mask, scale)
    if ulysses > 1:
        out = ulysses_out(out, ulysses_group)
    return _gather_replicated(out, q_segments, n, sp_group)
