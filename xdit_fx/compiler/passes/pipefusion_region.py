"""PipeFusion, step 1: the region that runs per patch (analysis only; the graph is not changed).

The region is everything downstream of a patch slice (``pf_shard_tokens``) up to the exit gathers, plus the
nodes of a block that read no token (adaLN modulation of the timestep embedding), which move to the block's
stage. What runs before it (embeddings, timestep, RoPE tables) runs whole on every rank; what runs after
the exit gathers (``post``: final norm, unpatchify) too, on the assembled output. Graphs a patch pipeline
cannot run (a gather the blocks depend on, per-patch tokens again after a gather, a vmap section, a region
node reading a gathered value) are refused here, naming the node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.fx as fx

from xdit_fx.compiler.fx_utils import describe_node, META_BLOCK, META_GATHER, target_name
from xdit_fx.errors import UnsupportedGraph

if TYPE_CHECKING:  # networkx is imported when a PipeFusion plan runs the pass, not with the package
    import networkx as nx

_DUMP_HINT = "xdit-fx dump MODEL --plan pipefusion=2 --out DIR"


@dataclass
class PatchRegion:
    """The per-patch part of a graph."""

    nodes: set[fx.Node]   # the nodes that run once per patch
    post: set[fx.Node]    # the exit gathers and what runs after them (on the assembled output)
    blocks: list[str]     # the blocks that run per patch, in graph order


def find_region(nodes: list[fx.Node], shards: list[fx.Node], gathers: list[fx.Node], is_slice) -> PatchRegion:
    """The per-patch region of a graph whose patch slices are `shards` and exit gathers `gathers`.
    `is_slice(node)`: whether a node slices a patch or gathers the tokens (a per-patch boundary)."""
    import networkx as nx

    dag = nx.DiGraph()
    dag.add_nodes_from(nodes)
    dag.add_edges_from((a, n) for n in nodes for a in n.all_input_nodes)
    post = _post(nodes, dag, gathers, is_slice)
    region: set[fx.Node] = set(shards)
    for s in shards:
        region |= nx.descendants(dag, s)
    region -= post
    region = {n for n in region if n.op != "output"}
    _check_vmap(nodes, region, post)
    bad = next((n for n in nodes if n in region and any(a in post for a in n.all_input_nodes)), None)
    if bad is not None:
        g = next(a for a in nx.ancestors(dag, bad) if a in gathers)
        raise UnsupportedGraph(
            f"pipefusion: {describe_node(bad)}\n  reads %{g.name}, a gather of the whole token sequence "
            f"({g.meta.get(META_GATHER, 'exit')}), inside the per-patch region: a patch cannot wait for the "
            "others' current values. The op without a token rule must get one (xdit_fx/compiler/passes/dim_rules.py).\n"
            f"  to look at the graph: {_DUMP_HINT}")
    # blocks that run per patch; their nodes that read no token value (adaLN modulation) join their stage
    blocks = list(dict.fromkeys(n.meta[META_BLOCK] for n in nodes if n in region and META_BLOCK in n.meta))
    if not blocks:
        raise UnsupportedGraph("pipefusion: no transformer block runs on the token sequence in this graph; "
                               f"there is nothing to cut into stages. Look at it with: {_DUMP_HINT}")
    staged = set(blocks)
    for n in reversed(nodes):
        if n in region or n in post or n.op not in ("call_function", "call_method"):
            continue
        if n.meta.get(META_BLOCK) in staged and n.users and all(u in region for u in n.users):
            region.add(n)
    return PatchRegion(region, post, blocks)


def _post(nodes: list[fx.Node], dag: nx.DiGraph, gathers: list[fx.Node], is_slice) -> set[fx.Node]:
    """The exit gathers and everything downstream of them; refused if a block depends on a gather, or if
    the tokens are sliced or gathered again after a gather."""
    import networkx as nx

    post: set[fx.Node] = set(gathers)
    for g in gathers:
        later = nx.descendants(dag, g)
        block = next((n for n in nodes if n in later and META_BLOCK in n.meta), None)
        if block is not None:
            raise UnsupportedGraph(
                f"pipefusion: %{g.name} gathers the whole token sequence ({g.meta.get(META_GATHER, 'exit')}) and "
                f"{describe_node(block)}\n  in {block.meta[META_BLOCK]} depends on it: {_gather_cause(g)}, so "
                "the patches cannot flow through the stages independently.\n"
                "  fix: run this model with ulysses/ring (sequence parallel handles it with the same gather), "
                f"or cfg/dp; to look at the graph: {_DUMP_HINT}")
        post |= later
    again = next((n for n in nodes if n in post and n not in gathers and is_slice(n)), None) or next(
        (g for g in gathers if g.args[0] in post), None)
    if again is not None:
        raise UnsupportedGraph(
            f"pipefusion: {describe_node(again)}\n  slices or gathers the token sequence again after an earlier "
            "gather: the graph goes back to per-patch tokens after it needed them whole, so the part after the "
            "per-patch region cannot run once on the assembled output.\n"
            "  fix: run this model with ulysses/ring, or cfg/dp; to look at the graph: xdit-fx dump MODEL "
            "--plan pipefusion=2 --out DIR")
    return post


def _gather_cause(g: fx.Node) -> str:
    """Why the tokens were gathered, from the node that reads the gather: an op whose token dims no rule
    carries per patch (named), or an output."""
    reader = next(iter(g.users), None)
    if reader is None or reader.op == "output":
        return "a value computed per patch is returned whole before the block stack ends"
    return (f"%{reader.name} ({target_name(reader)}) reads the tokens in a way no token rule keeps per patch "
            "(xdit_fx/compiler/passes/dim_rules.py), so it needs every patch's tokens at once")


def _check_vmap(nodes: list[fx.Node], region: set[fx.Node], post: set[fx.Node]) -> None:
    """Refuse a torch.func.vmap section (between _vmap_increment_nesting and _vmap_decrement_nesting) on the
    token sequence: its nesting state cannot be split between stages or patches."""
    stateful, depth = None, 0
    for n in nodes:
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
