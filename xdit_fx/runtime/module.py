"""ParallelModule: the drop-in replacement `parallelize` returns.

The wrapped model's forward is captured by dynamo (`torch.compile` with an xdit_fx backend) on the first
call per input signature; dynamo's guards cache the result. Each captured graph is rewritten by the
passes the plan needs, then run as is or compiled by Inductor (`Plan(compile=True)`). If dynamo splits
the forward into several graphs, each is parallelized on its own: whole tensors in, whole tensors out.
"""

from __future__ import annotations

import contextlib
from collections import Counter
import logging
import os
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from xdit_fx.compiler.fx_utils import copy_graph
from xdit_fx.compiler.mesh import Mesh
from xdit_fx.compiler.passes import GraphHistory
from xdit_fx.compiler.rewrite import rewrite
from xdit_fx.debug.dump import dump_dir_for_run
from xdit_fx.errors import UnsupportedGraph, XditFxError
from xdit_fx.plan import Plan
from xdit_fx.runtime.batch import BatchSplitter
from xdit_fx.compiler.passes.cache_regions import REFUSAL
from xdit_fx.ops.regions import CachedRegion
from xdit_fx.runtime.cache import CacheRuntime
from xdit_fx.ops.comm import counting
from xdit_fx.runtime.attention_census import Census, break_counts, breaks_since
from xdit_fx.runtime.graph_errors import with_node_names
from xdit_fx.runtime.groups import ProcessGroups
from xdit_fx.runtime.inductor import InductorPiece

log = logging.getLogger(__name__)


class ParallelModule(nn.Module):
    """Same call signature and outputs as the wrapped model; runs over the plan's process groups.

    Attributes other than these fall through to the wrapped model (``config``, ``dtype``, ...), so
    diffusers pipelines can use it in place of their transformer.

    Attributes:
        plan: the Plan.
        histories: one GraphHistory per captured graph (what each pass did).
        graphs: the rewritten GraphModules, in capture order.
        last_comm: bytes received per mesh axis and op during the last forward.
        cache: the CacheRuntime when the plan has a cache (`cache_stats`, `reset_cache()`), else None.
    """

    def __init__(self, model: nn.Module, plan: Plan, groups: ProcessGroups | None) -> None:
        super().__init__()
        self.model = model
        self.plan = plan
        self.groups = groups
        self.histories: list[GraphHistory] = []
        self.graphs: list[fx.GraphModule] = []
        self.last_comm: dict[str, dict[str, int]] = {}
        #: the mesh the passes see: the plan's degrees and the names of this rank's process groups
        self.mesh = Mesh.of(plan, groups.names if groups is not None else None)
        #: where each captured graph's passes are dumped (Plan(debug_dump_dir=...), else $XDIT_FX_DUMP_DIR)
        self.dump_dir = dump_dir_for_run(plan)
        # a plan that only splits the batch (cfg/dp, no compile) has nothing to rewrite: run eagerly (and dump
        # nothing: there is no graph)
        batch_only = plan.batch_degree > 1 and plan.sequence_parallel_degree == 1 and not plan.compile \
            and plan.cache is None and plan.pipefusion_degree == 1
        self._compiled = model if batch_only else \
            torch.compile(model, backend=self._counted_backend, dynamic=False, fullgraph=False)
        self.batch = BatchSplitter(plan, groups) if plan.batch_degree > 1 else None
        self.cache = CacheRuntime(plan.cache, self._sp_groups) if plan.cache is not None else None
        self.pipefusion = None
        if plan.pipefusion_degree > 1:
            from xdit_fx.runtime.pipefusion import PipeFusionRuntime
            self.pipefusion = PipeFusionRuntime(plan, groups)
        self._to_free: list[torch.Tensor] = []
        #: the first call's count of attention calls vs sequence-parallel runs (graph breaks; attention_census.py)
        self.census = Census() if plan.sequence_parallel_degree > 1 and plan.pipefusion_degree == 1 else None
        self._census_pending = self.census is not None
        #: PipeFusion's first call: unrewritten copies of the graphs captured so far and the stages cut in them,
        #: to refuse a split forward with a checked fix instead of running it whole on every rank
        self._pf_pending = plan.pipefusion_degree > 1
        self._pf_graphs: list[fx.GraphModule] = []
        self._pf_regions = 0
        self._pf_breaks: Counter | None = None
        self._pf_refusal: str | None = None  # once refused, every later call is refused the same way

    def _sp_groups(self) -> list[str]:
        return [self.groups.names["sp"]] if self.groups is not None and self.plan.sequence_parallel_degree > 1 else []

    @property
    def cache_stats(self):
        """CacheStats of the current generation (since the last reset_cache()), or None without a cache."""
        return self.cache.stats if self.cache is not None else None

    def reset_cache(self) -> None:
        """Start a new generation: forget cached residuals and statistics (pipelines do it on every call)."""
        if self.cache is not None:
            self.cache.reset()
        if self.pipefusion is not None:
            self.pipefusion.reset()

    def _counted_backend(self, gm: fx.GraphModule, example_inputs: list[Any]):
        fn = self._backend(gm, example_inputs)
        return self.census.wrap(len(self.graphs) - 1, fn) if self.census is not None else fn

    def _backend(self, gm: fx.GraphModule, example_inputs: list[Any]):
        plan, mesh = self.plan, self.mesh
        history = GraphHistory()
        warm_gm = copy_graph(gm) if plan.pipefusion_degree > 1 else None
        dump_dir = self.dump_dir
        render = None
        if dump_dir:
            from xdit_fx.debug.dump import render_graph
            render = render_graph
        if self._pf_pending:
            self._pf_graphs.append(copy_graph(gm))
        try:
            gm = rewrite(gm, plan, mesh, history=history, render=render)
        except UnsupportedGraph as e:
            if self._pf_pending and (len(self._pf_graphs) > 1 or self._pf_break_reasons()):
                self._pf_refusal = self._pf_explain(str(e))
                raise UnsupportedGraph(self._pf_refusal) from e
            raise
        finally:  # also when a pass fails: the passes before it are dumped
            if dump_dir:
                from xdit_fx.debug.dump import run_formats, write_dump
                rank = self.groups.rank if self.groups is not None else 0
                write_dump(history, plan, os.path.join(dump_dir, f"rank{rank}", f"graph{len(self.histories)}"),
                           formats=run_formats())
        self.histories.append(history)
        self.graphs.append(gm)
        if warm_gm is not None:
            self._bind_pipefusion(gm, warm_gm, example_inputs)
        regions = [m for m in gm.modules() if isinstance(m, CachedRegion)]
        if self.cache is not None and gm.meta.get(REFUSAL):
            self.cache.refusals.append(gm.meta[REFUSAL])
        for region in regions:  # Inductor on the region's body alone; the few nodes around it run as they are
            region.bind(self.cache, InductorPiece(region.body, "cache region") if plan.compile else None)
        if plan.compile and warm_gm is not None:  # Inductor around the PipeFusion region (which sends/receives)
            from xdit_fx.runtime.inductor import compile_between
            from xdit_fx.ops.regions import PipeFusionRegion
            return compile_between(gm, lambda n: n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                                        PipeFusionRegion), "graph").forward
        if plan.compile and not regions:
            from torch._inductor.compile_fx import compile_fx
            return compile_fx(gm, example_inputs)
        return with_node_names(gm, plan, gm.forward)

    def _bind_pipefusion(self, gm: fx.GraphModule, warm_gm: fx.GraphModule, example_inputs: list[Any]) -> None:
        """Build the one-patch (warm-up) version of the graph, bind both regions to the runtime, and free
        the parameters that only other stages read."""
        import dataclasses

        from xdit_fx.ops.regions import PipeFusionRegion
        warm_plan = dataclasses.replace(self.plan, pipefusion_patches=1)
        warm_gm = rewrite(warm_gm, warm_plan, self.mesh, layout_patches=self.plan.patches)
        regions = [(n, gm.get_submodule(n.target)) for n in gm.graph.nodes
                   if n.op == "call_module" and isinstance(gm.get_submodule(n.target), PipeFusionRegion)]
        warm = [warm_gm.get_submodule(n.target) for n in warm_gm.graph.nodes
                if n.op == "call_module" and isinstance(warm_gm.get_submodule(n.target), PipeFusionRegion)]
        if len(regions) != len(warm) or any(r.spec.live_ins != w.spec.live_ins for (_, r), w in zip(regions, warm)):
            raise XditFxError("pipefusion: the one-patch warm-up graph differs from the patched one in its inputs; "
                              "please report it with a dump (xdit-fx dump MODEL --plan ... --out DIR)")
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        keep = {n.name for n in placeholders if any(u.op != "call_module" or u.target not in
                                                    {c.target for c, _ in regions} for u in n.users)}
        stage = self.pipefusion.stage
        for (_, region), w in zip(regions, warm):
            region.bind(self.pipefusion, w)
            w.bind(self.pipefusion, w)
            if self.plan.compile:  # Inductor between the per-patch ops (they read the patch, write the buffers)
                from xdit_fx.runtime.inductor import compile_between
                from xdit_fx.ops.pipefusion import pf_attention, pf_shard_tokens
                for r, what in ((region, "patched"), (w, "warm-up")):
                    program = r.spec.programs[stage]
                    program.compiled = compile_between(
                        program.body, lambda n: n.op == "call_function" and n.target in (pf_attention, pf_shard_tokens),
                        f"stage {stage} {what}")
            keep |= set(region.spec.programs[stage].params) | set(w.spec.programs[stage].params)
        self._pf_regions += len(regions)
        if regions:  # freed after this call (dynamo checks its guards on the parameters right after compiling)
            self._to_free += [t for n, t in zip(placeholders, example_inputs) if n.name not in keep
                              and isinstance(t, nn.Parameter)]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._pf_refusal is not None:
            raise UnsupportedGraph(self._pf_refusal)
        if self.pipefusion is not None:
            self.pipefusion.next_call()
        if self.cache is not None:
            self.cache.next_call()
        census = contextlib.nullcontext()
        if self._census_pending:
            census = self.census.first_call(self.model, args, kwargs)
        if self._pf_pending:
            self._pf_breaks = break_counts()
        with census, counting(axes=self.groups.axes() if self.groups is not None else None) as counter:
            out = self.batch(self._run, args, kwargs) if self.batch is not None else self._run(*args, **kwargs)
        if self._census_pending:
            self._census_pending = False
            self.census.finish(self.graphs)
        if self._pf_pending:
            self._pf_pending = False
            if not self._pf_regions:
                self._pf_refusal = self._pf_explain(
                    f"pipefusion: no captured graph holds a stack of transformer blocks on the token sequence, so "
                    f"no pipeline stage was cut and every rank ran the whole model (this call's output is the "
                    f"single-process one; {self.plan.to_string()} would parallelize nothing)")
                raise UnsupportedGraph(self._pf_refusal)
            self._pf_graphs = []
        self.last_comm = counter.snapshot()
        if self._to_free:  # parameters only other pipeline stages read (the next call recaptures once)
            from xdit_fx.runtime.pipefusion import free_parameters
            free_parameters(self._to_free)
            self._to_free = []
        return out

    def _pf_break_reasons(self) -> list[str]:
        """dynamo's graph-break reasons since this call began."""
        return breaks_since(self._pf_breaks if self._pf_breaks is not None else break_counts())

    def _pf_explain(self, head: str) -> str:
        from xdit_fx.runtime.pipefusion_check import explain
        return explain(head, self._pf_graphs, self.plan, self._pf_break_reasons())

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        with _recompile_limits():
            return self._run_compiled(*args, **kwargs)

    def _run_compiled(self, *args: Any, **kwargs: Any) -> Any:
        try:
            if self.cache is None:
                return self._compiled(*args, **kwargs)
            self.cache.begin_run(self.batch.split_group if self.batch is not None else None)
            out = self._compiled(*args, **kwargs)
            self.cache.end_run()
            return out
        except torch._dynamo.exc.BackendCompilerFailed as e:  # show our error, not dynamo's wrapper
            inner = getattr(e, "inner_exception", None)
            if isinstance(inner, XditFxError):
                raise inner.with_traceback(None) from None
            raise

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)


def _recompile_limits(limit: int = 64):
    """Dynamo's recompile limits, raised for the duration of one call (the process-wide settings are left as
    they are): several parallelized instances of one class share a forward code object in dynamo's cache,
    and past the limit dynamo would silently run the forward eagerly, unparallelized."""
    cfg = torch._dynamo.config
    return cfg.patch(recompile_limit=max(cfg.recompile_limit, limit),
                     accumulated_recompile_limit=max(cfg.accumulated_recompile_limit, 4 * limit))

