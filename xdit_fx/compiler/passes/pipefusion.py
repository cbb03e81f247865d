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

``pipefusion`` then, from the graph alone (a short driver over one module per step):

1. **Region.** The nodes that run per patch: everything downstream of a patch slice up to the exit gathers,
   plus the nodes of a block that read no token (adaLN modulation of the timestep embedding), which move to
   the block's stage. What runs before (embeddings, timestep, RoPE tables) runs whole on every rank; what
   runs after the exit gathers (final norm, unpatchify) too, on the assembled output.
   (`pipefusion_region.find_region`)
2. **Cost per block** from the fake-tensor shapes: 2*M*N*K FLOPs per linear/matmul, 4*B*H*Lq*Lkv*D per
   attention, 2*out*Cin*k per convolution (`xdit_fx.compiler.cost`, the cost model a planner reuses).
3. **Stage cut**: contiguous runs of blocks (in graph order) into ``pipefusion_degree`` stages minimising the
   most expensive stage (a linear-partition DP), so Flux's double blocks weigh more than its single ones.
   (`pipefusion_stages.cut_stages`, `assign_stages`)
4. **Crossing values**: on a networkx DiGraph of the region, every edge from a node of stage s to a node of
   stage t > s is a value sent s -> t once per patch (the token stream, an MMDiT's text stream, a U-ViT's
   long skip, a rotary table slice computed on stage 0...). Nodes that read only whole values (a slice of a
   RoPE table) belong to no stage and are recomputed where needed; exits go to the last stage.
   (`pipefusion_stages.find_crossings`, `find_exits`, `stage_programs`)
5. **Attention**: every attention on patch queries becomes ``pf_attention``: the patch writes its fresh K/V
   into its slice of a full-sequence buffer kept per site, and attends over the whole buffer (the other
   patches' K/V are from the previous call: stale).

The rewrite moves the region into a `PipeFusionRegion` submodule (``xfx_pipefusion``) that holds one
GraphModule per stage and the whole region as ``body`` for the dump (each node tagged ``xfx.stage``); the
body and the call that replaces it are cut out with `xdit_fx.compiler.regions`, as insert_cache does.
"""

from __future__ import annotations

import dataclasses
from contextvars import ContextVar

import torch.fx as fx

from xdit_fx.errors import PlanError, UnsupportedGraph
from xdit_fx.compiler.cost import block_costs, node_flops  # noqa: F401  (node_flops: re-exported)
from xdit_fx.compiler.fx_utils import (describe_node, META_ATTENTION, META_BLOCK, META_CREATED_BY, META_GATHER, META_LAYOUT,
                                       META_SP_ATTENTION, META_TOKEN_DIMS, META_WHOLE, copy_graph, is_sdpa, sdpa_args)
from xdit_fx.compiler.regions import extract, region_inputs, splice_call
from xdit_fx.ops import collectives
from xdit_fx.compiler.passes.base import PassContext, PassResult, graph_pass
from xdit_fx.compiler.passes.pipefusion_region import find_region
from xdit_fx.compiler.passes.pipefusion_stages import (  # noqa: F401  (records re-exported)
    META_STAGE, Crossing, Exit, PipeFusionSpec, StageProgram, assign_stages, cut_stages, find_crossings, find_exits,
    global_value, in_place_writers, stage_programs)
from xdit_fx.compiler.passes.pipefusion_stages import global_value as _global_value  # noqa: F401
from xdit_fx.compiler.passes.sequence_parallel import SeqLayout, shard_over

META_PIPEFUSION = "xfx.pipefusion"  # on the call of the region: the stage cut, costs, crossings, KV sites
REGION_NAME = "xfx_pipefusion"


# ---- pass 1: the graph of one patch ---------------------------------------------------------------------

@graph_pass(reads=["xfx.token_dims", META_BLOCK], writes=[META_LAYOUT, META_SP_ATTENTION])
def patch_sequence(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """shard_sequence over the M patches instead of ranks: the graph computes one patch of the token stream."""
    # with ulysses: M x U chunks, patch p on rank u is p*U + u; with ring (x ulysses): (p*R + r)*U + u
    # (flex_attention is SDPA with a mask over global positions by now, or normalize_attention refused it)
    m = ctx.plan.patches * ctx.plan.ulysses_degree * ctx.plan.ring_degree
    entry = copy_graph(gm)  # as it came: a suggested patch count is tried on it before it is suggested
    chunks = (ctx.layout_patches or ctx.plan.patches) * ctx.plan.ulysses_degree * ctx.plan.ring_degree
    # PipeFusion alone splits a segment the patches do not divide unevenly (ceil(L/M) per patch, the last ones
    # padded) when it must stay patched; with ulysses/ring the chunk arithmetic needs equal chunks
    can_pad = ctx.plan.ulysses_degree * ctx.plan.ring_degree == 1
    padded: list[int] = []
    odd = _whole_odd_segments(gm, chunks)
    if odd is None and can_pad:  # no segment splits: all of them split unevenly
        padded, odd = sorted(_segment_lengths(gm, chunks)[1]), []
    elif odd is None:  # refused here when a patch count that passes exists, else below
        _refuse_split(entry, ctx, *_unsplit_segment(gm, ctx), only_with_fix=True)
    gm, result, whole, masks = _patch(gm, m, ctx)
    if odd and not any(n.op == "call_function" and n.target is collectives.gather_tokens for n in gm.graph.nodes):
        # the segments left patched never reach an output: what the model returns would be computed whole
        if not can_pad:
            _refuse_split(entry, ctx, *_unsplit_segment(gm, ctx, odd, exits=True))
        padded, odd = odd, []
        gm, result, whole, masks = _patch(copy_graph(entry), m, ctx)
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
    if padded:
        summary += (f"; token segments of {', '.join(map(str, padded))} tokens do not split into the patches' equal "
                    f"chunks: each patch takes ceil(L/{m}) of them, the last ones zero-padded")
    return PassResult(gm, changed=result.changed or bool(whole), summary=summary, counts=dict(result.counts))


def _patch(gm: fx.GraphModule, m: int, ctx: PassContext):
    """shard_over for `m` patches, with the nodes that only build masks and a whole prefix left whole.
    Returns (gm, result, summary note of the prefix, mask nodes)."""
    masks = _whole_masks(gm)
    base = copy_graph(gm)
    result = shard_over(gm, m, ctx.mesh.group("sp"))
    gm, result, whole = _whole_prefix(gm, base, result, m, ctx.mesh.group("sp"))
    return gm, result, whole, masks


#: collectives over the ranks of one call that a per-patch graph cannot run (the other patches are elsewhere)
NEEDS_ALL = {collectives.all_reduce_tokens: "sums over every token (e.g. linear attention's K^T V)",
             collectives.halo_rows: "convolves across the rows of neighbouring patches",
             collectives.zero_token_padding: "sums over every token (e.g. linear attention's K^T V)"}


def _whole_prefix(gm: fx.GraphModule, base: fx.GraphModule, result: PassResult, m: int, group: str):
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
        trial = copy_graph(base)
        names = {n.name for n in prefix_nodes}
        originals = list(trial.graph.nodes)
        last = max((i for i, n in enumerate(originals) if n.name in names), default=-1)
        marked = 0
        for n in originals[:last + 1]:
            if n.op not in ("placeholder", "output"):
                n.meta[META_WHOLE] = why
                marked += 1
        result = shard_over(trial, m, group)
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


def _segment_lengths(gm: fx.GraphModule, chunks: int) -> tuple[set[int], set[int]]:
    """(lengths of the sharded token segments that split into `chunks` equal chunks, those that do not)."""
    odd, even = set(), set()
    for n in gm.graph.nodes:
        for lay in (n.meta.get(META_TOKEN_DIMS) or {}).values():
            if isinstance(lay, SeqLayout):
                for length, sharded in lay.segments:
                    if sharded:
                        (even if length % chunks == 0 else odd).add(length)
    return even, odd


def _whole_odd_segments(gm: fx.GraphModule, chunks: int) -> list[int] | None:
    """Make the sharded token segments whose length does not split into `chunks` equal chunks whole (every
    patch computes them, like a time token), as long as a segment that does split stays sharded; returns
    their lengths. None when no segment splits (patch_sequence refuses the plan)."""
    even, odd = _segment_lengths(gm, chunks)
    if not odd:
        return []
    if not even:
        return None
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


def _unsplit_segment(gm: fx.GraphModule, ctx: PassContext, odd: list[int] | None = None,
                     exits: bool = False) -> tuple[fx.Node, int, str]:
    """(a node carrying the segment that blocks the split, its length, why) for `_refuse_split`: the
    longest segment that does not split (exits: the longest of `odd`, which the output carries)."""
    plan = ctx.plan
    chunks = (ctx.layout_patches or plan.patches) * plan.ulysses_degree * plan.ring_degree
    _, unsplit = _segment_lengths(gm, chunks)
    length = max(odd or unsplit)
    carriers = [n for n in gm.graph.nodes for lay in (n.meta.get(META_TOKEN_DIMS) or {}).values()
                if isinstance(lay, SeqLayout) and any(seg == length for seg, _ in lay.segments)]
    node = carriers[-1 if exits else 0]  # the value the model returns, or where the segment comes in
    parts = f"pipefusion_patches={plan.patches}" + "".join(
        f" x {a}={plan.degree(a)}" for a in ("ring", "ulysses") if plan.degree(a) > 1)
    what = "equal patches" if chunks == plan.patches else "equal chunks"
    if exits:
        why = (f"has a token segment of {length} tokens, which does not split into {parts} {what}; a segment "
               "that does not split is computed whole by every patch, but this one is what the model returns "
               "(the patched segments never reach an output), so no patch would flow through the stages")
    else:
        why = f"has a token segment of {length} tokens, which does not split into {parts} {what}"
    return node, length, why


def _refuse_split(entry: fx.GraphModule, ctx: PassContext, node: fx.Node, length: int, why: str,
                  only_with_fix: bool = False) -> None:
    """Refuse the patch count, suggesting only patch counts that patch_sequence and pipefusion accept on
    this graph (each is tried on a copy of it). `only_with_fix`: return instead when none passes (a later
    check names a cause no patch count fixes, such as the heads under ulysses)."""
    plan = ctx.plan
    sp = plan.ulysses_degree * plan.ring_degree
    found: list[int] = []
    if not _TRIAL.get():
        candidates = sorted((d for d in range(2, 65) if length % (d * sp) == 0 and d != plan.patches),
                            key=lambda d: (abs(d - plan.patches), d))
        for d in candidates[:8]:
            if _accepts(entry, ctx, d):
                found.append(d)
            if len(found) == 3:
                break
    if only_with_fix and not found:
        return
    fix = (f"use patches in {sorted(found)} (each checked on this graph)" if found else
           "no patch count up to 64 passes on this graph; run it with ulysses/ring, or cfg/dp")
    if sp > 1 and found:
        fix += " (or sequence-parallel degrees that divide the segment with the patches)"
    raise PlanError(f"pipefusion: {describe_node(node)}\n  {why}; {fix}.")


#: set while a suggested patch count is tried (a refusal inside the try suggests nothing)
_TRIAL: ContextVar[bool] = ContextVar("xdit_fx_pipefusion_trial", default=False)


def _accepts(entry: fx.GraphModule, ctx: PassContext, patches: int) -> bool:
    """Whether patch_sequence and pipefusion accept a copy of `entry` with `patches` patches."""
    trial = PassContext(dataclasses.replace(ctx.plan, pipefusion_patches=patches), ctx.mesh)
    token = _TRIAL.set(True)
    try:
        pipefusion(patch_sequence(copy_graph(entry), trial).gm, trial)
        return True
    except Exception:  # noqa: BLE001  (any refusal or failure: not a fix to suggest)
        return False
    finally:
        _TRIAL.reset(token)


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


def pf_shard_tokens_target():
    from xdit_fx.ops.pipefusion import pf_shard_tokens
    return pf_shard_tokens


# ---- pass 2: region, stages, crossings ----------------------------------------------------------------

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
    shards = [n for n in nodes if _is(n, pf_shard_tokens)]
    gathers = [n for n in nodes if _is(n, collectives.gather_tokens)]
    if not shards:
        return PassResult(gm, changed=False, summary="no token sequence in this graph: it runs whole on every rank")
    found = find_region(nodes, shards, gathers,
                        lambda n: _is(n, pf_shard_tokens) or _is(n, collectives.gather_tokens))
    region, blocks = found.nodes, found.blocks
    costs = block_costs(nodes, blocks)
    try:
        block_stage = cut_stages(costs, n_stages)
    except PlanError as e:  # blocks that run whole before the patches count for no stage: say why they do
        why = next((n.meta[META_WHOLE] for n in nodes if n.meta.get(META_WHOLE) and META_BLOCK in n.meta), None)
        if why is None:
            raise
        ahead = sorted({n.meta[META_BLOCK] for n in nodes if n.meta.get(META_WHOLE) and META_BLOCK in n.meta})
        raise PlanError(f"{e} Blocks {', '.join(ahead)} run whole before the patches because {why}.") from e
    stage = assign_stages(nodes, region, dict(zip(blocks, block_stage)))
    kv_sites = _rewrite_attention(graph, nodes, region, stage, u, pf_attention)
    nodes = list(graph.nodes)
    if u * rr > 1:  # alone, a segment M does not divide is split unevenly (padded)
        _check_patch_split(nodes, region, m, u, rr)

    exits = find_exits(gathers, region, stage, n_stages - 1)
    crossings = find_crossings(nodes, region, stage, exits, n_stages - 1, chunks)
    writers = in_place_writers(nodes, region, stage)
    live_ins = region_inputs(nodes, region)
    programs = stage_programs(gm, nodes, region, stage, n_stages, crossings, exits, live_ins, writers)
    spec = PipeFusionSpec(n_stages, m, blocks, block_stage, costs, crossings, exits, kv_sites,
                          [a.name for a in live_ins], programs, ulysses=u, ring=rr)
    description = spec.describe()

    # the whole region as one body, for the dump
    by_name = {n.name: n for n in nodes}
    body = extract(gm, nodes, region, live_ins, [by_name[e.value] for e in exits])
    gm.add_submodule(REGION_NAME, PipeFusionRegion(body, spec))
    # the call goes after the last node outside the region that does not read it; gathers become its outputs
    splice_call(graph, nodes, REGION_NAME, live_ins, gathers, remove=region | set(gathers),
                tail=found.post - set(gathers),
                meta={"example_value": tuple(global_value(g.args[0]) for g in gathers), META_PIPEFUSION: description},
                drop_meta=(META_CREATED_BY, META_GATHER))
    return PassResult(gm, changed=True, summary=description,
                      counts={"pipefusion_stages": n_stages, "pipefusion_crossings": len(crossings),
                              "kv_buffers": len(kv_sites)})


def _rewrite_attention(graph: fx.Graph, nodes: list[fx.Node], region: set[fx.Node], stage: dict[fx.Node, int],
                       u: int, pf_attention) -> list[int]:
    """Every attention on patch queries becomes `pf_attention` with a K/V buffer per site (the new nodes
    replace the old in `region` and `stage`). Returns the sites whose keys are patched (they keep a buffer)."""
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
    return kv_sites


def _check_patch_split(nodes: list[fx.Node], region: set[fx.Node], m: int, u: int, rr: int) -> None:
    """Every sharded token segment must split into M equal patches (M x U x R equal chunks with ulysses and
    ring). patch_sequence refuses a split with the patch counts that pass; this names the node when none
    does."""
    chunks = m * u * rr
    for n in nodes:
        lay = n.meta.get(META_LAYOUT)
        if n in region and isinstance(lay, SeqLayout):
            for length, sharded in lay.segments:
                if sharded and length % chunks:
                    parts = f"pipefusion_patches={m}" + (f" x ring={rr}" if rr > 1 else "") + \
                        (f" x ulysses={u}" if u > 1 else "")
                    what = "equal chunks" if chunks != m else "equal patches"
                    raise PlanError(
                        f"pipefusion: {describe_node(n)}\n  has a token segment of {length} tokens, which does "
                        f"not split into {parts} {what}, and no patch count up to 64 passes on this graph; run it "
                        "with ulysses/ring, or cfg/dp.")
