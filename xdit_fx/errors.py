"""The exceptions xdit_fx raises. Every message says what failed, where, why, and how to fix it."""

from __future__ import annotations


class XditFxError(Exception):
    """Base class of every error raised by xdit_fx."""


class PlanError(XditFxError, ValueError):
    """A plan that cannot run: bad degrees, or degrees that do not fit the world size."""


class UnsupportedGraph(XditFxError):
    """A pass found a graph structure it cannot parallelize (the message names the node)."""


class PassError(XditFxError, RuntimeError):
    """An unexpected exception inside a pass, wrapped with the pass name and what ran before."""


class MissingBackend(XditFxError, ImportError):
    """An optional backend (flash-attn, onediff, ...) was asked for but is not installed."""


def describe_node(node) -> str:
    """One line that locates an fx node: its name, module path and the user source line."""
    from .fx_utils import module_path, source_line

    parts = [f"node '{node.name}'"]
    path = module_path(node)
    if path:
        parts.append(f"({path})")
    text = " ".join(parts)
    src = source_line(node)
    if src:
        text += f"\n  source: {src}"
    return text
