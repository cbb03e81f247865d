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
    """An optional package (transformers, accelerate, ...) is needed but not installed."""


DUMP_HINT_MARK = "xdit-fx dump"


def dump_hint(plan) -> str:
    """How to see the graph a pass failed on: the dump command for this plan, or the in-run switch."""
    plan_str = plan.to_string() if hasattr(plan, "to_string") else "PLAN"
    return (f"  to see every pass's graph: xdit-fx dump MODEL --plan {plan_str} --out DIR "
            f"(or XDIT_FX_DUMP_DIR=DIR in this run; the passes before the failing one are dumped)")
