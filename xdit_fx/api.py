"""`parallelize(model, plan)`: the entry point."""

from __future__ import annotations

import torch
from torch import nn

from .errors import PlanError
from .plan import Plan
from .runtime.mesh import build_groups, env_world_size, init_distributed
from .runtime.module import ParallelModule


def parallelize(model: nn.Module, plan: Plan | str | None = None) -> ParallelModule:
    """Return a parallel version of a DiT (a diffusers transformer or any nn.Module); `model` itself is
    not modified.

    Call it on every rank (under `torchrun` or `xdit-fx run`), with the same plan. The plan is checked
    against the world size before any process group is created.

    Example::

        pipe.transformer = xdit_fx.parallelize(pipe.transformer, xdit_fx.Plan(ulysses_degree=2))
    """
    if plan is None:
        plan = Plan()
    elif isinstance(plan, str):
        plan = Plan.from_string(plan)
    if not isinstance(model, nn.Module):
        raise TypeError(f"parallelize() takes an nn.Module, got {type(model).__name__}")
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
    _raise_recompile_limit()
    return ParallelModule(model, plan, groups)


def _raise_recompile_limit(limit: int = 64) -> None:
    """Several parallelized instances of one class share a forward code object in dynamo's cache."""
    cfg = torch._dynamo.config
    if getattr(cfg, "recompile_limit", limit) < limit:
        cfg.recompile_limit = limit
    if getattr(cfg, "accumulated_recompile_limit", 256) < 4 * limit:
        cfg.accumulated_recompile_limit = 4 * limit
