"""Inductor on the pieces of a graph between calls that must run as they are.

PipeFusion's stage programs call `pf_attention` and `pf_shard_tokens`, which read the patch being computed
and write the runtime's K/V buffers: tracing them into an Inductor graph would bake in one patch. And the
graph around a PipeFusion region calls the region, which sends and receives between stages. So under
``Plan(compile=True)`` such a graph is split at those calls (`torch.fx.passes.split_module`): every piece
between them is compiled by Inductor on its first call (with its real inputs, static shapes), and the
opaque calls run eagerly between the pieces. The split GraphModule shows which is which: its `submod_N`
children are `InductorPiece`s, or GraphModules holding one opaque call.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import fx, nn

log = logging.getLogger(__name__)


class InductorPiece(nn.Module):
    """A piece of a split graph, compiled by Inductor on its first call. A piece that Inductor cannot take
    (a non-tensor input, such as a tuple produced before an opaque call and unpacked after it) runs eagerly,
    and says so once in the log."""

    def __init__(self, body: fx.GraphModule, name: str) -> None:
        super().__init__()
        self.body = body
        self.name = name
        self.compiled: Callable | None = None
        self.eager_reason: str | None = None

    def forward(self, *args: Any) -> Any:
        if self.compiled is None and self.eager_reason is None:
            bad = [type(a).__name__ for a in args if not isinstance(a, (torch.Tensor, int, float, bool))]
            if bad:
                self.eager_reason = f"inputs of type {', '.join(sorted(set(bad)))}"
                log.warning("compile: %s runs eagerly (%s)", self.name, self.eager_reason)
            else:
                from torch._inductor.compile_fx import compile_fx
                self.compiled = compile_fx(self.body, list(args))
        if self.compiled is not None:
            return self.compiled(*args)
        return self.body(*args)


def _computes(gm: fx.GraphModule) -> bool:
    """Whether a piece does any work (a piece of only getitems/views is not worth a compile)."""
    return any(n.op in ("call_function", "call_method", "call_module")
               and getattr(n.target, "__name__", "") != "getitem" for n in gm.graph.nodes)


def compile_between(gm: fx.GraphModule, opaque: Callable[[fx.Node], bool], label: str) -> fx.GraphModule:
    """`gm` split at the nodes `opaque` selects; the pieces between them compiled lazily by Inductor."""
    from torch.fx.passes.split_module import split_module

    part: dict[fx.Node, int] = {}
    kinds: dict[int, bool] = {}  # partition -> is an opaque call
    current = 0
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        if opaque(n):
            current += 1
            part[n] = current
            kinds[current] = True
            current += 1
        else:
            part[n] = current
            kinds.setdefault(current, False)
    split = split_module(gm, gm, lambda n: part[n], keep_original_order=True, keep_original_node_name=True)
    for name, sub in list(split.named_children()):
        if not name.startswith("submod_"):
            continue
        index = int(name.split("_")[-1])
        if kinds.get(index) or not isinstance(sub, fx.GraphModule) or not _computes(sub):
            continue
        setattr(split, name, InductorPiece(sub, f"{label}.{name}"))
    return split


def pieces(gm: nn.Module) -> list[InductorPiece]:
    return [m for m in gm.modules() if isinstance(m, InductorPiece)]
