"""PipeFusion as two passes: patch_sequence -> pipefusion.

``patch_sequence`` is shard_sequence with the M *patches* in place of sequence-parallel ranks: after it, the
graph computes one patch (chunk p of every token segment) of the token stream, with sizes baked into the
graph rewritten to patch sizes, values that enter whole sliced where first needed (``pf_shard_tokens`` reads
the patch index from the runtime), and ``gather_tokens`` at the exits. Every token-dim fact comes from
infer_token_dims, the same facts sequence parallelism uses: no per-model code. What one patch at a time
cannot compute is marked ``xfx.whole`` (shard_sequence leaves it whole): the part before the block stack up
to its latest node that needs the whole sequence (a gather or a token sum a block depends on; in-place
writes count as uses), the nodes that only build attention masks, and token segments that do not split
into the patches' chunks when another segment does.

``pipefusion`` then, from the graph alone:

1. **Region.** The nodes that run per patch: everything downstream of a patch slice up to the exit gathers,
   plus the nodes of a block that read no token (adaLN modulation of the timestep embedding), which move to
   the block's stage. What runs before (embeddings, timestep, RoPE tables) runs whole on every rank; what
   runs after the exit gathers (final norm, unpatchify) too, on the assembled output.
2. **Cost per block** from the fake-tensor shapes: 2*M*N*K FLOPs per linear/matmul, 4*B*H*Lq*Lkv*D per
   attention, 2*out*Cin*k per convolution.
3. **Stage cut**: contiguous runs of blocks (in graph order) into ``pipefusion_degree`` stages minimising the
   most expensive stage (a linear-partition DP), so Flux's double blocks weigh more than its single ones.
4. **Crossing values**: on a networkx DiGraph of the region, every edge from a node of stage s to a node of
   stage t > s is a value sent s -> t once per patch (the token stream, an MMDiT's text stream, a U-ViT's
   long skip, a rotary table slice computed on stage 0...). Nodes that read only whole values (a slice of a
   RoPE table) belong to no stage and are recomputed where needed; exits go to the last stage.
5. **Attention**: every attention on patch queries becomes ``pf_attention``: the patch writes its fresh K/V
   into its slice of a full-sequence buffer kept per site, and attends over the whole buffer (the other
   patches' K/V are from the previous call: stale).

The rewrite moves the region into a `PipeFusionRegion` submodule (``xfx_pipefusion``) that holds one
GraphModule per stage and the whole region as ``body`` for the dump (each node tagged ``xfx.stage``).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from xdit_fx.errors import PlanError, UnsupportedGraph, describe_node
from xdit_fx.compiler.fx_utils import (META_ATTENTION, META_BLOCK, META_CREATED_BY, META_GATHER, META_LAYOUT, META_SP_ATTENTION,
                        META_TOKEN_DIMS, META_WHOLE, example_value, is_linear, is_param_placeholder, is_sdpa, sdpa_args, shape_of, target_name)
from xdit_fx.ops import collectives
from xdit_fx.compiler.passes.base import Mesh, PassContext, PassResult, graph_pass
from xdit_fx.compiler.passes.sequence_parallel import SeqLayout, shard_sequence

META_STAGE = "xfx.stage"            # stage of a node of the PipeFusion region (-1: recomputed where needed)
META_PIPEFUSION = "xfx.pipefusion"  # on the call of the region: the stage cut, costs, crossings, KV sites
REGION_NAME = "xfx_pipefusion"


# ---- cost and cut ------------------------------------------------------------------------------------

def node_flops(node: fx.Node) -> float:
    """Estimated FLOPs of one node from its fake shapes (0 for what is cheap next to matmuls)."""
    if node.op != "call_function" and node.op != "call_method":
        return 0.0
    out = shape_of(node)
    if is_linear(node):
        w = shape_of(node.args[1]) if len(node.args) > 1 else shape_of(node.kwargs.get("weight"))
        if out is None or not w:
            return 0.0
        return 2.0 * math.prod(out) * (w[-1] if len(w) > 1 else 1)
    if is_sdpa(node):
        a = sdpa_args(node)
        q, k = shape_of(a["query"]), shape_of(a["key"])
        if not q or not k:
            return 0.0
        return 4.0 * math.prod(q[:-1]) * k[-2] * q[-1]
    name = target_name(node).split(".")[-1]
    if name in ("matmul", "bmm", "mm", "baddbmm", "addmm", "einsum") or node.target is operator.matmul:
        ins = [shape_of(a) for a in node.args if isinstance(a, fx.Node)]
        ins = [s for s in ins if s]
        if out is None or not ins:
            return 0.0
        k = ins[0][-1] if name != "einsum" else max(max(s) for s in ins)
        return 2.0 * math.prod(out) * k
    if name.startswith("conv") and out is not None:
        w = shape_of(node.args[1]) if len(node.args) > 1 else None
        return 2.0 * math.prod(out) * (math.prod(w[1:]) if w else 1)
    return 0.0


def block_costs(nodes, blocks: list[str]) -> list[float]:
    cost = {b: 0.0 for b in blocks}
    for n in nodes:
        b = n.meta.get(META_BLOCK)
        if b in cost:
            cost[b] += node_flops(n)
    return [max(cost[b], 1.0) for b in blocks]


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


# ---- pass 1: the graph of one patch ---------------------------------------------------------------------

@graph_pass(reads=["xfx.token_dims", META_BLOCK], writes=[META_LAYOUT, META_SP_ATTENTION])
def patch_sequence(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """shard_sequence over the M patches instead of ranks: the graph computes one patch of the token stream."""
    from xdit_fx.compiler.passes.analysis import _is_flex_attention
    # with ulysses: M x U chunks, patch p on rank u is p*U + u; with ring (x ulysses): (p*R + r)*U + u
    m = ctx.plan.patches * ctx.plan.ulysses_degree * ctx.plan.ring_degree
    flex = next((n for n in gm.graph.nodes if _is_flex_attention(n)), None)
    if flex is not None:
        raise UnsupportedGraph(
            f"patch_sequence: {describe_node(flex)}\n  is flex_attention: its block mask and score/mask functions "
            "index keys by global token position, which the per-patch K/V buffers cannot re-index yet.\n"
            "  fix: use the model's SDPA attention backend if it has one, or run it with cfg/dp; to look at the "
            "graph: xdit-fx dump MODEL --plan pipefusion=2 --out DIR")
    sctx = dataclasses.replace(ctx, mesh=Mesh(ring=m))
    odd = _whole_odd_segments(gm, (ctx.layout_patches or ctx.plan.patches) * ctx.plan.ulysses_degree
                              * ctx.plan.ring_degree)
    masks = _whole_masks(gm)
    base = _copy_graph_module(gm)
    result = shard_sequence(gm, sctx)
    gm, result, whole = _whole_prefix(gm, base, result, sctx)
    # collectives that need every rank's tokens of the same call: across patches, those tokens are computed
    # at other times (or on other stages), so the per-patch graph cannot run them
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in NEEDS_ALL:
            src = next((u for u in node.users), node)
            raise UnsupportedGraph(
                f"patch_sequence: {describe_node(src)}\n  {NEEDS_ALL[node.target]}: under sequence parallel "
                f"that is a collective over the ranks of one call ({node.name}), but PipeFusion computes one "
                "patch at a time, so the other patches' part is not there.\n  fix: use ulysses/ring for this "
                "model, or cfg/dp; to look at the graph: xdit-fx dump MODEL --plan pipefusion=2 --out DIR")
    shards = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is collectives.shard_tokens:
            node.target = pf_shard_tokens_target()
            shards += 1
    what = f"one of {m} patches" if m == ctx.plan.patches else f"one of {m} chunks ({ctx.plan.patches} patches" + \
        "".join(f" x {a} {ctx.plan.degree(a)}" for a in ("ring", "ulysses") if ctx.plan.degree(a) > 1) + ")"
    summary = result.summary.replace("on local tokens", f"on {what}") + whole
    if masks:
        summary += f"; {masks} nodes that only build attention masks run whole (attention reads masks whole)"
    if odd:
        summary += (f"; token segments of {', '.join(map(str, odd))} tokens do not split into the patches' equal "
                    "chunks: every patch computes them whole")
    return PassResult(gm, changed=result.changed or bool(whole), summary=summary, counts=dict(result.counts))


#: collectives over the ranks of one call that a per-patch graph cannot run (the other patches are elsewhere)
NEEDS_ALL = {collectives.all_reduce_tokens: "sums over every token (e.g. linear attention's K^T V)",
             collectives.halo_rows: "convolves across the rows of neighbouring patches",
             collectives.zero_token_padding: "sums over every token (e.g. linear attention's K^T V)"}


def _whole_prefix(gm: fx.GraphModule, base: fx.GraphModule, result: PassResult, sctx: PassContext):
    """A part before the block stack that needs the whole sequence (a token refiner's pooled text, a mask
    built from the tokens, a sequence re-packed by in-place writes) runs whole on every rank instead: the
    patches start after it. Each try redoes shard_sequence on `base` (the graph before it) with the start
    moved past the latest such node; the start may not cut a block. Returns (gm, result, summary note)."""
    whole = ""
    for _ in range(4):
        found = _needs_whole_before_blocks(gm)
        if found is None:
            break
        end, why = found
        nodes = list(gm.graph.nodes)
        prefix_nodes = set(nodes[:nodes.index(end) + 1])
        ops = [n for n in nodes if n.op in ("call_function", "call_method", "call_module") and META_BLOCK in n.meta]
        before = {n.meta[META_BLOCK] for n in ops if n in prefix_nodes}
        after = {n.meta[META_BLOCK] for n in ops if n not in prefix_nodes}
        if not after or before & after:
            break  # inside the block stack: patch_sequence (or pipefusion) refuses it by name
        # the same place in the graph before shard_sequence (which renames the nodes it replaces): up to
        # the last node there that is still before the cut
        trial = _copy_graph_module(base)
        names = {n.name for n in prefix_nodes}
        originals = list(trial.graph.nodes)
        last = max((i for i, n in enumerate(originals) if n.name in names), default=-1)
        marked = 0
        for n in originals[:last + 1]:
            if n.op not in ("placeholder", "output"):
                n.meta[META_WHOLE] = why
                marked += 1
        result = shard_sequence(trial, sctx)
        gm = trial
        whole = f"; {marked} nodes before the patches run whole on every rank, up to %{end.name} ({why})"
    return gm, result, whole


def _whole_masks(gm: fx.GraphModule) -> int:
    """Mark whole (META_WHOLE) the nodes whose every use ends in an attention's mask: pf_attention reads
    the mask whole (re-indexed to the patch's queries and the buffer's keys), so a mask built per patch
    would need every patch's part at once. Returns how many."""
    mask_only: dict[fx.Node, bool] = {}
    for n in reversed(list(gm.graph.nodes)):
        ok = bool(n.users) and n.op in ("call_function", "call_method")
        for u in n.users:
            if is_sdpa(u):
                a = sdpa_args(u)
                ok = ok and a["attn_mask"] is n and n not in (a["query"], a["key"], a["value"])
            else:
                ok = ok and mask_only.get(u, False)
        mask_only[n] = ok
    marked = 0
    for n, ok in mask_only.items():
        if ok and META_TOKEN_DIMS in n.meta:
            n.meta[META_WHOLE] = "builds an attention mask"
            marked += 1
    return marked


def _whole_odd_segments(gm: fx.GraphModule, chunks: int) -> list[int]:
    """Make the sharded token segments whose length does not split into `chunks` equal chunks whole (every
    patch computes them, like a time token), as long as a segment that does split stays sharded; returns
    their lengths. Otherwise nothing changes, and the pipefusion pass refuses the plan naming the node."""
    odd, even = set(), set()
    for n in gm.graph.nodes:
        for lay in (n.meta.get(META_TOKEN_DIMS) or {}).values():
            if isinstance(lay, SeqLayout):
                for length, sharded in lay.segments:
                    if sharded:
                        (even if length % chunks == 0 else odd).add(length)
    if not odd or not even:
        return []
    for n in gm.graph.nodes:
        layouts = n.meta.get(META_TOKEN_DIMS)
        if not layouts:
            continue
        new = {}
        for slot, lay in layouts.items():
            if isinstance(lay, SeqLayout):
                lay = SeqLayout(lay.dim, tuple((length, sharded and length not in odd) for length, sharded in lay.segments))
                if not any(sharded for _, sharded in lay.segments):
                    continue
            new[slot] = lay
        if new:
            n.meta[META_TOKEN_DIMS] = new
        else:
            n.meta.pop(META_TOKEN_DIMS)
    return sorted(odd)


def _needs_whole_before_blocks(gm: fx.GraphModule) -> tuple[fx.Node, str] | None:
    """The latest node that needs the whole token sequence while the block stack is still ahead: a gather
    that a block depends on, or a collective of NEEDS_ALL outside every block. None if there is none."""
    from xdit_fx.compiler.passes.sequence_parallel import _mutated_arg
    nodes = list(gm.graph.nodes)
    # whether a block node depends on it; an in-place write (x[i] = v) counts as a use of x, so v reaches
    # the blocks when x does (twice: the written tensor comes before the write)
    reaches: dict[fx.Node, bool] = {}
    for _ in range(2):
        for n in reversed(nodes):
            written = _mutated_arg(n)
            reaches[n] = META_BLOCK in n.meta or any(reaches.get(u, False) for u in n.users) or (
                written is not None and reaches.get(written, False))
    found = None
    for n in nodes:
        if n.op != "call_function":
            continue
        if n.target is collectives.gather_tokens and any(reaches[u] for u in n.users):
            user = next(u for u in n.users if reaches[u])
            found = n, f"%{n.name} gathers the sequence for %{user.name}"
        elif n.target in NEEDS_ALL and not any(META_BLOCK in x.meta for x in [n, *n.users, *n.all_input_nodes]):
            found = n, f"%{n.name}: {NEEDS_ALL[n.target].split(' (')[0]}"
    return found


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of gm's graph (same node names, node facts copied shallowly) on the same module."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    out = fx.GraphModule(gm, graph)
    out.meta.update(gm.meta)
    return out


def pf_shard_tokens_target():
    from xdit_fx.ops.pipefusion import pf_shard_tokens
    return pf_shard_tokens


# ---- pass 2: region, stages, crossings ----------------------------------------------------------------

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


def _global_value(node: fx.Node):
    """The fake value (global shape) of a node; slices inserted by patch_sequence have their input's."""
    v = example_value(node)
    while v is None and node.op == "call_function" and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
        v = example_value(node)
    return v


def _local_shape(node: fx.Node, m: int) -> tuple[int, ...]:
    v = _global_value(node)
    shape = list(v.shape) if isinstance(v, torch.Tensor) else []
    lay = node.meta.get(META_LAYOUT)
    if isinstance(lay, SeqLayout):
        shape[lay.dim] = lay.local_len(m)
    return tuple(shape)


def _is(node: fx.Node, fn) -> bool:
    return node.op == "call_function" and node.target is fn


@graph_pass(reads=[META_LAYOUT, META_BLOCK, META_ATTENTION], writes=[META_STAGE, META_PIPEFUSION])
def pipefusion(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Cut the block stack into cost-balanced stages and move the per-patch region into a PipeFusionRegion."""
    from xdit_fx.ops.pipefusion import pf_attention, pf_shard_tokens
    from xdit_fx.ops.regions import PipeFusionRegion

    plan = ctx.plan
    n_stages, m, u, rr = plan.pipefusion_degree, plan.patches, plan.ulysses_degree, plan.ring_degree
    chunks = m * u * rr  # per patch and rank: chunk p*U + u (ulysses), (p*R + r)*U + u (ring) of every segment
    graph = gm.graph
    nodes = list(graph.nodes)
    dag = nx.DiGraph()
    dag.add_nodes_from(nodes)
    dag.add_edges_from((a, n) for n in nodes for a in n.all_input_nodes)

    shards = [n for n in nodes if _is(n, pf_shard_tokens)]
    gathers = [n for n in nodes if _is(n, collectives.gather_tokens)]
    if not shards:
        return PassResult(gm, changed=False, summary="no token sequence in this graph: it runs whole on every rank")
    post: set[fx.Node] = set(gathers)
    for g in gathers:
        later = nx.descendants(dag, g)
        block = next((n for n in nodes if n in later and META_BLOCK in n.meta), None)
        if block is not None:
            raise UnsupportedGraph(
                f"pipefusion: %{g.name} gathers the whole token sequence ({g.meta.get(META_GATHER, 'exit')}) and "
                f"{describe_node(block)}\n  in {block.meta[META_BLOCK]} depends on it: a value computed per patch "
                "is needed whole before (or inside) the block stack (e.g. a text refiner whose pooled output "
                "conditions every block), so the patches cannot flow through the stages independently.\n"
                "  fix: run this model with ulysses/ring (sequence parallel handles it with the same gather), "
                "or cfg/dp; to look at the graph: xdit-fx dump MODEL --plan pipefusion=2 --out DIR")
        post |= later
    again = next((n for n in nodes if n in post and n not in gathers and (
        _is(n, pf_shard_tokens) or _is(n, collectives.gather_tokens))), None) or next(
        (g for g in gathers if g.args[0] in post), None)
    if again is not None:
        raise UnsupportedGraph(
            f"pipefusion: {describe_node(again)}\n  slices or gathers the token sequence again after an earlier "
            "gather: the graph goes back to per-patch tokens after it needed them whole, so the part after the "
            "per-patch region cannot run once on the assembled output.\n"
            "  fix: run this model with ulysses/ring, or cfg/dp; to look at the graph: xdit-fx dump MODEL "
            "--plan pipefusion=2 --out DIR")
    region: set[fx.Node] = set(shards)
    for s in shards:
        region |= nx.descendants(dag, s)
    region -= post
    region = {n for n in region if n.op != "output"}
    stateful, depth = None, 0
    for n in nodes:  # a torch.func.vmap section: between _vmap_increment_nesting and _vmap_decrement_nesting
        name = target_name(n) if n.op == "call_function" else ""
        depth += ("vmap_increment" in name) - ("vmap_decrement" in name)
        if (depth > 0 or "batch_dim" in name) and (n in region or n in post) and stateful is None:
            stateful = n
    if stateful is not None:
        raise UnsupportedGraph(
            f"pipefusion: {describe_node(stateful)}\n  is part of a torch.func.vmap section on the token sequence; "
            "its nesting state cannot be split between pipeline stages or patches.\n"
            "  fix: run this model with ulysses/ring, or cfg/dp; to look at the graph: xdit-fx dump MODEL "
            "--plan pipefusion=2 --out DIR")
    bad = next((n for n in nodes if n in region and any(a in post for a in n.all_input_nodes)), None)
    if bad is not None:
        g = next(a for a in nx.ancestors(dag, bad) if a in gathers)
        raise UnsupportedGraph(
            f"pipefusion: {describe_node(bad)}\n  reads %{g.name}, a gather of the whole token sequence "
            f"({g.meta.get(META_GATHER, 'exit')}), inside the per-patch region: a patch cannot wait for the "
            "others' current values. The op without a token rule must get one (xdit_fx/compiler/passes/dim_rules.py).\n"
            "  to look at the graph: xdit-fx dump MODEL --plan pipefusion=2 --out DIR")
    # blocks that run per patch; their nodes that read no token value (adaLN modulation) join their stage
    blocks = list(dict.fromkeys(n.meta[META_BLOCK] for n in nodes if n in region and META_BLOCK in n.meta))
    if not blocks:
        raise UnsupportedGraph("pipefusion: no transformer block runs on the token sequence in this graph; "
                               "there is nothing to cut into stages. Look at it with: xdit-fx dump MODEL "
                               "--plan pipefusion=2 --out DIR")
    staged = set(blocks)
    for n in reversed(nodes):
        if n in region or n in post or n.op not in ("call_function", "call_method"):
            continue
        if n.meta.get(META_BLOCK) in staged and n.users and all(u in region for u in n.users):
            region.add(n)
    costs = block_costs(nodes, blocks)
    block_stage = cut_stages(costs, n_stages)
    stage_of_block = dict(zip(blocks, block_stage))

    # stage of every region node: its block's, else the latest of its inputs', else -1 (recomputed)
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

    # attention on patch queries -> pf_attention with a KV buffer per site
    kv_sites = []
    for n in nodes:
        spec = n.meta.get(META_SP_ATTENTION)
        if n not in region or spec is None or not is_sdpa(n):
            continue
        site = n.meta[META_ATTENTION]
        a = sdpa_args(n)
        kv_sharded = spec["kv_segments"] is not None and any(s for _, s in spec["kv_segments"])
        if u > 1 and kv_sharded:
            if site.heads % u:
                ok = [d for d in range(1, site.heads + 1) if site.heads % d == 0]
                raise PlanError(
                    f"pipefusion: attention {describe_node(n)}\n  has {site.heads} heads, which is not divisible "
                    f"by ulysses_degree={u}.\n  fix: choose ulysses in {ok}, or pipefusion without ulysses.")
            if not any(s for _, s in spec["q_segments"]):
                raise UnsupportedGraph(
                    f"pipefusion: attention {describe_node(n)}\n  has patched keys but no patched queries "
                    f"(q {spec['q_segments']}, kv {spec['kv_segments']}); with ulysses the head all-to-all of "
                    "pf_attention needs patched queries.\n  fix: run it with pipefusion alone, or ulysses alone; "
                    "to look at the graph: xdit-fx dump MODEL --plan pipefusion=2,ulysses=2 --out DIR")
        with graph.inserting_before(n):
            new = graph.call_function(pf_attention, (a["query"], a["key"], a["value"], a["attn_mask"]),
                                      dict(site=site.index, q_segments=spec["q_segments"],
                                           kv_segments=spec["kv_segments"], scale=a["scale"],
                                           **({"is_causal": True} if a["is_causal"] else {})))
        new.meta = {k: v for k, v in n.meta.items() if k != META_CREATED_BY}
        n.replace_all_uses_with(new)
        graph.erase_node(n)
        new.name = f"pf_attention_{site.index}"
        region.discard(n)
        region.add(new)
        stage[new] = stage.pop(n)
        if kv_sharded:
            kv_sites.append(site.index)
    nodes = list(graph.nodes)

    # every sharded token segment must split into M equal patches (M x U equal chunks with ulysses)
    for n in nodes:
        lay = n.meta.get(META_LAYOUT)
        if n in region and isinstance(lay, SeqLayout):
            for length, sharded in lay.segments:
                if sharded and length % chunks:
                    if rr > 1:
                        ok = [d for d in range(1, length + 1) if length % (d * rr * u) == 0 and d <= 64]
                        what = f"ring={rr}" + (f" x ulysses={u}" if u > 1 else "")
                        raise PlanError(
                            f"pipefusion: {describe_node(n)}\n  has a token segment of {length} tokens, which does "
                            f"not split into pipefusion_patches={m} x {what} equal chunks; use patches in {ok} "
                            "(or sequence-parallel degrees that divide the segment with the patches).")
                    if u == 1:
                        ok = [d for d in range(1, length + 1) if length % d == 0 and d <= 64]
                        raise PlanError(
                            f"pipefusion: {describe_node(n)}\n  has a token segment of {length} tokens, which does "
                            f"not split into pipefusion_patches={m} equal patches; use patches in {ok}.")
                    ok = [d for d in range(1, length + 1) if length % (d * u) == 0 and d <= 64]
                    raise PlanError(
                        f"pipefusion: {describe_node(n)}\n  has a token segment of {length} tokens, which does not "
                        f"split into pipefusion_patches={m} x ulysses={u} equal chunks; use patches in {ok} "
                        "(or a ulysses degree that divides the segment with the patches).")

    last = n_stages - 1
    exits: list[Exit] = []
    for g in gathers:
        loc, dim, segments = g.args[0], g.args[1], g.args[2]
        src = stage.get(loc, -1) if loc in region else -1
        full = _global_value(loc)
        exits.append(Exit(loc.name, dim, tuple(tuple(s) for s in segments), tuple(full.shape),
                          full.dtype, last if src < 0 else src))

    # crossings: values of stage s read at stage t > s (exits are read by the last stage)
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
            v = _global_value(n)
            if not isinstance(v, torch.Tensor):
                raise UnsupportedGraph(f"pipefusion: {describe_node(n)}\n  crosses from stage {stage[n]} to "
                                       f"{sorted(readers[n])} and is not a tensor ({type(v).__name__}).")
            crossings.append(Crossing(n.name, stage[n], tuple(sorted(readers[n])), _local_shape(n, chunks), v.dtype))

    # in-place writes: a write into a value recomputed per stage (a mask built by x[:, a:b] = 1) goes with
    # every copy of that value; a write that other stages would have to see is refused
    from xdit_fx.compiler.passes.cache_regions import _writes_in_place
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

    # stage programs
    live_in_nodes = list(dict.fromkeys(a for n in nodes if n in region for a in n.all_input_nodes
                                       if a not in region))
    live_index = {a: i for i, a in enumerate(live_in_nodes)}
    cross_index = {c.value: i for i, c in enumerate(crossings)}
    programs = []
    for s in range(n_stages):
        wanted = {n for n in region if stage[n] == s}
        outs: list[tuple[str, int]] = []
        out_nodes: list[fx.Node] = []
        for i, c in enumerate(crossings):
            if c.src == s:
                outs.append(("send", i))
                out_nodes.append(by_name[c.value])
        if s == last:
            for i, e in enumerate(exits):
                outs.append(("exit", i))
                out_nodes.append(by_name[e.value])
        # recomputed (stage -1) nodes this stage needs
        todo = [a for n in list(wanted) + out_nodes for a in n.all_input_nodes]
        todo += [n for n in out_nodes if n in region and stage[n] < 0]
        while todo:
            a = todo.pop()
            if a in region and stage[a] < 0 and a not in wanted:
                wanted.add(a)
                todo.extend(a.all_input_nodes)
                for w in writers.get(a, ()):  # its in-place writes come with it
                    todo.append(w)
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        inputs: list[tuple[str, object]] = []
        params: list[str] = []

        def arg(a: fx.Node) -> fx.Node:
            if a in env:
                return env[a]
            ph = g.placeholder(a.name)
            ph.meta = dict(a.meta)
            env[a] = ph
            if a in region:
                inputs.append(("recv", cross_index[a.name]))
            else:
                inputs.append(("live_in", live_index[a]))
                if is_param_placeholder(a):
                    params.append(a.name)
            return ph

        body_nodes = [n for n in nodes if n in wanted]
        for n in body_nodes:  # placeholders first, in order of first use
            for a in n.all_input_nodes:
                if a not in wanted:
                    arg(a)
        for n in out_nodes:
            if n not in wanted:
                arg(n)
        for n in body_nodes:
            env[n] = g.node_copy(n, lambda a: env[a])
        g.output(tuple(env[n] for n in out_nodes))
        programs.append(StageProgram(fx.GraphModule(gm, g), inputs, outs, params))

    spec = PipeFusionSpec(n_stages, m, blocks, block_stage, costs, crossings, exits, kv_sites,
                          [a.name for a in live_in_nodes], programs, ulysses=u, ring=rr)
    description = spec.describe()

    # the whole region as one body, for the dump
    body_graph = fx.Graph()
    benv: dict[fx.Node, fx.Node] = {}
    for a in live_in_nodes:
        ph = body_graph.placeholder(a.name)
        ph.meta = dict(a.meta)
        benv[a] = ph
    for n in nodes:
        if n in region:
            benv[n] = body_graph.node_copy(n, lambda a: benv[a])
    body_graph.output(tuple(benv[by_name[e.value]] for e in exits))
    gm.add_submodule(REGION_NAME, PipeFusionRegion(fx.GraphModule(gm, body_graph), spec))

    # the call goes after the last node outside the region that does not read it; gathers become its outputs
    outside_before = [n for n in nodes if n not in region and n not in post and n.op != "output"]
    with graph.inserting_after(outside_before[-1]):
        call = graph.create_node("call_module", REGION_NAME,
                                 tuple(live_in_nodes), name=REGION_NAME)
    call.meta["example_value"] = tuple(_global_value(g.args[0]) for g in gathers)
    call.meta[META_PIPEFUSION] = description
    anchor = call
    for i, gnode in enumerate(gathers):
        with graph.inserting_after(anchor):
            item = graph.create_node("call_function", operator.getitem, (call, i))
        item.meta.update({k: v for k, v in gnode.meta.items() if k not in (META_CREATED_BY, META_GATHER)})
        gnode.replace_all_uses_with(item)
        anchor = item
    for n in nodes:
        if n in post and n not in gathers and n.op != "output":
            anchor.append(n)
            anchor = n
    for n in reversed(nodes):
        if n in region or n in gathers:
            graph.erase_node(n)
    return PassResult(gm, changed=True, summary=description,
                      counts={"pipefusion_stages": n_stages, "pipefusion_crossings": len(crossings),
                              "kv_buffers": len(kv_sites)})
