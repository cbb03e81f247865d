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


def describe_node(node) -> str:
    """One line that locates an fx node: its name, module path and the user source line."""
    from xdit_fx.compiler.fx_utils import module_path, source_line

    parts = [f"node '{node.name}'"]
    path = module_path(node)
    if path:
        parts.append(f"({path})")
    text = " ".join(parts)
    src = source_line(node)
    if src:
        text += f"\n  source: {src}"
    return text


DUMP_HINT_MARK = "xdit-fx dump"


def dump_hint(plan) -> str:
    """How to see the graph a pass failed on: the dump command for this plan, or the in-run switch."""
    plan_str = plan.to_string() if hasattr(plan, "to_string") else "PLAN"
    return (f"  to see every pass's graph: xdit-fx dump MODEL --plan {plan_str} --out DIR "
            f"(or XDIT_FX_DUMP_DIR=DIR in this run; the passes before the failing one are dumped)")


def node_in_traceback(tb):
    """The fx node a pass was working on when it raised: the innermost frame with an `fx.Node` local named
    `node` (the convention of every pass loop), else any fx.Node local of that frame."""
    import torch.fx as fx

    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        local = frame.f_locals
        if isinstance(local.get("node"), fx.Node):
            return local["node"]
        found = [v for v in local.values() if isinstance(v, fx.Node)]
        if found:
            return found[0]
    return None


def pass_failure_message(pass_name: str, done: list, exc: BaseException, plan) -> str:
    """PassError text for an unexpected exception in a pass: the pass, what ran before, the node it was on
    (module path, source line), the exception, and how to dump."""
    node = node_in_traceback(exc.__traceback__)
    where = f"\n  at {describe_node(node)}" if node is not None else ""
    return (f"pass '{pass_name}' failed (after {done or 'no passes'}): {type(exc).__name__}: {exc}{where}\n"
            f"{dump_hint(plan)}")


def with_pass_context(exc: XditFxError, pass_name: str, plan) -> XditFxError:
    """Add the pass name and the dump hint to an XditFxError a pass raised (once)."""
    msg = str(exc)
    if DUMP_HINT_MARK in msg:
        return exc
    if not msg.startswith(pass_name):
        msg = f"{pass_name}: {msg}"
    exc.args = (f"{msg}\n{dump_hint(plan)}",) + tuple(exc.args[1:])
    return exc
