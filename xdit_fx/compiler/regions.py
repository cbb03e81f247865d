"""Cutting a region (a set of nodes) out of a graph: its boundary, its body as a GraphModule, and the call
that replaces it. Shared by the PipeFusion pass (the per-patch region and each stage's program) and
insert_cache (the skippable blocks). Graph-only: what the region module does at run time is not known here.
"""

from __future__ import annotations

import operator
from typing import Any, Collection, Iterable

import torch.fx as fx
from torch import nn


def region_inputs(nodes: Iterable[fx.Node], region: Collection[fx.Node],
                  outputs: Iterable[fx.Node] = ()) -> list[fx.Node]:
    """The values the region reads from outside it (live-ins), in order of first use (nodes in graph order);
    then the `outputs` the region does not compute (handed through)."""
    live_ins: dict[fx.Node, None] = {}
    for n in nodes:
        if n not in region:
            continue
        for a in n.all_input_nodes:
            if a not in region:
                live_ins.setdefault(a, None)
    for n in outputs:
        if n not in region:
            live_ins.setdefault(n, None)
    return list(live_ins)


def region_outputs(nodes: Iterable[fx.Node], region: Collection[fx.Node]) -> list[fx.Node]:
    """The region's nodes that a node outside it reads (live-outs), in graph order."""
    return [n for n in nodes if n in region and any(u not in region for u in n.users)]


def boundary(nodes: list[fx.Node], region: Collection[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
    """(live-ins, live-outs) of a region: `region_inputs` and `region_outputs`."""
    return region_inputs(nodes, region), region_outputs(nodes, region)


def extract(owner: nn.Module, nodes: Iterable[fx.Node], region: Collection[fx.Node], inputs: list[fx.Node],
            outputs: Iterable[fx.Node]) -> fx.GraphModule:
    """The region's nodes (graph order), copied with their names and facts, as a GraphModule on `owner`:
    one placeholder per input (named and tagged as the input), a tuple of `outputs` as its result.
    Every value a region node reads must be in the region or among `inputs`."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in inputs:
        ph = graph.placeholder(a.name)
        ph.meta = dict(a.meta)
        env[a] = ph
    for n in nodes:
        if n in region:
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(owner, graph)


def splice_call(graph: fx.Graph, nodes: list[fx.Node], name: str, args: Iterable[Any], outputs: list[fx.Node], *,
                remove: Collection[fx.Node], tail: Collection[fx.Node], meta: dict[str, Any],
                drop_meta: Collection[str], keep_names: bool = False) -> fx.Node:
    """Replace a region by one call of the submodule `name` whose result is a tuple, in place.

    `nodes` is the graph's node list before the change. The call ``name(*args)`` goes after the last node that
    is neither in `remove` nor in `tail` (what the region does not depend on); a ``getitem`` per output takes
    its place for every reader outside `remove` (its facts copied, `drop_meta` keys left out); the `tail`
    (what reads the outputs) moves after them, in order; the `remove` nodes leave the graph. With
    `keep_names` the getitems take the names of the outputs they replace. Returns the call node."""
    head = [n for n in nodes if n not in remove and n not in tail and n.op != "output"]
    with graph.inserting_after(head[-1]):
        call = graph.create_node("call_module", name, tuple(args), name=name)
    call.meta.update(meta)
    anchor, items = call, []
    for i, o in enumerate(outputs):
        with graph.inserting_after(anchor):
            item = graph.create_node("call_function", operator.getitem, (call, i))
        item.meta.update({k: v for k, v in o.meta.items() if k not in drop_meta})
        o.replace_all_uses_with(item, delete_user_cb=lambda user: user not in remove)
        anchor = item
        items.append((item, o.name))
    for n in nodes:
        if n in tail and n.op != "output":
            anchor.append(n)
            anchor = n
    for n in reversed(nodes):
        if n in remove:
            graph.erase_node(n)
    if keep_names:
        for item, old in items:  # the outputs keep the names the rest of the graph knew them by
            if hasattr(item, "_rename"):
                item._rename(old)
    return call
