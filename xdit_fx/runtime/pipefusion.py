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
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from xdit_fx.errors import XditFxError
from xdit_fx.ops import comm
from xdit_fx.ops.collectives import _group
from xdit_fx.ops.pipefusion import PatchState, current, running
from xdit_fx.runtime.steps import StepSlots

if TYPE_CHECKING:
    from xdit_fx.ops.regions import PipeFusionRegion

log = logging.getLogger(__name__)


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
        key = current().key + (site,)
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
        state = PatchState(buffers=self, patches=m, key=key, ulysses=self.ulysses, urank=self.urank,
                           ulysses_group=self.ulysses_group, ring=self.ring, rrank=self.rrank,
                           ring_group=self.ring_group,
                           sub=self.plan.patches // m if self.ring > 1 else 1)  # warm-up: one run covers all M
        with running(state):
            for p in range(m):
                state.patch = p
                received = {}
                for i in recv_order:  # in crossing order (NCCL matches sends and receives by order)
                    c = spec.crossings[i]
                    buf = torch.empty(c.shape, dtype=c.dtype, device=device)
                    dist.recv(buf, src=self.ranks[c.src], group=pg, tag=p * n_cross + i)
                    comm.record(self.group, "pipefusion_p2p", c.nbytes)
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
                    comm.record(self.group, "broadcast", t.numel() * t.element_size())
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
        comm.record(self.ulysses_group, "all_gather", mine.numel() * mine.element_size() * (self.ulysses - 1))
        return [parts[r][p] for p in range(len(pieces)) for r in range(self.ulysses)]

    def _gather_ring(self, pieces: list[torch.Tensor], dim: int, segments, n: int) -> list[torch.Tensor]:
        """The last stage's pieces of an exit from each of its R x U ranks, as one piece per chunk in chunk
        order: chunk (j*R + r)*U + u = j*RU + s comes from sp rank s = r*U + u. A warm-up piece holds all M
        patches' chunks and is split first."""
        pg, size = _group(self.sp_group), self.ring * self.ulysses
        mine = torch.stack(pieces).contiguous()
        parts = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(parts, mine, group=pg)
        comm.record(self.sp_group, "all_gather", mine.numel() * mine.element_size() * (size - 1))
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
    """The whole tensor from its M patches: chunk p of every sharded segment comes from patch p (ceil(L/M)
    tokens, the padding past the segment's end dropped); a replicated segment (computed whole by every
    patch) from the last patch."""
    if m == 1:
        return pieces[0]
    lens = [-(-length // m) if sharded else length for length, sharded in segments]
    split = [piece.split(lens, dim=dim) for piece in pieces]
    out = []
    for j, (length, sharded) in enumerate(segments):
        out.append(torch.cat([s[j] for s in split], dim=dim).narrow(dim, 0, length) if sharded else split[-1][j])
    return out[0] if len(out) == 1 else torch.cat(out, dim=dim)


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
