"""`parallelize(model, plan)`: the entry point."""

from __future__ import annotations

from typing import Any

from torch import nn

from xdit_fx.errors import PlanError
from xdit_fx.pipeline import ParallelPipeline, is_pipeline
from xdit_fx.plan import Plan
from xdit_fx.runtime.groups import build_groups, env_world_size, init_distributed
from xdit_fx.runtime.module import ParallelModule


def parallelize(model: nn.Module | Any, plan: Plan | str | None = None) -> ParallelModule | ParallelPipeline:
    """Return a parallel version of a DiT (a diffusers transformer or any nn.Module), or of a whole diffusers
    pipeline. A module itself is not modified (except under PipeFusion, where each rank frees the parameters
    only other stages read); a pipeline's denoisers, ``scheduler.step`` and ``vae.decode`` are replaced in
    place (``ParallelPipeline.unwrap()`` puts them back).

    Call it on every rank (under `torchrun` or `xdit-fx run`), with the same plan. The plan is checked
    against the world size before any process group is created.

    Example::

        pipe.transformer = xdit_fx.parallelize(pipe.transformer, xdit_fx.Plan(ulysses_degree=2))
        pipe = xdit_fx.parallelize(pipe, "cfg=2,ulysses=2")  # 4 ranks; images on rank 0
    """
    if plan is None:
        plan = Plan()
    elif isinstance(plan, str):
        plan = Plan.from_string(plan)
    pipeline = is_pipeline(model)
    if not pipeline and not isinstance(model, nn.Module):
        raise TypeError(f"parallelize() takes an nn.Module or a diffusers pipeline, got {type(model).__name__}")
    if isinstance(model, ParallelPipeline):
        raise PlanError("this pipeline has already been parallelized; call .unwrap() first to change the plan")
    if isinstance(model, ParallelModule):
        raise PlanError("this model has already been parallelized; pass the original module instead")
    if type(model).__name__ == "OptimizedModule":
        raise PlanError("parallelize() must be called before torch.compile; got an OptimizedModule. "
                        "Use Plan(compile=True) to compile the parallel graph.")
    plan.check_world_size(env_world_size())
    groups = None
    if plan.world_size > 1:
        init_distributed()
        groups = build_groups(plan)
    if pipeline:
        return ParallelPipeline(model, plan, groups)
    return ParallelModule(model, plan, groups)

