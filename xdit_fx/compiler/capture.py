"""Capture a module's forward as torch.fx graphs with dynamo, without running any pass.

`parallelize` captures inside its dynamo backend on every rank; this is the same capture for tools and
tests that want the graphs themselves (dumps, unit tests of passes)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn


def capture_graphs(model: nn.Module, *args: Any, fullgraph: bool = False, **kwargs: Any) -> list[fx.GraphModule]:
    """The GraphModules dynamo hands to a backend for one call `model(*args, **kwargs)` (static shapes).

    Parameters and buffers arrive as placeholders; nodes carry `example_value` (fake tensors),
    `nn_module_stack` and `stack_trace`. Runs under torch.no_grad()."""
    graphs: list[fx.GraphModule] = []

    def recorder(gm: fx.GraphModule, example_inputs: list[Any]):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=recorder, fullgraph=fullgraph, dynamic=False)
    with torch.no_grad():
        compiled(*args, **kwargs)
    return graphs
