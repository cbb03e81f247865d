"""The cost model: estimated work and memory traffic of each node of a captured graph, from its fake shapes.

Units:
  * **FLOPs**: floating-point operations of one call of the graph, a multiply-add counted as 2:
    ``2*M*N*K`` per linear/matmul (``2 * out.numel() * K``), ``4*B*H*Lq*Lkv*D`` per attention (the two
    matmuls QK^T and PV), ``2 * out.numel() * Cin*k...`` per convolution. Everything else (elementwise ops,
    norms, softmax outside SDPA, views) counts 0: it is cheap next to the matmuls.
  * **bytes**: bytes the node reads plus bytes it writes: every tensor input's ``numel * element_size``
    plus every tensor output's, as the fake values give them. Views and tuple selections (``view``,
    ``getitem``, ``transpose``...) move no data and count 0, as do placeholders, ``get_attr`` and the output.

Nothing here looks at a process group or a plan: the PipeFusion stage cut weighs its blocks with
`block_costs`, and a planner can call `graph_cost` / `cost_by_block` on any captured graph.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx as fx

from xdit_fx.compiler.fx_utils import (META_BLOCK, example_value, is_linear, is_sdpa, sdpa_args, shape_of,
                                       target_name)

#: ops that only re-describe their input's memory (or pick an item of a tuple): no bytes move
VIEW_OPS = frozenset({
    "getitem", "view", "reshape", "transpose", "permute", "unflatten", "flatten", "narrow", "select", "slice",
    "expand", "unsqueeze", "squeeze", "chunk", "split", "unbind", "as_strided", "t", "view_as", "movedim",
    "swapaxes", "expand_as", "detach", "split_with_sizes", "tensor_split", "size", "dim"})


@dataclass(frozen=True)
class NodeCost:
    """The estimated cost of one node: `flops` (FLOPs) and `bytes` (bytes read + written) per call."""

    node: str               # the node's name
    op: str                 # what it calls (fx_utils.target_name)
    block: str | None       # its transformer block (xfx.block), None outside the block stack
    flops: float = 0.0
    bytes: int = 0


@dataclass(frozen=True)
class BlockCost:
    """The summed cost of the nodes of one block (or of any group of nodes)."""

    flops: float = 0.0
    bytes: int = 0
    nodes: int = 0


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


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return int(value.numel()) * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def node_bytes(node: fx.Node) -> int:
    """Estimated bytes one node reads plus writes, from its inputs' and its output's fake values (0 for views,
    placeholders, get_attr and the output)."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return 0
    if node.op != "call_module" and target_name(node).split(".")[-1] in VIEW_OPS:
        return 0
    read = sum(_tensor_bytes(example_value(a)) for a in node.all_input_nodes)
    return read + _tensor_bytes(example_value(node))


def node_cost(node: fx.Node) -> NodeCost:
    """FLOPs and bytes of one node."""
    return NodeCost(node.name, target_name(node), node.meta.get(META_BLOCK), node_flops(node), node_bytes(node))


def graph_cost(gm: fx.GraphModule | fx.Graph) -> list[NodeCost]:
    """The cost of every node of a graph, in graph order."""
    graph = gm.graph if isinstance(gm, fx.GraphModule) else gm
    return [node_cost(n) for n in graph.nodes]


def total_cost(costs: Iterable[NodeCost]) -> BlockCost:
    """The sum of some node costs."""
    flops, nbytes, count = 0.0, 0, 0
    for c in costs:
        flops, nbytes, count = flops + c.flops, nbytes + c.bytes, count + 1
    return BlockCost(flops, nbytes, count)


def cost_by_block(costs: Iterable[NodeCost]) -> dict[str, BlockCost]:
    """Summed cost per transformer block (xfx.block), in order of first appearance; nodes outside every block
    are left out (sum them with `total_cost`)."""
    groups: dict[str, list[NodeCost]] = {}
    for c in costs:
        if c.block is not None:
            groups.setdefault(c.block, []).append(c)
    return {b: total_cost(cs) for b, cs in groups.items()}


def block_costs(nodes: Iterable[fx.Node], blocks: list[str]) -> list[float]:
    """FLOPs of each of `blocks` (summed over its nodes among `nodes`), at least 1.0 each: the weights of
    the PipeFusion stage cut."""
    cost = {b: 0.0 for b in blocks}
    for n in nodes:
        b = n.meta.get(META_BLOCK)
        if b in cost:
            cost[b] += node_flops(n)
    return [max(cost[b], 1.0) for b in blocks]
