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
        pipe = xdit_fx.parallelize(pipe, "auto")             # the plan the cost model predicts fastest (auto_plan)
    """
    if plan is None:
        plan = Plan()
    elif isinstance(plan, str) and plan.strip().lower() == "auto":
        # one rank has one plan; more: the cost model's choice (the same on every rank: it reads only shapes)
        plan = Plan() if env_world_size() == 1 else auto_plan(model, env_world_size()).plan
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



def auto_plan(model: nn.Module | Any, world_size: int | None = None, hardware: Any = None, *, height: int = 1024,
              width: int = 1024, frames: int = 1, text_len: int = 512, batch: int = 1,
              inputs: dict[str, Any] | None = None, guidance: str | None = None, steps: int = 20,
              nodes: int = 1) -> Any:
    """The fastest plan that fits, as the cost model predicts it: a `Prediction` (`.plan`, `.per_step_s`,
    `.parts`, `.memory`, `.bytes`). The plan-level entry of what `Plan.auto` would be: `plan.py` sits below the
    compiler, so the search lives here and in `xdit_fx/compiler/plan_search.py`.

    Args:
        model: a DiT module (diffusers models are rebuilt on the meta device from their config) or a pipeline.
        world_size: ranks (default: WORLD_SIZE of the environment); 1 gives the trivial plan.
        hardware: a profile name (`cpu-gloo`, `h100-nvlink`, `h100-pcie`, `h200`, `l40`, `b200`, `a100-nvlink`),
            a JSON file from `xdit-fx calibrate-hardware`, or a HardwareProfile (default: cpu-gloo on CPU,
            h100-nvlink on CUDA).
        height, width, frames, text_len, batch: the request (pixels; images per call).
        inputs: example inputs for a module without a diffusers config.
        guidance: none | batched | two-call (default: read from the pipeline's call signature; none for a module).
        steps: denoising steps (PipeFusion's warm-up steps are averaged in).
        nodes: nodes the ranks are spread over (axes whose groups span nodes use the inter-node link).
    """
    import torch

    from xdit_fx.compiler.hardware import load_profile
    from xdit_fx.compiler.plan_search import choose_plan
    from xdit_fx.debug.model import InputSizes
    from xdit_fx.debug.planning import plan_inputs

    world_size = env_world_size() if world_size is None else world_size
    if hardware is None:
        hardware = "h100-nvlink" if torch.cuda.is_available() else "cpu-gloo"
    hw = load_profile(hardware).with_nodes(nodes, world_size)
    sizes = InputSizes(height=height, width=width, frames=frames, text_len=text_len, batch=batch)
    facts, work = plan_inputs(model, sizes, inputs, guidance, steps)
    return choose_plan(facts, world_size, hw, work)
