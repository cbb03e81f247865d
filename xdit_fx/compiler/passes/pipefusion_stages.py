"""PipeFusion, steps 2 and 3: the stage cut and each stage's program.

* **Stage cut** (`cut_stages`): contiguous runs of blocks (in graph order) into ``pipefusion_degree`` stages
  minimising the most expensive stage (a linear-partition DP over `xdit_fx.compiler.cost.block_costs`), so
  Flux's double blocks weigh more than its single ones. `assign_stages` gives every region node its block's
  stage, else the latest of its inputs', else -1 (recomputed where needed: a slice of a RoPE table).
* **Stage extraction**: the values that cross from stage s to a later stage once per patch (`find_crossings`:
  the token stream, an MMDiT's text stream, a U-ViT's long skip...), the region's exits (`find_exits`,
  computed by the last stage unless a stage computes them), the in-place writes that travel with a
  recomputed value (`in_place_writers`), and one GraphModule per stage (`stage_programs`) with what each of
  its inputs and outputs is (live-in, received crossing; sent crossing, exit).

The records (`Crossing`, `Exit`, `StageProgram`, `PipeFusionSpec`) are what the PipeFusion region module
and the runtime read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from xdit_fx.compiler.fx_utils import describe_node, META_BLOCK, META_LAYOUT, example_value, is_param_placeholder
from xdit_fx.compiler.passes.cache_regions import _writes_in_place
from xdit_fx.compiler.passes.sequence_parallel import SeqLayout
from xdit_fx.compiler.regions import extract, region_inputs
from xdit_fx.errors import PlanError, UnsupportedGraph

META_STAGE = "xfx.stage"            # stage of a node of the PipeFusion region (-1: recomputed where needed)


# ---- records -----------------------------------------------------------------------------------------

@dataclass
class Crossing:
    value: str          # node name
    src: int
    dsts: tuple[int, ...]
    shape: tuple[int, ...]  # per patch
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class Exit:
    value: str                   # the local (per patch) node gathered
    dim: int
    segments: tuple
    shape: tuple[int, ...]       # full (assembled) shape
    dtype: torch.dtype
    src: int                     # stage that computes it


@dataclass
class StageProgram:
    """What one stage runs per patch."""

    body: fx.GraphModule
    inputs: list[tuple[str, object]]   # per body placeholder: ("live_in", index) or ("recv", crossing index)
    outputs: list[tuple[str, int]]     # per body output: ("send", crossing index) or ("exit", exit index)
    params: list[str]                  # placeholder names of the parameters it reads
    compiled: Any = None               # with Plan(compile=True): `body` split at the pf ops, pieces by Inductor


@dataclass
class PipeFusionSpec:
    stages: int
    patches: int
    blocks: list[str]
    block_stage: list[int]
    block_cost: list[float]
    crossings: list[Crossing]
    exits: list[Exit]
    kv_sites: list[int]
    live_ins: list[str]
    programs: list[StageProgram] = field(default_factory=list)
    ulysses: int = 1  # U: each patch is split over U ranks per stage (chunk p*U + r), attention all-to-alls
    ring: int = 1  # R: each patch is split over R ranks per stage (chunk p*R + r), ring attention over K/V buffers

    def stage_costs(self) -> list[float]:
        out = [0.0] * self.stages
        for s, c in zip(self.block_stage, self.block_cost):
            out[s] += c
        return out

    def bytes_received(self, stage: int) -> int:
        """Bytes of crossing values a stage receives in one patched call (all patches)."""
        return self.patches * sum(c.nbytes for c in self.crossings if stage in c.dsts)

    def describe(self) -> str:
        spans = []
        for s in range(self.stages):
            bs = [b for b, st in zip(self.blocks, self.block_stage) if st == s]
            spans.append(f"stage {s}: {_span(bs)} ({self.stage_costs()[s] / 1e6:.3g} MFLOP)")
        cross = ", ".join(f"%{c.value} {c.src}->{'/'.join(map(str, c.dsts))} {list(c.shape)}" for c in self.crossings)
        return (f"{self.stages} stages x {self.patches} patches"
                + (f" x ulysses {self.ulysses}" if self.ulysses > 1 else "")
                + (f" x ring {self.ring}" if self.ring > 1 else "") + "; " + "; ".join(spans)
                + f"; crossing per patch: {cross or 'none'}; KV buffers at {len(self.kv_sites)} attention sites")


def _span(blocks: list[str]) -> str:
    stacks: dict[str, list[str]] = {}
    for b in blocks:
        stack, _, idx = b.rpartition(".")
        stacks.setdefault(stack, []).append(idx)
    return ", ".join(f"{s}.{i[0]}" + (f"..{i[-1]}" if len(i) > 1 else "") for s, i in stacks.items()) or "none"


def global_value(node: fx.Node):
    """The fake value (global shape) of a node; slices inserted by patch_sequence have their input's."""
    v = example_value(node)
    while v is None and node.op == "call_function" and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
        v = example_value(node)
    return v


def local_shape(node: fx.Node, m: int) -> tuple[int, ...]:
    """A node's shape in one of `m` chunks of its token segments."""
    v = global_value(node)
    shape = list(v.shape) if isinstance(v, torch.Tensor) else []
    lay = node.meta.get(META_LAYOUT)
    if isinstance(lay, SeqLayout):
        shape[lay.dim] = lay.local_len(m)
    return tuple(shape)


# ---- the stage cut -----------------------------------------------------------------------------------

def cut_stages(costs: list[float], n: int) -> list[int]:
    """Stage of each block: contiguous runs, n non-empty stages, minimising the most expensive one."""
    k = len(costs)
    if n > k:
        raise PlanError(f"pipefusion_degree={n} but the block stack has only {k} blocks; use pipefusion <= {k}.")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: the smallest max-stage-cost of the first i blocks in s stages
    best = [[inf] * (k + 1) for _ in range(n + 1)]
    arg = [[0] * (k + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for s in range(1, n + 1):
        for i in range(s, k + 1):
            for j in range(s - 1, i):
                v = max(best[s - 1][j], prefix[i] - prefix[j])
                if v < best[s][i] - 1e-9 * abs(v):
                    best[s][i], arg[s][i] = v, j
    stages = [0] * k
    i = k
    for s in range(n, 0, -1):
        j = arg[s][i]
        for b in range(j, i):
            stages[b] = s - 1
        i = j
    return stages


def assign_stages(nodes: list[fx.Node], region: set[fx.Node], stage_of_block: dict[str, int]) -> dict[fx.Node, int]:
    """Stage of every region node (also written as META_STAGE): its block's, else the latest of its inputs',
    else -1 (recomputed where needed). Refused when a block reads a later stage's value."""
    stage: dict[fx.Node, int] = {}
    for n in nodes:
        if n not in region:
            continue
        ins = [stage[a] for a in n.all_input_nodes if a in region]
        s_in = max(ins, default=-1)
        if n.meta.get(META_BLOCK) in stage_of_block:
            s = stage_of_block[n.meta[META_BLOCK]]
            if s_in > s:
                src = next(a for a in n.all_input_nodes if a in region and stage[a] == s_in)
                raise UnsupportedGraph(
                    f"pipefusion: {describe_node(n)}\n  in {n.meta[META_BLOCK]} (stage {s}) reads %{src.name} of "
                    f"stage {s_in}: the blocks do not run in graph order, so no contiguous stage cut exists.")
        else:
            s = s_in
        stage[n] = s
        n.meta[META_STAGE] = s
    return stage


# ---- stage extraction --------------------------------------------------------------------------------

def find_exits(gathers: list[fx.Node], region: set[fx.Node], stage: dict[fx.Node, int], last: int) -> list[Exit]:
    """One Exit per exit gather: the per-patch value it assembles and the stage that computes it."""
    exits: list[Exit] = []
    for g in gathers:
        loc, dim, segments = g.args[0], g.args[1], g.args[2]
        src = stage.get(loc, -1) if loc in region else -1
        full = global_value(loc)
        exits.append(Exit(loc.name, dim, tuple(tuple(s) for s in segments), tuple(full.shape),
                          full.dtype, last if src < 0 else src))
    return exits


def find_crossings(nodes: list[fx.Node], region: set[fx.Node], stage: dict[fx.Node, int], exits: list[Exit],
                   last: int, chunks: int) -> list[Crossing]:
    """The values of stage s read at a stage t > s, sent once per patch (exits are read by the last stage)."""
    readers: dict[fx.Node, set[int]] = {}
    for n in nodes:
        if n not in region:
            continue
        for a in n.all_input_nodes:
            if a in region and stage[a] >= 0 and stage[n] > stage[a]:
                readers.setdefault(a, set()).add(stage[n])
    by_name = {n.name: n for n in nodes}
    for e in exits:
        loc = by_name[e.value]
        if loc in region and 0 <= stage[loc] < last:
            readers.setdefault(loc, set()).add(last)
    crossings = []
    for n in nodes:
        if n in readers:
            v = global_value(n)
            if not isinstance(v, torch.Tensor):
                raise UnsupportedGraph(f"pipefusion: {describe_node(n)}\n  crosses from stage {stage[n]} to "
                                       f"{sorted(readers[n])} and is not a tensor ({type(v).__name__}).")
            crossings.append(Crossing(n.name, stage[n], tuple(sorted(readers[n])), local_shape(n, chunks), v.dtype))
    return crossings


def in_place_writers(nodes: list[fx.Node], region: set[fx.Node],
                     stage: dict[fx.Node, int]) -> dict[fx.Node, list[fx.Node]]:
    """In-place writes into values recomputed per stage (a mask built by x[:, a:b] = 1): they go with every
    copy of that value (value -> its writers). A write that other stages would have to see is refused."""
    writers: dict[fx.Node, list[fx.Node]] = {}
    for n in nodes:
        if n in region and _writes_in_place(n) and n.args and isinstance(n.args[0], fx.Node):
            target = n.args[0]
            readers_of_target = {stage[u] for u in target.users if u in region and u is not n}
            if stage[n] >= 0 and (target not in region or stage[target] not in (-1, stage[n])
                                  or readers_of_target - {stage[n], -1}):
                raise UnsupportedGraph(
                    f"pipefusion: {describe_node(n)}\n  writes %{target.name} in place on stage {stage[n]}, and "
                    "another stage (or the graph outside the per-patch region) reads it: the write would not reach "
                    "the other rank. Look at it with: xdit-fx dump MODEL --plan pipefusion=2 --out DIR")
            if stage[n] < 0:
                writers.setdefault(target, []).append(n)
    return writers


def _stage_nodes(region: set[fx.Node], stage: dict[fx.Node, int], s: int, out_nodes: list[fx.Node],
                 writers: dict[fx.Node, list[fx.Node]]) -> set[fx.Node]:
    """The nodes stage `s` runs: its own, plus the recomputed (stage -1) ones it needs, with their writes."""
    wanted = {n for n in region if stage[n] == s}
    todo = [a for n in list(wanted) + out_nodes for a in n.all_input_nodes]
    todo += [n for n in out_nodes if n in region and stage[n] < 0]
    while todo:
        a = todo.pop()
        if a in region and stage[a] < 0 and a not in wanted:
            wanted.add(a)
            todo.extend(a.all_input_nodes)
            for w in writers.get(a, ()):  # its in-place writes come with it
                todo.append(w)
    return wanted


def stage_programs(owner: fx.GraphModule, nodes: list[fx.Node], region: set[fx.Node], stage: dict[fx.Node, int],
                   n_stages: int, crossings: list[Crossing], exits: list[Exit], live_ins: list[fx.Node],
                   writers: dict[fx.Node, list[fx.Node]]) -> list[StageProgram]:
    """One program per stage: the stage's nodes as a GraphModule whose inputs are region live-ins or
    received crossings (placeholders in order of first use) and whose outputs are the crossings it sends
    and, on the last stage, the exits."""
    live_index = {a: i for i, a in enumerate(live_ins)}
    cross_index = {c.value: i for i, c in enumerate(crossings)}
    by_name = {n.name: n for n in nodes}
    programs = []
    for s in range(n_stages):
        outs: list[tuple[str, int]] = [("send", i) for i, c in enumerate(crossings) if c.src == s]
        out_nodes = [by_name[crossings[i].value] for _, i in outs]
        if s == n_stages - 1:
            outs += [("exit", i) for i in range(len(exits))]
            out_nodes += [by_name[e.value] for e in exits]
        wanted = _stage_nodes(region, stage, s, out_nodes, writers)
        ins = region_inputs(nodes, wanted, out_nodes)
        inputs: list[tuple[str, object]] = [("recv", cross_index[a.name]) if a in region else ("live_in", live_index[a])
                                            for a in ins]
        params = [a.name for a in ins if a not in region and is_param_placeholder(a)]
        programs.append(StageProgram(extract(owner, nodes, wanted, ins, out_nodes), inputs, outs, params))
    return programs
