"""PipeFusion's per-patch ops: what a stage program calls for the patch it runs.

`pf_shard_tokens` takes the patch's chunk of a token dim; `pf_attention` writes the patch's fresh K/V into the
site's full-sequence buffer and attends over it (stale K/V of the other patches; the schedule is in
`xdit_fx.runtime.pipefusion`). The patch and the buffers come from the `PatchState` of the region call running
now (`running()`), never from process-wide state.
"""

from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from xdit_fx.errors import XditFxError
from xdit_fx.ops.attention import (_local_attention, _mask_bias, _positions, causal_mask, repeat_kv, ulysses_in,
                                   ulysses_out)
from xdit_fx.ops.collectives import _chunk_attention, all_gather, all_to_all, merge_partial, ring_attention_lse


@dataclass
class PatchState:
    """What the per-patch ops read while a stage program runs: the K/V buffers' owner, the patch, the patch
    count, and this rank's place in the stage. The PipeFusion runtime makes one per region call and moves
    `patch` along; the ops find it through `current()` (set by `running()` for the call's duration)."""

    buffers: Any = None       # has kv_buffer(site, k, v, total) -> (k_buf, v_buf): the runtime that owns them
    patch: int = 0
    patches: int = 1
    key: tuple = ()
    ulysses: int = 1          # U: ranks per stage that split each patch (and the heads in attention)
    urank: int = 0            # this rank's index among them
    ulysses_group: str = ""
    ring: int = 1             # R: ranks per stage that split each patch and pass K/V buffers around a ring
    rrank: int = 0
    ring_group: str = ""
    sub: int = 1              # with ring: chunks per segment a rank holds in one program run (M on warm-up)


_CURRENT: ContextVar[PatchState | None] = ContextVar("xdit_fx_patch_state", default=None)


def current() -> PatchState:
    """The state of the region call running now (outside one: a single patch on a single rank)."""
    state = _CURRENT.get()
    return state if state is not None else PatchState()


@contextlib.contextmanager
def running(state: PatchState) -> Iterator[PatchState]:
    """Make `state` what the per-patch ops read inside the block."""
    token = _CURRENT.set(state)
    try:
        yield state
    finally:
        _CURRENT.reset(token)


def _ring_chunks(urank: int | None = None) -> tuple[int, ...]:
    """With ring: the chunks (of N = M x R x U per sharded segment) that ring rank r and ulysses rank u
    (this rank's, or `urank`) hold in one program run, in local order: chunk (j*R + r)*U + u of every patch
    j the run covers (one patch; all M on warm-up)."""
    st = current()
    ring, sub, r, u = st.ring, st.sub, st.rrank, st.ulysses
    uu = st.urank if urank is None else urank
    return tuple(((st.patch * sub + j) * ring + r) * u + uu for j in range(sub))


def _buffer_chunks(ring_rank: int) -> tuple[int, ...]:
    """The chunks a ring rank's K/V buffer holds: its chunks of every patch and ulysses rank, in position
    order ((j*R + r)*U + u for j, then u)."""
    st = current()
    m, ring, u = st.patches * st.sub, st.ring, st.ulysses
    return tuple((j * ring + ring_rank) * u + uu for j in range(m) for uu in range(u))


@lru_cache(maxsize=4096)
def _chunk_positions(segments: tuple, n: int, chunks: tuple) -> tuple[int, ...]:
    """Global positions of the given chunks (of n) of every sharded segment: segment-major, then chunk
    order. Whole segments are skipped (see `_whole_positions`)."""
    out, off = [], 0
    for length, sharded in segments:
        if sharded:
            c = length // n
            for j in chunks:
                out.extend(range(off + j * c, off + (j + 1) * c))
        off += length
    return tuple(out)


@lru_cache(maxsize=1024)
def _index(positions: tuple, device: torch.device) -> torch.Tensor:
    """The positions as an index tensor on `device`, made once (no host-to-device copy per patch)."""
    return torch.tensor(positions, device=device)


@lru_cache(maxsize=1024)
def _slots(buffer_positions: tuple, positions: tuple) -> tuple[int, ...]:
    """Where each position sits in a buffer that holds `buffer_positions`."""
    where = {pos: i for i, pos in enumerate(buffer_positions)}
    return tuple(where[pos] for pos in positions)


def pf_shard_tokens(x: torch.Tensor, dim: int, segments, group: str, n: int) -> torch.Tensor:
    """Patch the current patch of x's token dim: chunk p of every sharded segment (the pass checked that each
    segment splits evenly), replicated segments whole. No communication. With ulysses (n = M x U chunks),
    chunk p*U + r on ulysses rank r. With ring (N = M x R x U chunks): chunk (p*R + r)*U + u on ring rank r,
    ulysses rank u; on warm-up those chunks of every patch p, in p order (see `_ring_chunks`)."""
    st = current()
    if st.ring > 1:
        total = st.patches * st.sub * st.ring * st.ulysses  # N = M x R x U chunks per segment
        chunks = _ring_chunks()
        pieces = x.split([s[0] for s in segments], dim=dim) if len(segments) > 1 else (x,)
        out = []
        for piece, (length, sharded) in zip(pieces, segments):
            if not sharded:
                out.append(piece)
                continue
            c = length // total
            out.extend(piece.narrow(dim, j * c, c) for j in chunks)
        return out[0] if len(out) == 1 else torch.cat(out, dim=dim)
    p = st.patch * st.ulysses + st.urank if n > 1 else 0
    pieces = x.split([s[0] for s in segments], dim=dim) if len(segments) > 1 else (x,)
    out = [_padded_chunk(piece, dim, length, n, p) if sharded else piece
           for piece, (length, sharded) in zip(pieces, segments)]
    return out[0] if len(out) == 1 else torch.cat(out, dim=dim)


def _padded_chunk(piece: torch.Tensor, dim: int, length: int, n: int, p: int) -> torch.Tensor:
    """Chunk p of n of a segment: ceil(length / n) tokens, the part past the segment's end zero-padded
    (PipeFusion alone splits a segment the patches do not divide that way; equal chunks otherwise)."""
    c = -(-length // n)
    start = min(p * c, length)
    take = min(c, length - start)
    chunk = piece.narrow(dim, start, take)
    if take == c:
        return chunk
    shape = list(chunk.shape)
    shape[dim] = c - take
    return torch.cat([chunk, chunk.new_zeros(shape)], dim=dim)


def pf_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None, *,
                 site: int, q_segments: tuple, kv_segments: tuple | None, scale: float | None,
                 is_causal: bool = False) -> torch.Tensor:
    """Attention of the patch's queries over the site's full-sequence K/V buffer, after writing the patch's
    fresh K/V into it. Cross-attention to whole (unpatched) keys runs as is. `is_causal` (SDPA's top-left
    aligned mask) becomes a mask over global positions. The patches run in sequence order, so over a
    single patched segment the keys a causal query sees are all fresh: exact even with stale buffers."""
    st = current()
    if is_causal:
        attn_mask = causal_mask(q_segments, kv_segments, k)
    if st.ring > 1:
        return _pf_ring_attention(q, k, v, attn_mask, site, tuple(q_segments),
                                  tuple(kv_segments) if kv_segments is not None else None, scale)
    u = st.ulysses
    n, p = st.patches * u, st.patch * u + st.urank  # chunks, and this rank's chunk
    qpos = _positions(tuple(q_segments), n, p, False)
    if kv_segments is None or not any(s for _, s in kv_segments):
        bias = None
        if attn_mask is not None:
            bias = _mask_bias(attn_mask, qpos, tuple(range(k.shape[2])), q.dtype, q.device)
        return _local_attention(q, k, v, bias, scale)
    runtime = st.buffers
    if runtime is None:
        raise XditFxError("pf_attention ran outside a PipeFusion runtime (a dump's graph run by hand?); "
                          "run the model through xdit_fx.parallelize(model, plan).")
    total = sum(length for length, _ in kv_segments)
    heads_slice = None
    if u > 1:
        # the patched segments: [B, H, chunk, D] on each of the U ranks -> [B, H/U, patch (U chunks in rank
        # order), D]; segments computed whole by every patch (a time token): this rank's heads, no comm
        heads = q.shape[1]
        k, v = repeat_kv(k, v, heads)  # grouped-query attention: every query head gets its kv head first
        heads_slice = slice(st.urank * heads // u, (st.urank + 1) * heads // u)
        qs, ks = tuple(q_segments), tuple(kv_segments)
        q, q_rep = _split_local(q, qs, n, 1)
        k, k_rep = _split_local(k, ks, n, 1)
        v, v_rep = _split_local(v, ks, n, 1)
        q, k, v = ulysses_in(q, k, v, st.ulysses_group)
        first = st.patch * u
        q_sharded = q.shape[2]
        qpos = sum((_chunk_positions(qs, n, (first + j,)) for j in range(u)), ()) + _whole_positions(qs)
        kpos = sum((_chunk_positions(ks, n, (first + j,)) for j in range(u)), ()) + _whole_positions(ks)
        if q_rep.shape[2]:
            q = torch.cat([q, q_rep[:, heads_slice]], dim=2)
        if k_rep.shape[2]:
            k = torch.cat([k, k_rep[:, heads_slice]], dim=2)
            v = torch.cat([v, v_rep[:, heads_slice]], dim=2)
    else:
        kpos = _positions(tuple(kv_segments), n, p, False)
        if min(kpos) < 0:  # a segment split unevenly: the padding's K/V go into no buffer slot
            keep = _index(tuple(i for i, pos in enumerate(kpos) if pos >= 0), k.device)
            k, v = k.index_select(2, keep), v.index_select(2, keep)
            kpos = tuple(pos for pos in kpos if pos >= 0)
    kidx = _index(tuple(kpos), k.device)
    kbuf, vbuf = runtime.kv_buffer(site, k, v, total)
    kbuf.index_copy_(2, kidx, k)
    vbuf.index_copy_(2, kidx, v)
    bias = None
    if attn_mask is not None:
        bias = _mask_bias(attn_mask, qpos, tuple(range(total)), q.dtype, q.device, heads_slice)
    out = _local_attention(q, kbuf, vbuf, bias, scale)  # grouped-query buffers keep their own heads
    if u > 1:
        # queries of whole segments: every rank computed its heads; gather them
        out, whole = out.split([q_sharded, out.shape[2] - q_sharded], dim=2)
        if whole.shape[2]:
            whole = all_gather(whole.contiguous(), 1, heads, st.ulysses_group)
        out = _merge_local(ulysses_out(out, st.ulysses_group), whole, tuple(q_segments), n, 1)
    return out


def _pf_ring_attention(q, k, v, attn_mask, site, q_segments, kv_segments, scale):
    """pipefusion x ring (x ulysses): the patch's chunks of the patched segments are all-to-alled over the
    U ulysses ranks (to U consecutive chunks, heads/U), their fresh K/V go into this ring rank's buffer (its
    chunks of every patch, see `_buffer_chunks`), and the queries attend over the buffers of all R ring
    ranks by ring attention, the mask re-indexed to that key order. Segments every patch computes whole (a
    time token) stay out of the buffers: their keys are attended locally (this rank's heads) and merged by
    log-sum-exp; their queries attend like the others, and their outputs are gathered over the heads."""
    st = current()
    rr, u, sub = st.ring, st.ulysses, st.sub
    n = st.patches * sub * rr * u  # chunks per sharded segment
    heads = q.shape[1]
    k, v = repeat_kv(k, v, heads)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if kv_segments is None or not any(s for _, s in kv_segments):  # cross-attention to whole keys
        bias = None
        if attn_mask is not None:
            qpos = _local_positions(q_segments, n, _ring_chunks())
            bias = _mask_bias(attn_mask, qpos, tuple(range(k.shape[2])), q.dtype, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    runtime = st.buffers
    if runtime is None:
        raise XditFxError("pf_attention ran outside a PipeFusion runtime (a dump's graph run by hand?); "
                          "run the model through xdit_fx.parallelize(model, plan).")
    q_p, q_w = _split_local(q, q_segments, n, sub)
    k_p, k_w = _split_local(k, kv_segments, n, sub)
    v_p, v_w = _split_local(v, kv_segments, n, sub)
    heads_slice = None
    held = [_ring_chunks()]
    if u > 1:  # patched tokens: [B, H, chunks, D] -> [B, H/U, U ranks' chunks, D]; whole ones: this rank's heads
        group = st.ulysses_group
        heads_slice = slice(st.urank * heads // u, (st.urank + 1) * heads // u)
        if q_p.shape[2]:
            q_p, k_p, v_p = ulysses_in(q_p, k_p, v_p, group)
        else:  # no patched queries (only whole segments query): this rank's heads
            q_p = q_p[:, heads_slice]
            k_p, v_p = all_to_all(k_p, 1, 2, group), all_to_all(v_p, 1, 2, group)
        q_w, k_w, v_w = q_w[:, heads_slice], k_w[:, heads_slice], v_w[:, heads_slice]
        held = [_ring_chunks(uu) for uu in range(u)]
    qpos = sum((_chunk_positions(q_segments, n, c) for c in held), ()) + _whole_positions(q_segments)
    kpos = sum((_chunk_positions(kv_segments, n, c) for c in held), ())
    buffer_pos = _chunk_positions(kv_segments, n, _buffer_chunks(st.rrank))
    kbuf, vbuf = runtime.kv_buffer(site, k_p, v_p, len(buffer_pos))
    if kpos == buffer_pos:
        kbuf.copy_(k_p)
        vbuf.copy_(v_p)
    else:
        idx = _index(_slots(buffer_pos, kpos), k.device)
        kbuf.index_copy_(2, idx, k_p)
        vbuf.index_copy_(2, idx, v_p)
    qq = torch.cat([q_p, q_w], dim=2) if q_w.shape[2] else q_p
    bias = None
    if attn_mask is not None:
        ring_pos = sum((_chunk_positions(kv_segments, n, _buffer_chunks(src)) for src in range(rr)), ())
        bias = _mask_bias(attn_mask, qpos, ring_pos, q.dtype, q.device, heads_slice)
    out, lse = ring_attention_lse(qq, kbuf, vbuf, bias, scale, st.ring_group)
    if k_w.shape[2]:  # whole segments' keys, once (they are in no ring buffer)
        bias = None
        if attn_mask is not None:
            bias = _mask_bias(attn_mask, qpos, _whole_positions(kv_segments), q.dtype, q.device, heads_slice)
        out, lse = merge_partial(out, lse, *_chunk_attention(qq, k_w, v_w, bias, scale))
    out = out.to(q.dtype)
    o_p, o_w = out.split([q_p.shape[2], q_w.shape[2]], dim=2)
    if u > 1:
        if o_p.shape[2]:
            o_p = ulysses_out(o_p, st.ulysses_group)
        if o_w.shape[2]:
            o_w = all_gather(o_w.contiguous(), 1, heads, st.ulysses_group)
    return _merge_local(o_p, o_w, q_segments, n, sub)


def _local_lengths(segments: tuple, n: int, held: int) -> list[int]:
    """Local tokens of each segment when a rank holds `held` chunks (of n) of every sharded segment."""
    return [length // n * held if sharded else length for length, sharded in segments]


def _local_positions(segments: tuple, n: int, chunks: tuple) -> tuple[int, ...]:
    """Global positions of a rank's local tokens in local order: its chunks of each sharded segment, whole
    segments whole."""
    out, off = [], 0
    for length, sharded in segments:
        c = length // n
        spans = [(off + j * c, off + (j + 1) * c) for j in chunks] if sharded else [(off, off + length)]
        for lo, hi in spans:
            out.extend(range(lo, hi))
        off += length
    return tuple(out)


def _split_local(x: torch.Tensor, segments: tuple, n: int, held: int):
    """x's local token dim (2) -> (the sharded segments' tokens, the whole segments' tokens); either may
    have no tokens."""
    pieces = x.split(_local_lengths(segments, n, held), dim=2)
    patched = [p for p, (_, s) in zip(pieces, segments) if s]
    whole = [p for p, (_, s) in zip(pieces, segments) if not s]
    empty = x.narrow(2, 0, 0)
    return (torch.cat(patched, dim=2) if patched else empty), (torch.cat(whole, dim=2) if whole else empty)


def _merge_local(patched: torch.Tensor, whole: torch.Tensor, segments: tuple, n: int, held: int) -> torch.Tensor:
    """The inverse of `_split_local`."""
    if not whole.shape[2]:
        return patched
    if not patched.shape[2]:
        return whole
    pp = iter(patched.split([length // n * held for length, s in segments if s], dim=2))
    ww = iter(whole.split([length for length, s in segments if not s], dim=2))
    return torch.cat([next(pp) if s else next(ww) for _, s in segments], dim=2)


def _whole_positions(segments: tuple) -> tuple[int, ...]:
    out, off = [], 0
    for length, s in segments:
        if not s:
            out.extend(range(off, off + length))
        off += length
    return tuple(out)
