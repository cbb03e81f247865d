"""The PipeFusion runtime: patches flow through the stages inside one transformer call.

`PipeFusionRegion` (built by passes/pipefusion.py) holds one GraphModule per stage. On each call, the rank of
stage s runs its GraphModule once per patch p = 0..M-1: it receives the patch's crossing values from earlier
stages (blocking receive), computes, and sends what later stages read (non-blocking), so stage s works on
patch p while stage s+1 works on patch p-1. The last stage assembles the exits (the per-patch pieces of the
values the rest of the graph reads whole) and broadcasts them; every rank then runs the rest of the graph,
so every rank returns the whole output, like any other plan.

Attention: each site keeps a full-sequence K/V buffer per call slot (the position of a call within a
denoising step: a two-call CFG pipeline's branches get their own buffers). A patch writes its fresh K/V
into its slice and attends over the whole buffer: the other patches' K/V come from the previous call
(stale), except those of earlier patches of this call, which are already fresh.

Ulysses (``pipefusion x ulysses``): each stage is U ranks, and the sequence is cut into M x U chunks: on
patch p, ulysses rank r computes chunk p*U + r of every token segment, so a patch is U consecutive chunks,
which is what a Ulysses all-to-all over the U ranks reassembles in order. `pf_attention` all-to-alls q, k, v
to [patch tokens, heads/U], writes the patch's K/V into the buffer of this rank's heads (the buffer holds the
whole sequence for heads/U), attends, and all-to-alls back. Crossing values go between the same ulysses rank
of consecutive stages; the last stage all-gathers the exits over its U ranks before the broadcast. Warm-up
(one patch) is plain Ulysses: U chunks of the whole sequence.

Ring (``pipefusion x ring``): M x R chunks, ring rank r computes chunk p*R + r on patch p. Each rank's
K/V buffer holds its own chunks of all M patches (all heads, segment-major then patch); a patch writes its
slot and runs ring attention over the buffers of the R ranks (one whole buffer per ring step; the mask
follows that key order). Warm-up takes chunks j*R + r of every patch j on rank r, so it fills the buffers
exactly. The last stage all-gathers the exits over the ring group. A token segment every patch computes
whole (a time token) is in no buffer: its keys are attended locally and merged by log-sum-exp.

Both (``pipefusion x ring x ulysses``, USP inside a stage): M x R x U chunks; ranks (r, u) compute chunk
(p*R + r)*U + u on patch p, so the Ulysses all-to-all turns a ring rank's U chunks into one ring chunk
p*R + r for heads/U, and from there it is the ring case with a buffer of heads/U. The last stage gathers
the exits over ring x ulysses.

Warm-up: the first `pipefusion_warmup_steps` calls of each slot in a generation (and any call whose input
shapes have not filled the buffers yet) run the warm-up program, the same passes with one patch: the whole
sequence, synchronously, exact, filling every buffer. `reset()` starts a new generation (pipelines do it
on every call; the scheduler hook marks the steps, as for the cache).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from xdit_fx.errors import XditFxError
from xdit_fx.ops.attention import _mask_bias, _positions
from xdit_fx.ops.collectives import COMM, _group, all_gather, all_to_all
from xdit_fx.runtime.steps import StepSlots

log = logging.getLogger(__name__)


class _PatchContext:
    """What the per-patch ops read while a stage program runs: the runtime, the patch, the patch count."""

    runtime: "PipeFusionRuntime | None" = None
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


PATCH = _PatchContext()


def _ring_chunks(urank: int | None = None) -> tuple[int, ...]:
    """With ring: the chunks (of N = M x R x U per sharded segment) that ring rank r and ulysses rank u
    (this rank's, or `urank`) hold in one program run, in local order: chunk (j*R + r)*U + u of every patch
    j the run covers (one patch; all M on warm-up)."""
    ring, sub, r, u = PATCH.ring, PATCH.sub, PATCH.rrank, PATCH.ulysses
    uu = PATCH.urank if urank is None else urank
    return tuple(((PATCH.patch * sub + j) * ring + r) * u + uu for j in range(sub))


def _buffer_chunks(ring_rank: int) -> tuple[int, ...]:
    """The chunks a ring rank's K/V buffer holds: its chunks of every patch and ulysses rank, in position
    order ((j*R + r)*U + u for j, then u)."""
    m, ring, u = PATCH.patches * PATCH.sub, PATCH.ring, PATCH.ulysses
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
    """Patch PATCH.patch of x's token dim: chunk p of every sharded segment (the pass checked that each
    segment splits evenly), replicated segments whole. No communication. With ulysses (n = M x U chunks),
    chunk p*U + r on ulysses rank r. With ring (N = M x R x U chunks): chunk (p*R + r)*U + u on ring rank r,
    ulysses rank u; on warm-up those chunks of every patch p, in p order (see `_ring_chunks`)."""
    if PATCH.ring > 1:
        total = PATCH.patches * PATCH.sub * PATCH.ring * PATCH.ulysses  # N = M x R x U chunks per segment
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
    p = PATCH.patch * PATCH.ulysses + PATCH.urank if n > 1 else 0
    pieces = x.split([s[0] for s in segments], dim=dim) if len(segments) > 1 else (x,)
    out = [piece.narrow(dim, p * (length // n), length // n) if sharded else piece
           for piece, (length, sharded) in zip(pieces, segments)]
    return out[0] if len(out) == 1 else torch.cat(out, dim=dim)


def pf_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None, *,
                 site: int, q_segments: tuple, kv_segments: tuple | None, scale: float | None,
                 is_causal: bool = False) -> torch.Tensor:
    """Attention of the patch's queries over the site's full-sequence K/V buffer, after writing the patch's
    fresh K/V into it. Cross-attention to whole (unpatched) keys runs as is. `is_causal` (SDPA's top-left
    aligned mask) becomes a mask over global positions. The patches run in sequence order, so over a
    single patched segment the keys a causal query sees are all fresh: exact even with stale buffers."""
    if is_causal:
        lq = sum(length for length, _ in q_segments)
        lk = sum(length for length, _ in kv_segments) if kv_segments is not None else k.shape[2]
        attn_mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
    if PATCH.ring > 1:
        return _pf_ring_attention(q, k, v, attn_mask, site, tuple(q_segments),
                                  tuple(kv_segments) if kv_segments is not None else None, scale)
    u = PATCH.ulysses
    n, p = PATCH.patches * u, PATCH.patch * u + PATCH.urank  # chunks, and this rank's chunk
    qpos = _positions(tuple(q_segments), n, p, False)
    if kv_segments is None or not any(s for _, s in kv_segments):
        bias = None
        if attn_mask is not None:
            bias = _mask_bias(attn_mask, qpos, tuple(range(k.shape[2])), q.dtype, q.device)
        if k.shape[1] != q.shape[1]:  # grouped-query attention
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    runtime = PATCH.runtime
    if runtime is None:
        raise XditFxError("pf_attention ran outside a PipeFusion runtime (a dump's graph run by hand?); "
                          "run the model through xdit_fx.parallelize(model, plan).")
    total = sum(length for length, _ in kv_segments)
    heads_slice = None
    if u > 1:
        # the patched segments: [B, H, chunk, D] on each of the U ranks -> [B, H/U, patch (U chunks in rank
        # order), D]; segments computed whole by every patch (a time token): this rank's heads, no comm
        heads = q.shape[1]
        if k.shape[1] != heads:  # grouped-query attention: every query head gets its kv head first
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
        heads_slice = slice(PATCH.urank * heads // u, (PATCH.urank + 1) * heads // u)
        qs, ks = tuple(q_segments), tuple(kv_segments)
        q, q_rep = _split_local(q, qs, n, 1)
        k, k_rep = _split_local(k, ks, n, 1)
        v, v_rep = _split_local(v, ks, n, 1)
        if q.shape == k.shape == v.shape:
            q, k, v = all_to_all(torch.stack([q, k, v]), 2, 3, PATCH.ulysses_group).unbind(0)
        else:
            q = all_to_all(q, 1, 2, PATCH.ulysses_group)
            k = all_to_all(k, 1, 2, PATCH.ulysses_group)
            v = all_to_all(v, 1, 2, PATCH.ulysses_group)
        first = PATCH.patch * u
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
    kidx = _index(tuple(kpos), k.device)
    kbuf, vbuf = runtime.kv_buffer(site, k, v, total)
    kbuf.index_copy_(2, kidx, k)
    vbuf.index_copy_(2, kidx, v)
    kk, vv = kbuf, vbuf
    if kk.shape[1] != q.shape[1]:  # grouped-query attention
        kk = kk.repeat_interleave(q.shape[1] // kk.shape[1], dim=1)
        vv = vv.repeat_interleave(q.shape[1] // vv.shape[1], dim=1)
    bias = None
    if attn_mask is not None:
        bias = _mask_bias(attn_mask, qpos, tuple(range(total)), q.dtype, q.device, heads_slice)
    out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=bias, scale=scale)
    if u > 1:
        # queries of whole segments: every rank computed its heads; gather them
        out, whole = out.split([q_sharded, out.shape[2] - q_sharded], dim=2)
        if whole.shape[2]:
            whole = all_gather(whole.contiguous(), 1, heads, PATCH.ulysses_group)
        out = _merge_local(all_to_all(out.contiguous(), 2, 1, PATCH.ulysses_group), whole, tuple(q_segments), n, 1)
    return out


def _pf_ring_attention(q, k, v, attn_mask, site, q_segments, kv_segments, scale):
    """pipefusion x ring (x ulysses): the patch's chunks of the patched segments are all-to-alled over the
    U ulysses ranks (to U consecutive chunks, heads/U), their fresh K/V go into this ring rank's buffer (its
    chunks of every patch, see `_buffer_chunks`), and the queries attend over the buffers of all R ring
    ranks by ring attention, the mask re-indexed to that key order. Segments every patch computes whole (a
    time token) stay out of the buffers: their keys are attended locally (this rank's heads) and merged by
    log-sum-exp; their queries attend like the others, and their outputs are gathered over the heads."""
    from xdit_fx.ops.collectives import _chunk_attention, merge_partial, ring_attention_lse
    rr, u, sub = PATCH.ring, PATCH.ulysses, PATCH.sub
    n = PATCH.patches * sub * rr * u  # chunks per sharded segment
    heads = q.shape[1]
    if k.shape[1] != heads:  # grouped-query attention
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
        v = v.repeat_interleave(heads // v.shape[1], dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if kv_segments is None or not any(s for _, s in kv_segments):  # cross-attention to whole keys
        bias = None
        if attn_mask is not None:
            qpos = _local_positions(q_segments, n, _ring_chunks())
            bias = _mask_bias(attn_mask, qpos, tuple(range(k.shape[2])), q.dtype, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    runtime = PATCH.runtime
    if runtime is None:
        raise XditFxError("pf_attention ran outside a PipeFusion runtime (a dump's graph run by hand?); "
                          "run the model through xdit_fx.parallelize(model, plan).")
    q_p, q_w = _split_local(q, q_segments, n, sub)
    k_p, k_w = _split_local(k, kv_segments, n, sub)
    v_p, v_w = _split_local(v, kv_segments, n, sub)
    heads_slice = None
    held = [_ring_chunks()]
    if u > 1:  # patched tokens: [B, H, chunks, D] -> [B, H/U, U ranks' chunks, D]; whole ones: this rank's heads
        group = PATCH.ulysses_group
        heads_slice = slice(PATCH.urank * heads // u, (PATCH.urank + 1) * heads // u)
        if q_p.shape == k_p.shape == v_p.shape:
            q_p, k_p, v_p = all_to_all(torch.stack([q_p, k_p, v_p]), 2, 3, group).unbind(0)
        else:
            q_p = all_to_all(q_p, 1, 2, group) if q_p.shape[2] else q_p[:, heads_slice]
            k_p, v_p = all_to_all(k_p, 1, 2, group), all_to_all(v_p, 1, 2, group)
        q_w, k_w, v_w = q_w[:, heads_slice], k_w[:, heads_slice], v_w[:, heads_slice]
        held = [_ring_chunks(uu) for uu in range(u)]
    qpos = sum((_chunk_positions(q_segments, n, c) for c in held), ()) + _whole_positions(q_segments)
    kpos = sum((_chunk_positions(kv_segments, n, c) for c in held), ())
    buffer_pos = _chunk_positions(kv_segments, n, _buffer_chunks(PATCH.rrank))
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
    out, lse = ring_attention_lse(qq, kbuf, vbuf, bias, scale, PATCH.ring_group)
    if k_w.shape[2]:  # whole segments' keys, once (they are in no ring buffer)
        bias = None
        if attn_mask is not None:
            bias = _mask_bias(attn_mask, qpos, _whole_positions(kv_segments), q.dtype, q.device, heads_slice)
        out, lse = merge_partial(out, lse, *_chunk_attention(qq, k_w, v_w, bias, scale))
    out = out.to(q.dtype)
    o_p, o_w = out.split([q_p.shape[2], q_w.shape[2]], dim=2)
    if u > 1:
        if o_p.shape[2]:
            o_p = all_to_all(o_p.contiguous(), 2, 1, PATCH.ulysses_group)
        if o_w.shape[2]:
            o_w = all_gather(o_w.contiguous(), 1, heads, PATCH.ulysses_group)
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


@dataclass
class PipeFusionRecord:
    step: int
    slot: int
    warm: bool


class PipeFusionRuntime(StepSlots):
    """Per ParallelModule: the stage of this rank, the K/V buffers, warm-up counting, the patch loop."""

    def __init__(self, plan, groups) -> None:
        self.plan = plan
        self.group = groups.names["pipefusion"]
        pg = _group(self.group)
        self.stage = dist.get_rank(pg)
        self.ranks = [dist.get_global_rank(pg, i) for i in range(dist.get_world_size(pg))]
        self.ulysses = plan.ulysses_degree
        self.ulysses_group = groups.names["ulysses"] if self.ulysses > 1 else ""
        self.urank = dist.get_rank(_group(self.ulysses_group)) if self.ulysses > 1 else 0
        self.ring = plan.ring_degree
        self.ring_group = groups.names["ring"] if self.ring > 1 else ""
        self.rrank = dist.get_rank(_group(self.ring_group)) if self.ring > 1 else 0
        # with ring, the last stage gathers its exits over ring x ulysses (sp rank = ring rank * U + ulysses rank)
        self.sp_group = groups.names["sp"] if self.ring > 1 and self.ulysses > 1 else self.ring_group
        self.reset()

    # ---- generation / step / call boundaries (StepSlots: steps and slots) -------------------------------
    def reset(self) -> None:
        """A new generation: drop the K/V buffers and the warm-up counts."""
        self.kv: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.filled: dict[tuple, tuple] = {}
        self.calls: dict[int, int] = {}
        self.records: list[PipeFusionRecord] = []
        #: of the last region call: seconds in this stage's compute, and from entry to the exit broadcast
        self.last_busy_s = self.last_wall_s = 0.0
        self.reset_steps()
        self.warm = True
        self.ordinal = 0

    def next_call(self) -> None:
        super().next_call()
        done = self.calls.get(self.slot, 0)
        self.warm = done < self.plan.pipefusion_warmup_steps
        self.calls[self.slot] = done + 1
        self.ordinal = 0

    # ---- buffers -----------------------------------------------------------------------------------------
    def kv_buffer(self, site: int, k: torch.Tensor, v: torch.Tensor, total: int):
        key = PATCH.key + (site,)
        shape_k = k.shape[:2] + (total,) + k.shape[3:]
        shape_v = v.shape[:2] + (total,) + v.shape[3:]
        buf = self.kv.get(key)
        if buf is None or buf[0].shape != shape_k or buf[1].shape != shape_v or buf[0].dtype != k.dtype:
            buf = (k.new_zeros(shape_k), v.new_zeros(shape_v))
            self.kv[key] = buf
        return buf

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.kv.values() for t in pair)

    # ---- one call of a region -----------------------------------------------------------------------------
    def run(self, region: "PipeFusionRegion", live_ins: tuple[Any, ...]) -> tuple:
        key = (self.slot, self.ordinal)
        self.ordinal += 1
        sig = tuple(tuple(t.shape) for t in live_ins if isinstance(t, torch.Tensor))
        warm = self.warm or self.filled.get(key) != sig
        prog = region.warm_region if warm else region
        if prog is None:
            raise XditFxError("this PipeFusion region has no warm-up program bound (built by a dump or a test); "
                              "run the model through xdit_fx.parallelize(model, plan).")
        self.records.append(PipeFusionRecord(self.step, self.slot, warm))
        out = self._run(prog.spec, live_ins, key)
        if warm:
            self.filled[key] = sig
        return out

    def _run(self, spec, live_ins: tuple[Any, ...], key: tuple) -> tuple:
        pg = _group(self.group)
        me, last, m = self.stage, spec.stages - 1, spec.patches
        program = spec.programs[me]
        device = next((t.device for t in live_ins if isinstance(t, torch.Tensor)), torch.device("cpu"))
        n_cross = max(len(spec.crossings), 1)
        recv_order = sorted({i for kind, i in program.inputs if kind == "recv"})
        exits: list[list[torch.Tensor | None]] = [[None] * m for _ in spec.exits]
        pending = []
        busy, t_start = 0.0, time.perf_counter()
        PATCH.runtime, PATCH.patches, PATCH.key = self, m, key
        PATCH.ulysses, PATCH.urank, PATCH.ulysses_group = self.ulysses, self.urank, self.ulysses_group
        PATCH.ring, PATCH.rrank, PATCH.ring_group = self.ring, self.rrank, self.ring_group
        PATCH.sub = self.plan.patches // m if self.ring > 1 else 1  # warm-up: one run covers all M patches
        try:
            for p in range(m):
                PATCH.patch = p
                received = {}
                for i in recv_order:  # in crossing order (NCCL matches sends and receives by order)
                    c = spec.crossings[i]
                    buf = torch.empty(c.shape, dtype=c.dtype, device=device)
                    dist.recv(buf, src=self.ranks[c.src], group=pg, tag=p * n_cross + i)
                    COMM.add(self.group, "pipefusion_p2p", c.nbytes)
                    received[i] = buf
                args = [live_ins[i] if kind == "live_in" else received[i] for kind, i in program.inputs]
                t0 = time.perf_counter()
                outs = (program.compiled if program.compiled is not None else program.body)(*args)
                busy += time.perf_counter() - t0
                for (kind, i), o in zip(program.outputs, outs):
                    if kind == "send":
                        o = o.contiguous()
                        for d in spec.crossings[i].dsts:
                            pending.append((dist.isend(o, dst=self.ranks[d], group=pg, tag=p * n_cross + i), o))
                    else:
                        exits[i][p] = o
        finally:
            PATCH.runtime = None
            PATCH.ulysses, PATCH.urank, PATCH.ulysses_group = 1, 0, ""
            PATCH.ring, PATCH.rrank, PATCH.ring_group, PATCH.sub = 1, 0, "", 1
        for work, _ in pending:
            work.wait()
        full = []
        for e, pieces in zip(spec.exits, exits):
            if me == last and self.ring > 1:  # chunk (j*R + r)*U + u of every patch j from ranks (r, u)
                n = self.plan.patches * self.ring * self.ulysses
                t = _assemble(self._gather_ring(pieces, e.dim, e.segments, n), e.dim, e.segments, n)
            elif me == last and self.ulysses > 1:  # chunk p*U + r of every patch p from ulysses rank r
                t = _assemble(self._gather_ulysses(pieces), e.dim, e.segments, m * self.ulysses)
            elif me == last:
                t = _assemble(pieces, e.dim, e.segments, m)
            else:
                t = torch.empty(e.shape, dtype=e.dtype, device=device)
            if len(self.ranks) > 1:
                t = t.contiguous()
                dist.broadcast(t, src=self.ranks[last], group=pg)
                if me != last:
                    COMM.add(self.group, "broadcast", t.numel() * t.element_size())
            full.append(t)
        # wall: until the last stage's output has arrived, so 1 - busy / wall is this stage's bubble
        self.last_busy_s, self.last_wall_s = busy, time.perf_counter() - t_start
        return tuple(full)

    def _gather_ulysses(self, pieces: list[torch.Tensor]) -> list[torch.Tensor]:
        """The last stage's M pieces of an exit from each of its U ranks, in chunk order (p*U + r)."""
        pg = _group(self.ulysses_group)
        mine = torch.stack(pieces).contiguous()
        parts = [torch.empty_like(mine) for _ in range(self.ulysses)]
        dist.all_gather(parts, mine, group=pg)
        COMM.add(self.ulysses_group, "all_gather", mine.numel() * mine.element_size() * (self.ulysses - 1))
        return [parts[r][p] for p in range(len(pieces)) for r in range(self.ulysses)]

    def _gather_ring(self, pieces: list[torch.Tensor], dim: int, segments, n: int) -> list[torch.Tensor]:
        """The last stage's pieces of an exit from each of its R x U ranks, as one piece per chunk in chunk
        order: chunk (j*R + r)*U + u = j*RU + s comes from sp rank s = r*U + u. A warm-up piece holds all M
        patches' chunks and is split first."""
        pg, size = _group(self.sp_group), self.ring * self.ulysses
        mine = torch.stack(pieces).contiguous()
        parts = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(parts, mine, group=pg)
        COMM.add(self.sp_group, "all_gather", mine.numel() * mine.element_size() * (size - 1))
        sub = self.plan.patches // len(pieces)
        per_rank = [[c for p in range(len(pieces)) for c in _split_sub(parts[s][p], dim, segments, n, sub)]
                    for s in range(size)]
        return [per_rank[s][j] for j in range(self.plan.patches) for s in range(size)]


def _split_sub(piece: torch.Tensor, dim: int, segments, n: int, sub: int) -> list[torch.Tensor]:
    """A piece holding `sub` chunks of every sharded segment (segment-major) -> `sub` one-chunk pieces."""
    if sub == 1:
        return [piece]
    lens = [length // n * sub if s else length for length, s in segments]
    parts = piece.split(lens, dim=dim)
    per = [p.chunk(sub, dim=dim) if s else [p] * sub for p, (_, s) in zip(parts, segments)]
    return [torch.cat([x[j] for x in per], dim=dim) if len(per) > 1 else per[0][j] for j in range(sub)]


def _assemble(pieces: list[torch.Tensor], dim: int, segments, m: int) -> torch.Tensor:
    """The whole tensor from its M patches: chunk p of every sharded segment comes from patch p; a
    replicated segment (computed whole by every patch) from the last patch."""
    if m == 1:
        return pieces[0]
    lens = [length // m if sharded else length for length, sharded in segments]
    split = [piece.split(lens, dim=dim) for piece in pieces]
    out = []
    for j, (length, sharded) in enumerate(segments):
        out.append(torch.cat([s[j] for s in split], dim=dim) if sharded else split[-1][j])
    return out[0] if len(out) == 1 else torch.cat(out, dim=dim)


class PipeFusionRegion(nn.Module):
    """The per-patch part of the graph, cut into stages. `body` is the whole region (for dumps);
    `spec.programs[s].body` what stage s runs. `warm_region`: the one-patch version (warm-up calls)."""

    def __init__(self, body, spec) -> None:
        super().__init__()
        self.body = body
        self.spec = spec
        self.runtime: PipeFusionRuntime | None = None
        self.warm_region: PipeFusionRegion | None = None

    def bind(self, runtime: PipeFusionRuntime, warm_region: "PipeFusionRegion") -> None:
        self.runtime = runtime
        self.warm_region = warm_region

    def forward(self, *live_ins: Any) -> tuple:
        if self.runtime is None:
            raise XditFxError("this PipeFusion region is not bound to a runtime (it was built by a dump or a "
                              "test); run the model through xdit_fx.parallelize(model, plan).")
        return self.runtime.run(self, live_ins)


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of parameter storage a module holds (freed parameters hold one element)."""
    seen, total = set(), 0
    for p in module.parameters():
        s = p.untyped_storage()
        if s.data_ptr() in seen:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


def free_parameters(tensors: list[torch.Tensor]) -> int:
    """Replace each tensor's storage by one element broadcast to its shape; returns the bytes released."""
    freed = 0
    for t in tensors:
        if t.numel() > 1 and t.stride() != (0,) * t.dim():
            freed += t.numel() * t.element_size()
            with torch.no_grad():
                t.data = torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)
    return freed
