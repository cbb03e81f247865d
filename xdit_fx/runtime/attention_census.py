"""The first call's check that graph breaks left no attention unparallelized, never silently.

Dynamo splits a forward at what it cannot trace (a RoPE helper looping over ``grid_sizes.tolist()``); each piece
is parallelized on its own, and an attention that lands in a piece without its token sequence, or in code dynamo
runs eagerly (a skipped frame), runs whole on every rank. So on the first call of a sequence-parallel plan:

* the attention calls the model really makes are counted by running it once eagerly under a dispatch count
  (SDPA kernels and the flash-attn / xformers ops; the random state is restored afterwards);
* the parallel call counts, per captured graph, how often it ran and how many of its attention sites were made
  sequence parallel;
* dynamo's graph-break reasons during the call are collected.

Fewer sharded attention runs than attention calls is a warning naming the graphs, the break reasons and the
sites left whole. A forward split into several graphs is reported too (each boundary gathers the sequence
whole and slices it again), also when every attention is sharded. The report stays on the module
(`ParallelModule.census`)."""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from xdit_fx.compiler.fx_utils import describe_node, META_ATTENTION, META_LAYOUT, META_SP_ATTENTION

log = logging.getLogger(__name__)

_LIBRARY_NAMESPACES = ("flash_attn", "flash_attn_3", "xformers", "xformers_flash", "xformers_flash3")


def _is_attention_op(func) -> bool:
    name = getattr(func, "__name__", "")
    if name.startswith(("_scaled_dot_product", "scaled_dot_product")) or name == "flex_attention":
        return True
    ns = getattr(func, "namespace", None) or str(func).split("::")[0].split(".")[0]
    return ns in _LIBRARY_NAMESPACES and "backward" not in name and "bwd" not in name


class _CountAttention(TorchDispatchMode):
    supports_higher_order_operators = True  # flex_attention is a higher-order operator: counted, then run

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # eager flex_attention runs its operator through torch.compile, which refuses a mode it must respect;
        # the compiled code still calls the operator, which this mode then counts
        return True

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        outer = self.depth == 0 and _is_attention_op(func)
        if outer:  # an SDPA that decomposes into other SDPA kernels counts once
            self.calls += 1
        self.depth += outer
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.depth -= outer


def count_eager_attention(model: torch.nn.Module, args: tuple, kwargs: dict) -> int:
    """Attention calls one eager forward of `model` makes (no grad, random state restored)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    counter = _CountAttention()
    with torch.random.fork_rng(devices=devices), torch.no_grad(), counter:
        model(*args, **kwargs)
    return counter.calls


def break_counts() -> Counter:
    """dynamo's graph-break reasons so far in this process, with how often each was met."""
    from torch._dynamo.utils import counters
    return Counter(counters.get("graph_break", {}))


def breaks_since(before: Counter) -> list[str]:
    """The break reasons met since `before` (a `break_counts()`), one line each."""
    after = break_counts()
    return [_short(r) for r in after if after[r] > before.get(r, 0)]


def _short(reason: str) -> str:
    """Dynamo's break reason in one line: its title and the op or call it names."""
    lines = [x.strip() for x in str(reason).splitlines() if x.strip()]
    ctx = [x.split(":", 1)[1].strip() for x in lines if x.startswith("Developer debug context:")]
    return lines[0] + (f" ({ctx[0]})" if ctx and ctx[0] else "") if lines else str(reason)


@dataclass
class Census:
    """What the first call found: eager attention calls, sharded attention runs, graphs, break reasons."""

    eager_calls: int = -1
    sharded_runs: int = 0
    graph_runs: Counter = field(default_factory=Counter)
    break_reasons: list[str] = field(default_factory=list)
    warning: str | None = None
    active: bool = False
    _before: Counter = field(default_factory=Counter)

    def wrap(self, index: int, forward: Callable) -> Callable:
        def run(*args: Any) -> Any:
            if self.active:
                self.graph_runs[index] += 1
            return forward(*args)
        return run

    @contextlib.contextmanager
    def first_call(self, model: torch.nn.Module, args: tuple, kwargs: dict):
        self.eager_calls = count_eager_attention(model, args, kwargs)
        self._before = break_counts()
        self.active = True
        try:
            yield
        finally:
            self.active = False
            self.break_reasons = breaks_since(self._before)

    def finish(self, graphs: list) -> str | None:
        """Compare, and warn when something ran whole or the forward was split (returns the warning)."""
        lines, whole = [], []
        for i, gm in enumerate(graphs):
            sites = [n for n in gm.graph.nodes if META_ATTENTION in n.meta]
            # sequence parallel, or local on tokens folded into the batch (its output sharded)
            sharded = [n for n in sites if META_SP_ATTENTION in n.meta or n.meta.get(META_LAYOUT) is not None]
            runs = self.graph_runs.get(i, 0)
            self.sharded_runs += runs * len(sharded)
            whole += [f"graph{i}: {n.meta[META_ATTENTION].describe()} at {describe_node(n)}".replace("\n  ", ", ")
                      for n in sites if n not in sharded]
            lines.append(f"graph{i}: ran {runs}x, {len(sites)} attention sites, {len(sharded)} sequence parallel")
        missing = self.eager_calls - self.sharded_runs
        if missing <= 0 and len(graphs) <= 1:
            return None
        reasons = "; ".join(self.break_reasons) or "none reported by dynamo (a frame it skipped or runs eagerly)"
        if missing > 0:
            head = (f"xdit_fx: {missing} of the {self.eager_calls} attention calls this model makes ran whole on "
                    f"every rank (not sequence parallel): only {self.sharded_runs} ran sharded in the "
                    f"{len(graphs)} captured graphs.")
        else:
            head = (f"xdit_fx: the forward was split into {len(graphs)} graphs by graph breaks; all "
                    f"{self.eager_calls} attention calls ran sequence parallel, but every graph boundary gathers "
                    "the sequence whole and slices it again.")
        text = "\n  ".join([head, *lines, f"graph breaks: {reasons}",
                            "sites left whole: " + ("; ".join(whole) or "none in the captured graphs"
                                                    + (" (the missing calls ran outside them, eagerly)"
                                                       if missing > 0 else "")),
                            "fix: move the code dynamo cannot trace (.tolist(), .item(), Python loops over tensor "
                            "values) out of the forward (precompute it, pass it in as a tensor), or see the "
                            "reasons with TORCH_LOGS=graph_breaks"])
        self.warning = text
        log.warning(text)
        return text
