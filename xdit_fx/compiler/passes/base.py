"""Pass infrastructure: a pass is a plain function `(gm, ctx) -> PassResult`; one runner calls them.

The runner, not the pass, handles ordering checks, provenance (``xfx.created_by`` on new nodes),
lint + recompile, timing, error wrapping and snapshots for dumps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch.fx as fx

from xdit_fx.errors import DUMP_HINT_MARK, PassError, XditFxError, dump_hint
from xdit_fx.compiler.fx_utils import META_CREATED_BY, count_ops, describe_node
from xdit_fx.compiler.mesh import Mesh

log = logging.getLogger(__name__)


def node_in_traceback(tb):
    """The fx node a pass was working on when it raised: the innermost frame with an `fx.Node` local named
    `node` (the convention of every pass loop), else any fx.Node local of that frame."""
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


@dataclass(frozen=True)
class PassInfo:
    name: str
    reads: frozenset[str] = frozenset()
    writes: frozenset[str] = frozenset()
    mutates_graph: bool = True
    doc: str = ""


@dataclass(frozen=True)
class PassContext:
    plan: Any
    mesh: Mesh
    #: PipeFusion's one-patch warm-up graph: the patched graph's patch count, so that both make the same
    #: token segments whole (patch_sequence)
    layout_patches: int = 0
    #: PipeFusion's one-patch warm-up graph: the patched graph's patch count, so that both make the same
    #: token segments whole (patch_sequence)
    layout_patches: int = 0


@dataclass(frozen=True)
class PassResult:
    gm: fx.GraphModule
    changed: bool
    summary: str = ""
    counts: Mapping[str, int] = field(default_factory=dict)


GraphPass = Callable[[fx.GraphModule, PassContext], PassResult]


def graph_pass(*, reads: Sequence[str] = (), writes: Sequence[str] = (), mutates_graph: bool = True):
    """Attach a PassInfo to a pass function; the function's name is the pass name."""

    def wrap(fn):
        fn.info = PassInfo(
            name=fn.__name__,
            reads=frozenset(reads),
            writes=frozenset(writes),
            mutates_graph=mutates_graph,
            doc=" ".join((fn.__doc__ or "").strip().split("\n\n")[0].split()),  # the first paragraph
        )
        return fn

    return wrap


def check_pipeline(passes: Sequence[GraphPass]) -> None:
    """Raise if a pass reads a fact that no earlier pass writes (an ordering mistake)."""
    known: set[str] = set()
    for p in passes:
        missing = p.info.reads - known
        if missing:
            raise XditFxError(
                f"pass '{p.info.name}' reads {sorted(missing)}, which no earlier pass writes; "
                f"order: {[q.info.name for q in passes]}"
            )
        known |= p.info.writes


@dataclass
class Snapshot:
    index: int
    name: str
    code: str
    changed: bool
    nodes_before: int
    nodes_after: int
    op_delta: dict[str, int]
    summary: str
    counts: dict[str, int]
    seconds: float
    graph_text: str = ""


@dataclass
class GraphHistory:
    """Per-pass snapshots of one graph: what `xdit-fx dump` writes and `ParallelModule.history` shows."""

    snapshots: list[Snapshot] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for s in self.snapshots:
            for k, v in s.counts.items():
                total[k] = total.get(k, 0) + v
        return total


def run_pipeline(
    gm: fx.GraphModule,
    passes: Sequence[GraphPass],
    ctx: PassContext,
    history: GraphHistory | None = None,
    render: Callable[[fx.GraphModule], str] | None = None,
) -> fx.GraphModule:
    """Run `passes` in order on `gm`; the only loop over passes in xdit_fx."""
    check_pipeline(passes)
    if history is not None:
        n = len(gm.graph.nodes)
        history.snapshots.append(
            Snapshot(0, "captured", gm.code, False, n, n, {}, f"{n} nodes", {}, 0.0, render(gm) if render else ""))
    done: list[str] = []
    for i, p in enumerate(passes, start=1):
        before_nodes = set(gm.graph.nodes)
        before_ops = count_ops(gm)
        before_names = [n.name for n in gm.graph.nodes]
        t0 = time.perf_counter()
        try:
            result = p(gm, ctx)
        except XditFxError as e:  # the pass's own message; add the pass name and how to dump
            raise with_pass_context(e, p.info.name, ctx.plan)
        except Exception as e:  # wrap with the pass name, what ran before it and the node it was on
            raise PassError(pass_failure_message(p.info.name, done, e, ctx.plan)) from e
        seconds = time.perf_counter() - t0
        gm = result.gm
        if not p.info.mutates_graph and [n.name for n in gm.graph.nodes] != before_names:
            raise PassError(f"analysis pass '{p.info.name}' changed the graph; analysis passes may only add meta")
        gm.graph.lint()
        gm.recompile()
        new_nodes = [n for n in gm.graph.nodes if n not in before_nodes]
        for n in new_nodes:
            n.meta.setdefault(META_CREATED_BY, p.info.name)
        after_ops = count_ops(gm)
        delta = {k: after_ops.get(k, 0) - before_ops.get(k, 0) for k in set(after_ops) | set(before_ops)}
        delta = {k: v for k, v in sorted(delta.items()) if v}
        log.info("[%s] %s (%+d nodes, %.3fs)", p.info.name, result.summary,
                 len(gm.graph.nodes) - len(before_nodes), seconds)
        if history is not None:
            history.snapshots.append(
                Snapshot(i, p.info.name, gm.code, result.changed, len(before_nodes), len(gm.graph.nodes), delta,
                         result.summary, dict(result.counts), seconds, render(gm) if render else "")
            )
        done.append(p.info.name)
    return gm
