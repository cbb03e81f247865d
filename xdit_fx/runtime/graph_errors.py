"""Errors raised while a rewritten graph runs, re-raised with the node that failed: its name, module path, source
line, the line of generated code, and the plan (a bare PyTorch error from generated code names nothing)."""

from __future__ import annotations

import linecache
import re
from typing import Any, Callable

import torch.fx as fx

from xdit_fx.compiler.fx_utils import describe_node
from xdit_fx.errors import XditFxError, dump_hint

_ASSIGN = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=")


class GraphRuntimeError(XditFxError, RuntimeError):
    """An exception inside a rewritten graph, with the node it happened at."""


def failing_node(gm: fx.GraphModule, tb) -> tuple[fx.Node | None, str]:
    """The node of `gm` whose generated line raised (innermost frame of gm's generated forward), and that line."""
    filename = type(gm).forward.__code__.co_filename
    frame_line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            frame_line = tb.tb_lineno
        tb = tb.tb_next
    if frame_line is None:
        return None, ""
    text = linecache.getline(filename, frame_line).strip()
    m = _ASSIGN.match(text)
    if m is None:
        return None, text
    by_name = {n.name: n for n in gm.graph.nodes}
    return by_name.get(m.group(1)), text.split(";")[0]


def with_node_names(gm: fx.GraphModule, plan: Any, forward: Callable) -> Callable:
    """`forward` whose exceptions from gm's generated code are re-raised as GraphRuntimeError naming the node."""

    def run(*args: Any) -> Any:
        try:
            return forward(*args)
        except XditFxError:
            raise
        except Exception as e:
            node, line = failing_node(gm, e.__traceback__)
            if node is None and not line:
                raise
            where = describe_node(node) if node is not None else "a node of the rewritten graph"
            created = node.meta.get("xfx.created_by") if node is not None else None
            made = f" (inserted by pass '{created}')" if created else ""
            plan_text = plan.to_string() if hasattr(plan, "to_string") else str(plan)
            raise GraphRuntimeError(
                f"the graph rewritten for plan {plan_text} failed at {where}{made}\n"
                f"  generated code: {line}\n  {type(e).__name__}: {e}\n{dump_hint(plan)}") from e

    run.__wrapped__ = forward
    return run
