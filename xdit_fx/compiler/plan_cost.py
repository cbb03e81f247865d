"""The plan cost model: per-rank time of one denoising step and memory per rank, for ModelFacts, a Plan and a
HardwareProfile.

Time of one transformer call on one rank:

* **compute**: every node of the serial graph at this rank's share. A node carrying the sharded token sequence
  runs on 1/(ring*ulysses) of it (1/(M*ring*ulysses) per patch under PipeFusion, M times); a node carrying
  the batch runs on this rank's share of the batch (dp*cfg split it). A matmul-class node costs
  ``overhead + max(flops / gemm_rate, bytes / mem_bw)``, attention ``overhead + flops / attn_rate`` (queries
  local, keys whole: ring runs one call per chunk), other nodes ``overhead + bytes / mem_bw``, views
  ``view_overhead``; transcendental / normalisation nodes (``act``) at their own measured rate.
* **host**: every node executed (once per call; under PipeFusion once per patch) costs
  ``hardware.node_overhead`` on the host beyond its op, every runtime op the rewrite inserts (Ulysses'
  all-to-alls, ring attention, the exit gather, pf_attention and the patch loop per patch)
  ``hardware.runtime_op_overhead``; added to the call's time on CPUs, and only where it exceeds the device time
  where the host runs ahead (``hardware.host_async``). A PipeFusion patch also writes its fresh K/V into the
  site's buffers.
* **communication**, bytes from the same formulas `tests/test_comm.py` checks against the counted bytes:
  Ulysses moves (U-1)/U of the local q, k, v and output per site in 4 all-to-alls (not overlapped); ring
  passes (R-1) local K/V chunks per site, each step overlapped with the chunk's attention by
  ``hardware.ring_overlap``; sequence parallel all-gathers (N-1)/N of the output at the exit; cfg/dp
  all-gather (k-1)/k of the output over the batch ranks (a two-call CFG pipeline swaps one call's output).
  Each message costs the link's latency; an axis whose group spans more ranks than a node holds uses the
  inter-node link.
* **PipeFusion**: stage s takes t_s per patch (its blocks' nodes at 1/M of the tokens, the Ulysses/ring
  traffic of a patch, receiving the crossing values); a call takes ``sum_s t_s + (M-1) * max_s t_s`` (fill,
  steady state at the slowest stage, drain: the bubble and the imbalance), plus the parts before and after the
  block stack, which every rank runs whole, and the output broadcast. Warm-up calls run one patch
  synchronously through the stages.

Memory per rank: parameters (all, or the stage's blocks plus everything outside the stack under
PipeFusion), activations (3 x the largest node's output at this rank's share: input, output and one live
intermediate), PipeFusion's K/V buffers (2 x B x kv_heads/U x L/R x D per site of the stage), and a share of
the VAE decode (given by the caller).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from xdit_fx.compiler.hardware import HardwareProfile, Link
from xdit_fx.compiler.plan_facts import ACT, ATTN, GEMM, VIEW, ModelFacts, NodeWork
from xdit_fx.plan import AXES, Plan

MERGE_OPS = 6  # elementwise ops of one log-sum-exp merge of a ring step (exp, max, mul, add, ...)
ULYSSES_RUNTIME_OPS = 4  # runtime ops of one Ulysses site: the all-to-alls of q, k, v and of the output
KV_WRITES = 2  # a PipeFusion patch writes its fresh K and V into the site's buffers (index_copy_ each)


@dataclass(frozen=True)
class Workload:
    """What one step runs: ``guidance`` none | batched (cond+uncond in the captured batch) | two-call (the
    pipeline calls the transformer twice per step); `steps` and `warmup` for the per-step average;
    `vae_bytes`: the VAE decode's peak activation bytes on one device (split over all ranks)."""

    guidance: str = "none"
    steps: int = 20
    vae_bytes: float = 0.0


@dataclass
class Prediction:
    plan: Plan
    step_s: float                       # one steady-state step (all transformer calls of the step), seconds
    warmup_s: float                     # one PipeFusion warm-up step (= step_s without PipeFusion)
    per_step_s: float                   # averaged over Workload.steps with the plan's warm-up steps
    parts: dict[str, float]             # seconds per step: compute, whole, ulysses, ring, gather, pipeline, ...
    memory: dict[str, float]            # bytes per rank: weights, activations, kv_buffers, vae, total
    bytes: dict[str, float]             # bytes received per rank per step, per mesh axis
    links: dict[str, str]               # mesh axis -> intra | inter
    fits: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def bottleneck(self) -> str:
        return max(self.parts, key=self.parts.get) if self.parts else "-"


# ---- node times ----------------------------------------------------------------------------------------

def node_time(n: NodeWork, hw: HardwareProfile, tok: float, bat: float) -> float:
    """Seconds of one non-attention node at token share `tok` and batch share `bat`."""
    if n.kind == VIEW:
        return hw.view_overhead
    s = (tok if n.tokens else 1.0) * (bat if n.batched else 1.0)
    if n.kind == GEMM:
        return max(hw.op_time("gemm", n.flops * s, hw.gemm_rate, hw.op_overhead + hw.gemm_overhead),
                   hw.op_time("mem", n.bytes * s, hw.mem_bw, hw.op_overhead))
    return hw.op_time(ACT if n.kind == ACT else "mem", n.bytes * s, hw.mem_bw, hw.op_overhead)


def attention_time(n: NodeWork, hw: HardwareProfile, q_share: float, bat: float, ring: int) -> float:
    """Seconds of one attention site's kernels on this rank: queries at `q_share` of the sequence, every key,
    split into `ring` calls (one per ring chunk) plus their log-sum-exp merges."""
    s = (q_share if n.tokens else 1.0) * (bat if n.batched else 1.0)
    t = ring * hw.op_time("attn", n.flops * s / ring, hw.attn_rate, hw.op_overhead + hw.attn_overhead)
    if ring > 1:
        out_bytes = n.bytes / 4 * s  # q, k, v in, out: a quarter of the bytes is the output
        t += (ring - 1) * MERGE_OPS * hw.op_time("mem", out_bytes, hw.mem_bw, hw.op_overhead)
    return t


def _site_bytes(site: tuple, bat: float, dt: int) -> tuple[float, float]:
    """(q bytes, k bytes) of one site on the whole sequence at batch share `bat`."""
    b, h, kvh, lq, lk, d, _ = site
    return b * bat * h * lq * d * dt, b * bat * kvh * lk * d * dt


# ---- mesh -------------------------------------------------------------------------------------------------

def axis_links(plan: Plan, hw: HardwareProfile) -> dict[str, str]:
    """Per axis with degree > 1: intra or inter (its group spans more consecutive ranks than a node holds)."""
    out: dict[str, str] = {}
    stride = 1
    for axis in reversed(AXES):
        d = plan.degree(axis)
        if d > 1:
            out[axis] = "inter" if stride * d > hw.gpus_per_node else "intra"
        stride *= d
    return out


def _link(plan: Plan, hw: HardwareProfile, axis: str) -> Link:
    return hw.link(axis_links(plan, hw).get(axis) == "inter")


def _sp_link(plan: Plan, hw: HardwareProfile) -> Link:
    links = axis_links(plan, hw)
    return hw.link("inter" in (links.get("ring"), links.get("ulysses")))


# ---- one call -----------------------------------------------------------------------------------------------

@dataclass
class _Call:
    parts: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, float] = field(default_factory=dict)

    def add(self, part: str, seconds: float, axis: str | None = None, nbytes: float = 0.0) -> None:
        self.parts[part] = self.parts.get(part, 0.0) + seconds
        if axis is not None:
            self.bytes[axis] = self.bytes.get(axis, 0.0) + nbytes

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def _sp_site_comm(call: _Call, n: NodeWork, plan: Plan, hw: HardwareProfile, bat: float, patches: int,
                  chunk_s: float, dt: int) -> None:
    """Ulysses all-to-alls and ring P2P of one attention site for one patch (patches: the sequence share)."""
    u, r = plan.ulysses_degree, plan.ring_degree
    qb, kb = _site_bytes(n.site, bat, dt)
    if u > 1:
        share = 1.0 / (u * r * patches)
        moved = (u - 1) / u * (2 * qb + 2 * kb) * share
        link = _link(plan, hw, "ulysses")
        # 4 all-to-alls (their messages to the u-1 peers in flight together: one latency each), plus the layout
        # copies around them
        copies = 8 * hw.op_time("mem", moved / 4, hw.mem_bw, hw.op_overhead)
        call.add("ulysses", link.time(moved, 4) + copies, "ulysses", moved)
    if r > 1:
        kv_step = 2 * kb / (r * u)  # under PipeFusion: whole buffers, since every patch needs every key
        link = _link(plan, hw, "ring")
        comm = link.time(kv_step, 2)
        hidden = hw.ring_overlap * min(comm, chunk_s)
        call.add("ring", (r - 1) * (comm - hidden), "ring", (r - 1) * kv_step)


def _stack_time(call: _Call, nodes: list[NodeWork], plan: Plan, hw: HardwareProfile, bat: float,
                patches: int, dt: int) -> float:
    """Compute (into call.parts['compute']) and SP traffic of `nodes` for one patch; returns the compute s."""
    sp = plan.sequence_parallel_degree
    tok = 1.0 / (sp * patches)
    pipefusion = plan.pipefusion_degree > 1
    total = 0.0
    runtime_ops = 0
    for n in nodes:
        if n.kind == ATTN and n.site is not None:
            t = attention_time(n, hw, 1.0 / (sp * patches), bat, plan.ring_degree)
            if n.site[6] != "cross" and sp > 1:
                _sp_site_comm(call, n, plan, hw, bat, patches, t / plan.ring_degree, dt)
                runtime_ops += (ULYSSES_RUNTIME_OPS if plan.ulysses_degree > 1 else 0) + (plan.ring_degree > 1)
            if n.site[6] != "cross" and pipefusion:  # pf_attention: writes the patch's K/V, then attends
                _, kb = _site_bytes(n.site, bat, dt)
                t += KV_WRITES * hw.op_time("mem", 2 * kb * tok, hw.mem_bw, hw.op_overhead)
                runtime_ops += 1
        elif n.kind == ATTN:
            t = attention_time(n, hw, tok, bat, 1)
        else:
            t = node_time(n, hw, tok, bat)
        total += t
    call.add("compute", total)
    runtime_ops += pipefusion  # the patch loop: the stage program's call, its receives and sends
    host = len(nodes) * hw.node_overhead + runtime_ops * hw.runtime_op_overhead
    call.add("host", hw.host_time(host, total))
    return total


def _whole(call: _Call, nodes: list[NodeWork], plan: Plan, hw: HardwareProfile, bat: float) -> None:
    tok = 1.0 / plan.sequence_parallel_degree
    t = sum(attention_time(n, hw, tok, bat, 1) if n.kind == ATTN else node_time(n, hw, tok, bat) for n in nodes)
    call.add("whole", t)
    call.add("host", hw.host_time(len(nodes) * hw.node_overhead, t))


def _gathers(call: _Call, facts: ModelFacts, plan: Plan, hw: HardwareProfile, bat: float) -> None:
    """The exit all-gather of the output over the sequence-parallel ranks (one runtime op)."""
    sp = plan.sequence_parallel_degree
    out = facts.out_bytes * bat
    if sp > 1:
        moved = (sp - 1) / sp * out
        call.add("gather", _sp_link(plan, hw).time(moved) + hw.runtime_op_overhead, "sp", moved)


def sp_call(facts: ModelFacts, plan: Plan, hw: HardwareProfile, bat: float) -> _Call:
    """One call without PipeFusion: pre/post parts at the SP share, the stack, the SP traffic, the exit gather."""
    call = _Call()
    _whole(call, [n for n in facts.nodes if n.where != "stack"], plan, hw, bat)
    _stack_time(call, [n for n in facts.nodes if n.where == "stack"], plan, hw, bat, 1, facts.dtype_bytes)
    _gathers(call, facts, plan, hw, bat)
    return call


def stage_of_blocks(facts: ModelFacts, stages: int) -> list[int]:
    """The PipeFusion pass's cut (the same DP over the same block FLOPs)."""
    from xdit_fx.compiler.passes.pipefusion_stages import cut_stages

    flops = [1.0] * facts.blocks
    for n in facts.nodes:
        if n.block is not None and n.where == "stack":
            flops[n.block] += n.flops
    return cut_stages(flops, stages)


def pipefusion_call(facts: ModelFacts, plan: Plan, hw: HardwareProfile, bat: float, patches: int) -> _Call:
    """One PipeFusion call with `patches` patches (1: the synchronous warm-up call)."""
    n_st = plan.pipefusion_degree
    stages = stage_of_blocks(facts, n_st)
    call = _Call()
    _whole(call, [n for n in facts.nodes if n.where != "stack"], plan, hw, bat)
    link = _link(plan, hw, "pipefusion")
    sp = plan.sequence_parallel_degree
    per_stage = []
    for s in range(n_st):
        stage_call = _Call()
        nodes = [n for n in facts.nodes if n.where == "stack" and n.block is not None and stages[n.block] == s]
        _stack_time(stage_call, nodes, plan, hw, bat, patches, facts.dtype_bytes)
        if s > 0:
            cut = max(i for i in range(facts.blocks) if stages[i] == s - 1)
            moved = facts.cut_bytes[cut] * bat / (patches * sp) if cut < len(facts.cut_bytes) else 0.0
            stage_call.add("pipeline_p2p", link.time(moved), "pipefusion", moved)
        per_stage.append(stage_call)
    times = [c.total for c in per_stage]
    # fill and drain: each stage's first/last patches run while other stages wait (faster where ranks share
    # cores: hardware.solo_speedup); the M-1 patches between run at the slowest stage's pace
    pipeline = sum(times) / (hw.solo_speedup if n_st > 1 else 1.0) + (patches - 1) * max(times)
    busy = sum(c.parts.get("compute", 0.0) for c in per_stage) / n_st * patches
    host = sum(c.parts.get("host", 0.0) for c in per_stage) / n_st * patches
    for c in per_stage:  # the bytes this rank moves: one stage's (the busiest) traffic, M times
        for axis, nbytes in c.bytes.items():
            call.bytes[axis] = max(call.bytes.get(axis, 0.0), nbytes * patches)
    call.parts["compute"] = busy
    call.add("host", host)  # every node of the stage, and its per-patch runtime ops, once per patch
    call.parts["pipeline"] = pipeline - busy - host  # bubble, imbalance and the stage's traffic
    _gathers(call, facts, plan, hw, bat)
    out = facts.out_bytes * bat
    call.add("broadcast", link.time(out, max(1, math.ceil(math.log2(n_st)))), "pipefusion", out)
    return call


# ---- one step, memory ---------------------------------------------------------------------------------------

def batch_share(facts: ModelFacts, plan: Plan, work: Workload) -> tuple[float, int]:
    """(this rank's share of each call's batch, transformer calls this rank runs per step)."""
    k = plan.dp_degree * (plan.cfg_degree if work.guidance == "batched" else 1)
    chunks = min(facts.batch, k)
    bat = math.ceil(facts.batch / chunks) / facts.batch
    calls = 2 if work.guidance == "two-call" else 1
    if work.guidance == "two-call" and plan.cfg_degree == 2:
        calls = 1
    return bat, calls


def memory(facts: ModelFacts, plan: Plan, bat: float, work: Workload) -> dict[str, float]:
    """Bytes per rank (see the module docstring)."""
    sp = plan.sequence_parallel_degree
    if plan.pipefusion_degree > 1:
        stages = stage_of_blocks(facts, plan.pipefusion_degree)
        per = [0.0] * plan.pipefusion_degree
        for b, size in enumerate(facts.block_params):
            per[stages[b]] += size
        weights = facts.other_params + max(per)
        kv = 0.0
        for n in facts.nodes:
            if n.kind == ATTN and n.site is not None and n.block is not None and stages[n.block] == 0:
                _, kb = _site_bytes(n.site, bat, facts.dtype_bytes)
                kv += 2 * kb / (plan.ring_degree * plan.ulysses_degree)
        share = 1.0 / (plan.patches * sp)
    else:
        weights, kv, share = float(facts.param_bytes), 0.0, 1.0 / sp
    largest = max((n.bytes * (share if n.tokens else 1.0) * (bat if n.batched else 1.0)
                   for n in facts.nodes if n.kind != VIEW), default=0.0)
    act = 1.5 * largest  # node.bytes is in + out: 3 x one output
    vae = work.vae_bytes / plan.world_size if plan.parallel_vae else work.vae_bytes
    return {"weights": weights, "activations": act, "kv_buffers": kv, "vae": vae,
            "total": weights + max(act + kv, vae)}


def _scaled(call: _Call, calls: int) -> tuple[dict[str, float], dict[str, float]]:
    return ({k: v * calls for k, v in call.parts.items()}, {k: v * calls for k, v in call.bytes.items()})


def predict(facts: ModelFacts, plan: Plan, hw: HardwareProfile, work: Workload = Workload()) -> Prediction:
    """Predicted per-rank time of one step and memory per rank of `plan` (see the module docstring)."""
    bat, calls = batch_share(facts, plan, work)
    if plan.pipefusion_degree > 1:
        call = pipefusion_call(facts, plan, hw, bat, plan.patches)
        warm = pipefusion_call(facts, plan, hw, bat, 1)
    else:
        call = warm = sp_call(facts, plan, hw, bat)
    parts, moved = _scaled(call, calls)
    k = plan.batch_degree
    if k > 1:
        out = facts.out_bytes * (bat if work.guidance != "two-call" or plan.cfg_degree == 1 else 1.0)
        link = _link(plan, hw, "cfg" if plan.cfg_degree > 1 else "dp")
        parts["batch_gather"] = link.time((k - 1) * out) + hw.runtime_op_overhead
        moved["batch"] = (k - 1) * out
    extra = parts.get("batch_gather", 0.0)
    step = sum(parts.values())
    warm_step = warm.total * calls + extra
    w = min(plan.pipefusion_warmup_steps, work.steps) if plan.pipefusion_degree > 1 else 0
    per_step = (w * warm_step + (work.steps - w) * step) / max(work.steps, 1)
    mem = memory(facts, plan, bat, work)
    return Prediction(plan, step, warm_step, per_step, parts, mem, moved, axis_links(plan, hw),
                      fits=mem["total"] <= hw.memory)
