"""The cost model (xdit_fx.compiler.cost) and the region helpers (xdit_fx.compiler.regions) on a tiny graph."""

from __future__ import annotations

import torch
from torch import nn

from xdit_fx.compiler.capture import capture_graphs
from xdit_fx.compiler.cost import cost_by_block, graph_cost, node_bytes, node_flops, total_cost
from xdit_fx.compiler.fx_utils import META_BLOCK, copy_graph
from xdit_fx.compiler.regions import boundary, extract, region_inputs


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)).view(2, 5, 32))


def _graph():
    return capture_graphs(MLP(), torch.randn(2, 5, 8))[0]


def test_flops_and_bytes_from_fake_shapes():
    gm = _graph()
    costs = {c.op.split(".")[-1]: c for c in graph_cost(gm)}
    linears = [n for n in gm.graph.nodes if "linear" in str(n.target)]
    up, down = linears
    assert node_flops(up) == 2 * 2 * 5 * 32 * 8 and node_flops(down) == 2 * 2 * 5 * 8 * 32
    # bytes read + written: x, weight, bias in, the result out (float32)
    assert node_bytes(up) == 4 * (2 * 5 * 8 + 32 * 8 + 32 + 2 * 5 * 32)
    assert costs["view"].bytes == 0 and costs["relu"].flops == 0 and costs["relu"].bytes == 2 * 4 * 2 * 5 * 32
    total = total_cost(graph_cost(gm))
    assert total.flops == node_flops(up) + node_flops(down) and total.nodes == len(gm.graph.nodes)


def test_cost_by_block_sums_tagged_nodes():
    gm = _graph()
    linears = [n for n in gm.graph.nodes if "linear" in str(n.target)]
    for n, b in zip(linears, ("blocks.0", "blocks.1")):
        n.meta[META_BLOCK] = b
    per_block = cost_by_block(graph_cost(gm))
    assert list(per_block) == ["blocks.0", "blocks.1"]
    assert per_block["blocks.0"].flops == node_flops(linears[0]) and per_block["blocks.1"].nodes == 1


def test_region_boundary_and_extract():
    gm = _graph()
    copy = copy_graph(gm)
    assert [n.name for n in copy.graph.nodes] == [n.name for n in gm.graph.nodes]
    nodes = list(gm.graph.nodes)
    region = {n for n in nodes if n.op == "call_function" and "relu" in str(n.target)}
    live_ins, live_outs = boundary(nodes, region)
    assert live_ins == region_inputs(nodes, region) and len(live_ins) == 1 and live_outs == list(region)
    body = extract(gm, nodes, region, live_ins, live_outs)
    x = torch.randn(2, 5, 32)
    assert torch.equal(body(x)[0], torch.relu(x))
    assert [n.name for n in body.graph.nodes if n.op == "placeholder"] == [live_ins[0].name]
