"""The cache runtime: run or skip the region insert_cache cut out, with the same decision on every rank.

A `CacheRuntime` belongs to one ParallelModule. Its state is kept per *slot*: the position of a call within
a denoising step (a two-call CFG pipeline makes two calls per step: the conditional and the unconditional
branch each get their own probe history and residuals). Inside a pipeline the scheduler hook marks the
steps; a bare module has one slot. `reset()` starts a new generation (the pipeline wrapper calls it).

The metric is a ratio of two sums over the probe tensor; under sequence parallelism each rank holds a shard
of it, and under cfg/dp batch splitting a share of the batch, so both sums are all-reduced over those
ranks before the ratio is taken: every rank that shares a call takes the same decision, and it is the
decision the single process takes on the whole tensor (up to float64 summation order).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist

from xdit_fx.errors import UnsupportedGraph
from xdit_fx.ops import comm
from xdit_fx.ops.collectives import _group
from xdit_fx.ops.comm import all_reduce_received
from xdit_fx.runtime.steps import StepSlots

if TYPE_CHECKING:
    from xdit_fx.ops.regions import CachedRegion

log = logging.getLogger(__name__)


@dataclass
class CallRecord:
    """One call of the cached module."""

    step: int           # denoising step (pipeline) or call number within the generation (bare module)
    slot: int           # call within the step (two-call CFG: 0 conditional, 1 unconditional)
    full: bool          # ran the whole block stack
    metric: float | None  # relative L1 change (FBC) or accumulated rescaled change (TeaCache); None: warm-up
    blocks_run: int
    blocks_total: int


@dataclass
class CacheStats:
    """Per generation: which calls ran the full stack."""

    records: list[CallRecord] = field(default_factory=list)

    def full_steps(self, slot: int = 0) -> list[int]:
        return [r.step for r in self.records if r.slot == slot and r.full]

    def skipped_steps(self, slot: int = 0) -> list[int]:
        return [r.step for r in self.records if r.slot == slot and not r.full]

    @property
    def blocks_total(self) -> int:
        return sum(r.blocks_total for r in self.records)

    @property
    def blocks_run(self) -> int:
        return sum(r.blocks_run for r in self.records)

    @property
    def skipped_fraction(self) -> float:
        """Fraction of block evaluations skipped over the generation."""
        return 1.0 - self.blocks_run / self.blocks_total if self.blocks_total else 0.0

    def summary(self) -> str:
        if not self.records:
            return "cache: no calls"
        slots = sorted({r.slot for r in self.records})
        parts = []
        for s in slots:
            recs = [r for r in self.records if r.slot == s]
            full = "".join("F" if r.full else "." for r in recs)
            parts.append(f"{'slot ' + str(s) + ' ' if len(slots) > 1 else ''}{full}")
        return (f"cache: {self.blocks_total - self.blocks_run} of {self.blocks_total} block evaluations skipped "
                f"({100 * self.skipped_fraction:.0f}%); full stack (F) per step: {' / '.join(parts)}")


@dataclass
class _SlotState:
    calls: int = 0
    prev: torch.Tensor | None = None       # FBC: residual of the last full call; TeaCache: last probe
    accumulated: float = 0.0               # TeaCache
    cached: list[Any] | None = None        # per output: residual (partner not None) or value
    partners: list[int | None] = field(default_factory=list)  # per output: the live-in its residual is over
    prev_stream: torch.Tensor | None = None  # calibration: the last stream output


class CacheRuntime(StepSlots):
    """Decides, per call, whether a region runs; keeps the residuals; records statistics."""

    def __init__(self, config, reduce_groups: Callable[[], list[str]] | None = None) -> None:
        self.config = config
        self._reduce_groups = reduce_groups or (lambda: [])
        self.active: set[int] = set()  # the regions that may skip (kept across generations)
        self.refusals: list[str] = []  # why a captured graph got no region (insert_cache's reasons)
        self._costs: dict[int, int] = {}
        self.calibrating = False  # record (probe change, stream change) pairs instead of skipping
        self.calibration: list[tuple[int, float, float]] = []
        self.reset()

    # ---- generation / step / call boundaries ------------------------------------------------------------
    def reset(self) -> None:
        """A new generation: forget probes and residuals, start new statistics."""
        self.states: dict[tuple[int, int], _SlotState] = {}
        self.stats = CacheStats()
        self.reset_steps()
        self._ran: list[int] = []
        self._groups: list[str] = []
        self._pending: list[tuple[int, CallRecord]] = []
        self._spans: dict[int, int] = {}

    def begin_run(self, batch_group: str | None) -> None:
        self._ran = []
        self._pending = []
        self._groups = list(self._reduce_groups()) + ([batch_group] if batch_group else [])

    def end_run(self) -> None:
        """After a call: the region that may skip is the costliest one that ran (a forward split into several
        graphs by graph breaks has one region per graph with blocks: the others always run); the call's
        record counts the blocks of every region that ran."""
        if not self._ran:
            reasons = "".join(f" - {' '.join(r.split())}" for r in dict.fromkeys(self.refusals))
            raise UnsupportedGraph(
                "cache: no captured graph of this model holds a block stack to skip"
                + (f":{reasons}" if reasons else " (the forward may be split into several graphs around its "
                   "blocks)") + "\n  Look at the graphs with: xdit-fx dump MODEL --plan ... --out DIR; run it "
                "without cache.")
        ran = list(dict.fromkeys(self._ran))
        if not self.active & set(ran):
            self.active.add(max(ran, key=lambda r: (self._costs[r], -ran.index(r))))
        for region_id, record in self._pending:
            if region_id in self.active:
                others = [self._spans[r] for r in ran if r not in self.active]
                record.blocks_run += sum(others)
                record.blocks_total += sum(others)
                self.stats.records.append(record)

    # ---- the decision -----------------------------------------------------------------------------------
    def _rel_l1(self, new: torch.Tensor, old: torch.Tensor) -> float:
        sums = torch.stack([(new - old).abs().sum(dtype=torch.float64), old.abs().sum(dtype=torch.float64)])
        for name in self._groups:
            pg = _group(name)
            dist.all_reduce(sums, group=pg)
            comm.record(name, "all_reduce", all_reduce_received(sums.numel() * sums.element_size(), dist.get_world_size(pg)))
        num, den = float(sums[0]), float(sums[1])
        if den > 0:
            return num / den
        return 0.0 if num == 0 else float("inf")  # a zero tensor (zero-initialised blocks) that stayed zero

    def run(self, region: "CachedRegion", probe: tuple[torch.Tensor, ...], live_ins: tuple[Any, ...]) -> tuple:
        spec, cfg = region.spec, self.config
        self._ran.append(id(region))
        self._costs[id(region)] = spec.cost
        self._spans[id(region)] = spec.blocks_total
        if self.active and id(region) not in self.active:  # another graph holds the main stack: always run
            return tuple(region.call_body(live_ins))
        st = self.states.setdefault((id(region), self.slot), _SlotState())
        warm = st.calls < cfg.warmup_steps or st.prev is None
        metric = None
        if spec.kind == "fbc":
            current = (probe[0] - probe[1]) if len(probe) == 2 else probe[0]
            if not warm:
                metric = self._rel_l1(current, st.prev)
            skip = not warm and not self.calibrating and cfg.threshold > 0 and metric < cfg.threshold
            if not skip:
                st.prev = current if len(probe) == 2 else current.clone()
        else:
            current = probe[0]
            if warm:
                st.accumulated = 0.0
                skip = False
            else:
                change = self._rel_l1(current, st.prev)
                if self.calibrating:
                    self._calibration_x = change
                st.accumulated += cfg.rescale(change)
                metric = st.accumulated
                skip = not self.calibrating and cfg.threshold > 0 and st.accumulated < cfg.threshold
                if not skip:
                    st.accumulated = 0.0
            st.prev = current.clone()
        st.calls += 1
        if skip and st.cached is None:
            skip = False
        if skip:
            outs = tuple(c if j is None else live_ins[j] + c for j, c in zip(st.partners, st.cached))
        else:
            outs = tuple(region.call_body(live_ins))
            st.partners, st.cached = [], []
            for j, o in zip(spec.residual_of, outs):
                residual = j is not None and isinstance(o, torch.Tensor) and isinstance(live_ins[j], torch.Tensor) \
                    and o.shape == live_ins[j].shape
                st.partners.append(j if residual else None)
                st.cached.append(o - live_ins[j] if residual else o.clone() if isinstance(o, torch.Tensor) else o)
            if self.calibrating:
                self._record_calibration(st, outs[spec.stream_out], spec.kind)
        blocks_run = spec.blocks_total - (spec.blocks_skipped if skip else 0)
        step = self.step if self.step_hooked else st.calls - 1
        self._pending.append((id(region), CallRecord(step, self.slot, not skip, metric, blocks_run, spec.blocks_total)))
        return outs

    def _record_calibration(self, st: _SlotState, stream: torch.Tensor, kind: str) -> None:
        if st.prev_stream is not None and kind == "teacache" and getattr(self, "_calibration_x", None) is not None:
            y = self._rel_l1(stream, st.prev_stream)
            self.calibration.append((self.slot, self._calibration_x, y))
        self._calibration_x = None
        st.prev_stream = stream.clone()
