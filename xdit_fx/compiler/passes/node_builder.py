"""Insert nodes into a graph with their fake values and provenance: what rewrite passes build with."""

from __future__ import annotations

import contextlib

import torch.fx as fx

from xdit_fx.compiler.fx_utils import example_value


class Builder:
    """Insert nodes before `anchor`, computing each new node's fake value and copying provenance meta."""

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node, like: fx.Node):
        self.g, self.anchor, self.like = gm.graph, anchor, like

    def _meta(self, node: fx.Node) -> fx.Node:
        for k in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if k in self.like.meta:
                node.meta[k] = self.like.meta[k]

        def val(a):
            return example_value(a) if isinstance(a, fx.Node) else a

        args = fx.node.map_aggregate(node.args, val)
        kwargs = fx.node.map_aggregate(node.kwargs, val)
        fakes = [x for x in fx.node.map_aggregate((args, kwargs), lambda x: x) if False]
        modes = []
        fx.node.map_aggregate((args, kwargs), lambda x: modes.append(x.fake_mode) if hasattr(x, "fake_mode") else None)
        del fakes
        with modes[0] if modes else contextlib.nullcontext():
            if node.op == "call_method":
                node.meta["example_value"] = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                node.meta["example_value"] = node.target(*args, **kwargs)
        return node

    def fn(self, target, *args, **kwargs) -> fx.Node:
        with self.g.inserting_before(self.anchor):
            return self._meta(self.g.call_function(target, args, kwargs))

    def method(self, name: str, *args, **kwargs) -> fx.Node:
        with self.g.inserting_before(self.anchor):
            return self._meta(self.g.call_method(name, args, kwargs))
