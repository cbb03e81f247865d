"""insert_cache: move the skippable part of the block stack into a region the runtime may skip.

Everything is found from the graph (the `xfx.block` tags of find_transformer_blocks), never from the
model's name:

1. **The main stack's first block** is the first block (in graph order) that depends on every user input
   any block depends on. Blocks that see only some inputs (a text refiner run before the main stack, which
   never sees the latent) stay outside the region and always run.
2. **The region**: First-Block-Cache takes the blocks after the first one; TeaCache takes all of them,
   minus the start of the first block up to the *probe*. Nodes between two region blocks (a concat of
   the text and image streams, sequence-parallel collectives) join the region, so it is convex: it reads
   values computed before it (live-ins) and hands values to the rest of the graph (live-outs).
3. **Residuals**: each live-out is paired with the live-in it was computed from along the shortest path
   through the region (the residual stream: a chain of `x = x + f(x)` adds is shorter than any path through
   attention or an MLP) with the same shape and dtype. A skipped call returns ``live_in + cached residual``
   for those, and the cached value for live-outs without a partner.
4. **The probe**, the tensor the skip decision is taken on: for First-Block-Cache the first block's
   residual (its output on the stream minus its input), for TeaCache the input of the first block's first
   linear layer that takes the token stream (the normalised, timestep-modulated input).

The rewrite moves the region's nodes, unchanged and with their names and facts, into a GraphModule body
held by a `CachedRegion` submodule, and calls it once: ``xfx_cache(probe..., live_ins...)``. The dump shows
the body's nodes under ``%xfx_cache.*``.
"""

from __future__ import annotations

import operator
from collections import deque

import torch
import torch.fx as fx

from xdit_fx.errors import UnsupportedGraph
from xdit_fx.compiler.fx_utils import describe_node, META_BLOCK, META_CACHE, META_CREATED_BY, example_value, is_linear, is_param_placeholder
from xdit_fx.compiler.passes.base import PassContext, PassResult, graph_pass
from xdit_fx.compiler.regions import boundary, extract, splice_call

REGION_NAME = "xfx_cache"


def _ordered_blocks(nodes: list[fx.Node]) -> tuple[list[str], dict[str, list[fx.Node]]]:
    members: dict[str, list[fx.Node]] = {}
    for n in nodes:
        b = n.meta.get(META_BLOCK)
        if b is not None:
            members.setdefault(b, []).append(n)
    return list(members), members


def _main_block(nodes: list[fx.Node], blocks: list[str], members: dict[str, list[fx.Node]],
                stack_in: fx.Node | None) -> int:
    """Index of the first block of the main stack: the first that reads the token stream's value from before
    the stack; without one, the first block that depends on every user input any block depends on.
    Blocks before it (a text refiner that never sees the latent) always run."""
    if stack_in is not None:
        for i, b in enumerate(blocks):
            if any(stack_in in n.all_input_nodes for n in members[b]):
                return i
    bit = {n: 1 << i for i, n in enumerate(
        n for n in nodes if n.op == "placeholder" and not is_param_placeholder(n))}
    deps: dict[fx.Node, int] = {}
    for n in nodes:
        m = bit.get(n, 0)
        for a in n.all_input_nodes:
            m |= deps[a]
        deps[n] = m
    per_block = []
    for b in blocks:
        m = 0
        for n in members[b]:
            m |= deps[n]
        per_block.append(m)
    # the first block that depends on the most inputs (no single block may depend on all of them)
    return max(range(len(blocks)), key=lambda i: (bin(per_block[i]).count("1"), -i))


def _closure(nodes: list[fx.Node], seeds: set[fx.Node]) -> set[fx.Node]:
    """seeds plus every node that is both a descendant and an ancestor of a seed (the glue between blocks).
    Graph inputs (parameters tagged with their block included) stay outside: the region reads them."""
    seeds = {n for n in seeds if n.op not in ("placeholder", "output", "get_attr")}
    desc: set[fx.Node] = set()
    for n in nodes:
        if n in seeds or any(a in seeds or a in desc for a in n.all_input_nodes):
            desc.add(n)
    anc: set[fx.Node] = set()
    for n in reversed(nodes):
        if n in seeds or any(u in seeds or u in anc for u in n.users):
            anc.add(n)
    return seeds | {n for n in desc & anc if n.op not in ("placeholder", "output", "get_attr")}


def _same_kind(a: fx.Node, b: fx.Node) -> bool:
    va, vb = example_value(a), example_value(b)
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and tuple(va.shape) == tuple(vb.shape) \
        and va.dtype == vb.dtype


def _partner(target: fx.Node, region: set[fx.Node], live_ins: list[fx.Node]) -> fx.Node | None:
    """The live-in with target's shape and dtype that is nearest to it along the region's data flow."""
    candidates = {n for n in live_ins if not is_param_placeholder(n) and _same_kind(n, target)}
    if not candidates:
        return None
    best: list[fx.Node] = []
    seen = {target}
    frontier = deque([(target, 0)])
    best_d = None
    while frontier:
        node, d = frontier.popleft()
        if best_d is not None and d > best_d:
            break
        if node in candidates:
            best_d = d
            best.append(node)
            continue
        if node is not target and node not in region:
            continue
        for a in node.all_input_nodes:
            if a not in seen:
                seen.add(a)
                frontier.append((a, d + 1))
    return best[0] if best else None


def _descendants(nodes: list[fx.Node], seeds: set[fx.Node]) -> set[fx.Node]:
    out = set(seeds)
    for n in nodes:
        if any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


_VIEWS = {"getitem", "narrow", "split", "split_with_sizes", "chunk", "tensor_split", "contiguous", "slice"}


def _stream(nodes: list[fx.Node], region: set[fx.Node]) -> tuple[set[fx.Node], fx.Node | None, fx.Node | None]:
    """The region's main output (its largest tensor output) and the input it is a residual over.

    When no input has the output's shape (a stack whose last blocks run on the concatenated text + image
    sequence and whose caller slices the image part out), the slicing that follows joins the region, up to
    a few ops, until the output matches an input."""
    from xdit_fx.compiler.fx_utils import target_name
    region = set(region)
    for _ in range(4):
        live_ins, live_outs = boundary(nodes, region)
        tensor_outs = [o for o in live_outs if isinstance(example_value(o), torch.Tensor)]
        if not tensor_outs:
            return region, None, None
        out = max(tensor_outs, key=_numel)
        partner = _partner(out, region, live_ins)
        if partner is not None:
            return region, out, partner
        grown = False
        for user in list(out.users):
            chain = [user]
            while len(chain) < 3 and not isinstance(example_value(chain[-1]), torch.Tensor) \
                    and len(chain[-1].users) == 1:
                chain.append(next(iter(chain[-1].users)))
            names = {target_name(c).split(".")[-1] for c in chain}
            outside = all(a in region or a in chain or a not in _descendants(nodes, region)
                          for c in chain for a in c.all_input_nodes)
            if user not in region and names <= _VIEWS and outside:
                region |= set(chain)
                grown = True
        if not grown:
            return region, out, None
    live_ins, live_outs = boundary(nodes, region)
    out = max((o for o in live_outs if isinstance(example_value(o), torch.Tensor)), key=_numel)
    return region, out, _partner(out, region, live_ins)


_VIEW_OPS = {"getitem", "view", "reshape", "transpose", "permute", "unflatten", "flatten", "narrow", "select",
             "slice", "expand", "unsqueeze", "squeeze", "chunk", "split", "unbind", "as_strided", "t", "view_as",
             "movedim", "swapaxes", "expand_as", "detach"}


def _alias_family(writer: fx.Node) -> set[fx.Node]:
    """The tensor a node writes in place, the views it was taken from, and everything that reads them."""
    from xdit_fx.compiler.fx_utils import target_name
    target = writer.args[0] if writer.args and isinstance(writer.args[0], fx.Node) else None
    family: set[fx.Node] = set()
    todo = [target] if target is not None else []
    while todo:
        n = todo.pop()
        if n in family:
            continue
        family.add(n)
        if target_name(n).split(".")[-1] in _VIEW_OPS and n.args and isinstance(n.args[0], fx.Node):
            todo.append(n.args[0])
        todo.extend(u for u in n.users if target_name(u).split(".")[-1] in _VIEW_OPS)
    return family | {u for n in family for u in n.users}


def _writes_in_place(n: fx.Node) -> bool:
    if n.op == "call_function" and n.target is operator.setitem:
        return True
    name = str(n.target) if n.op == "call_method" else getattr(n.target, "__name__", "") \
        if n.op == "call_function" else ""
    if name.endswith("_") and not name.startswith("_"):
        return True
    schema = getattr(n.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def _numel(n: fx.Node) -> int:
    v = example_value(n)
    return v.numel() if isinstance(v, torch.Tensor) else -1


def _block_span(blocks: list[str]) -> str:
    if not blocks:
        return "none"
    stacks: dict[str, list[str]] = {}
    for b in blocks:
        stack, _, idx = b.rpartition(".")
        stacks.setdefault(stack, []).append(idx)
    return ", ".join(f"{s}.{i[0]}" + (f"..{i[-1]}" if len(i) > 1 else "") for s, i in stacks.items())


REFUSAL = "xfx_cache_refusal"  # GraphModule.meta key: why this graph got no region (the runtime reports it)


@graph_pass(reads=[META_BLOCK], writes=[META_CACHE])
def insert_cache(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Move the skippable blocks into one region the runtime runs or skips (First-Block-Cache / TeaCache).

    A graph whose blocks cannot be cut out is left as it is, with the reason in ``gm.meta`` and the pass
    summary: a forward split into several graphs may hold its main stack in another one. The runtime
    raises the reasons when no graph of a call has a region."""
    nodes = list(gm.graph.nodes)
    blocks, members = _ordered_blocks(nodes)
    if not blocks:
        return PassResult(gm, changed=False, summary="no transformer blocks in this graph: nothing to cache")
    try:
        return _insert_cache(gm, ctx, nodes, blocks, members)
    except UnsupportedGraph as e:  # raised before the graph is changed
        reason = str(e).split("\n  to look at the graph")[0]
        gm.meta[REFUSAL] = reason
        return PassResult(gm, changed=False, summary=f"no cache region in this graph: {reason}")


def _insert_cache(gm: fx.GraphModule, ctx: PassContext, nodes: list[fx.Node], blocks: list[str],
                  members: dict[str, list[fx.Node]]) -> PassResult:
    from xdit_fx.ops.regions import CachedRegion, RegionSpec

    config = ctx.plan.cache
    fbc = config.kind == "fbc"
    # the stack's output on the token stream, and the stream's value before the stack
    whole = _closure(nodes, {n for b in blocks for n in members[b]})
    whole, stack_out, stack_in = _stream(nodes, whole)
    main = _main_block(nodes, blocks, members, stack_in)
    first = members[blocks[main]]
    if fbc and main == len(blocks) - 1:
        raise UnsupportedGraph(
            f"insert_cache: First-Block-Cache needs a block after the first one to skip, but this graph holds "
            f"only {blocks[main]} after the blocks it always runs ({_block_span(blocks[:main]) or 'none'}).\n"
            "  fix: use TeaCache (it skips the whole stack), or no cache; if the model's forward was split into "
            "several graphs, look at them with: xdit-fx dump MODEL --plan ... --out DIR")
    skipped = blocks[main + 1:] if fbc else blocks[main:]
    region = _closure(nodes, {n for b in skipped for n in members[b]})
    region, stream_out, stream_in = _stream(nodes, region)
    live_ins, live_outs = boundary(nodes, region)

    if fbc:
        probe, probe_text = _fbc_probe(nodes, first, blocks[main], skipped, live_ins, stream_in)
    else:
        probe, probe_text, region = _teacache_probe(nodes, first, blocks[main], region, stream_in)
        live_ins, live_outs = boundary(nodes, region)

    residual_of = []
    for o in live_outs:
        p = _partner(o, region, live_ins) if isinstance(example_value(o), torch.Tensor) else None
        residual_of.append(live_ins.index(p) if p is not None else None)

    # the rest of the graph: what runs before the region (head) and what reads its results (tail)
    after: set[fx.Node] = set()
    for n in nodes:
        if n not in region and any(a in region or a in after for a in n.all_input_nodes):
            after.add(n)
    for n in nodes:
        if n in after and any(u in region for u in n.users):
            raise UnsupportedGraph(f"insert_cache: {describe_node(n)}\n  reads a block output and feeds a later "
                                   "block from outside the block stack; the stack cannot be cut into one region.")
    _check_moves(nodes, region, after, skipped)

    description = (f"{'first-block-cache' if fbc else 'teacache'}: skips {_block_span(skipped)} "
                   f"({len(skipped)} of {len(blocks)} blocks); probe {probe_text}; "
                   f"{len(live_outs)} outputs, {sum(r is not None for r in residual_of)} as residuals")
    body = extract(gm, nodes, region, live_ins, live_outs)
    # the parameters the region reads: the main stack is the costliest region when there are several graphs
    weights = [example_value(a) if a.op == "placeholder" else _attr(gm, a.target) for a in live_ins
               if is_param_placeholder(a) or a.op == "get_attr"]
    cost = sum(w.numel() for w in weights if isinstance(w, torch.Tensor))
    spec = RegionSpec(kind=config.kind, n_probe=len(probe), residual_of=tuple(residual_of),
                      stream_out=live_outs.index(stream_out), blocks_total=len(blocks), blocks_skipped=len(skipped),
                      description=description, cost=cost)
    gm.add_submodule(REGION_NAME, CachedRegion(body, spec))

    # in place: the call goes after the last node the region does not depend on; what reads the region's
    # outputs moves after it; the region's nodes leave the graph; the outputs keep their names
    splice_call(gm.graph, nodes, REGION_NAME, tuple(probe) + tuple(live_ins), live_outs, remove=region, tail=after,
                meta={"example_value": tuple(example_value(o) for o in live_outs), META_CACHE: description},
                drop_meta=(META_CREATED_BY, META_BLOCK), keep_names=True)
    return PassResult(gm, changed=True, summary=description,
                      counts={"cache_regions": 1, "cached_blocks": len(skipped)})


def _fbc_probe(nodes: list[fx.Node], first: list[fx.Node], first_block: str, skipped: list[str],
               live_ins: list[fx.Node], stream_in: fx.Node | None) -> tuple[list[fx.Node], str]:
    """First-Block-Cache's probe: the first block's residual, its output on the stream minus that stream's
    value before the block. Returns (probe nodes, description)."""
    first_region = _closure(nodes, set(first))
    first_ins, _ = boundary(nodes, first_region)
    # the first block's output on the stream: what the region reads in place of the stack's input
    from_first = _descendants(nodes, first_region)
    first_out = stream_in if stream_in is not None and stream_in in first_region else max(
        (a for a in live_ins if a in from_first and isinstance(example_value(a), torch.Tensor)),
        key=_numel, default=None)
    if first_out is None:
        raise UnsupportedGraph(f"insert_cache: the blocks {_block_span(skipped)} read no tensor from "
                               f"{first_block}; First-Block-Cache has no first-block output to watch.")
    first_in = _partner(first_out, first_region, first_ins)
    probe = [first_out] + ([first_in] if first_in is not None else [])
    probe_text = (f"residual %{first_out.name} - %{first_in.name}" if first_in is not None
                  else f"%{first_out.name}")
    return probe, probe_text


def _teacache_probe(nodes: list[fx.Node], first: list[fx.Node], first_block: str, region: set[fx.Node],
                    stream_in: fx.Node | None) -> tuple[list[fx.Node], str, set[fx.Node]]:
    """TeaCache's probe: the input of the first linear layer of the first block that reads the token stream
    (the normalised and, in adaLN blocks, timestep-modulated stream). The probe and what it is computed from
    leave the region. Returns (probe nodes, description, region)."""
    stream_anc = _descendants(nodes, {stream_in}) if stream_in is not None else set()
    linear = next((n for n in first if is_linear(n) and isinstance(n.args[0], fx.Node)
                   and n.args[0] in stream_anc and isinstance(example_value(n.args[0]), torch.Tensor)), None)
    if linear is None and stream_in is None:
        raise UnsupportedGraph(
            f"insert_cache: TeaCache needs the first block's modulated input, the input of a linear layer "
            f"of {first_block} that reads the token stream, or the stream itself; there is neither. Use "
            "FirstBlockCache.\n  to look at the graph: xdit-fx dump MODEL --plan ... --out DIR")
    # without such a linear (the stream is reshaped before the first one), the stack's input itself
    target = linear.args[0] if linear is not None else stream_in
    ancestors: set[fx.Node] = set()
    todo = [target]
    while todo:
        n = todo.pop()
        if n in ancestors:
            continue
        ancestors.add(n)
        todo.extend(n.all_input_nodes)
    probe_text = (f"%{target.name} (input of %{linear.name})" if linear is not None
                  else f"%{target.name} (the stack's input: no linear of {first_block} reads the stream)")
    return [target], probe_text, region - ancestors


def _check_moves(nodes: list[fx.Node], region: set[fx.Node], after: set[fx.Node], skipped: list[str]) -> None:
    """Moving nodes across the region is only safe if no in-place write changes places with a read of the
    tensor it writes (a view of it taken earlier still sees the write, so views may move)."""
    from xdit_fx.compiler.fx_utils import target_name
    order = {n: i for i, n in enumerate(nodes)}
    lo, hi = min(order[n] for n in region), max(order[n] for n in region)
    moved = [n for n in nodes if (n not in region and n not in after and order[n] > lo and n.op != "output")
             or (n in after and order[n] < hi)]
    if not moved:
        return

    def new_key(n: fx.Node) -> tuple[int, int]:
        return (3 if n.op == "output" else 1 if n in region else 2 if n in after else 0), order[n]

    def swapped(w: fx.Node) -> fx.Node | None:
        return next((m for m in _alias_family(w) if m is not w
                     and (new_key(m) < new_key(w)) != (order[m] < order[w])
                     and target_name(m).split(".")[-1] not in _VIEW_OPS), None)

    writer = next((n for n in nodes if _writes_in_place(n) and swapped(n) is not None), None)
    if writer is not None:
        raise UnsupportedGraph(
            f"insert_cache: {describe_node(writer)}\n  writes a tensor in place, and cutting the blocks "
            f"{_block_span(skipped)} out as one region would move '{swapped(writer).name}', which reads "
            "that tensor, to the other side of the write.\n"
            "  to look at the graph: xdit-fx dump MODEL --plan ... --out DIR")


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj

