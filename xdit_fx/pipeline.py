"""`parallelize(pipe, plan)` for a whole diffusers pipeline: the stock denoising loop, unchanged, on every rank.

Every rank runs the pipeline's own ``__call__`` with the same arguments. What is parallel:

* each denoiser component (``transformer``, ``transformer_2``, ``unet``, ... — the diffusers naming
  convention for the networks called inside the loop) becomes a `ParallelModule`: sequence parallel inside
  the call (ring x ulysses), and its batch shared by the dp x cfg ranks (runtime/batch.py);
* ``scheduler.step`` is hooked to mark denoising steps, which is how two-call CFG pipelines get paired;
* ``vae.decode`` splits the latent by rows over all ranks (runtime/vae.py), if ``plan.parallel_vae``;
* progress bars, loading messages and xdit_fx's warnings show on rank 0 only.

Every rank returns the pipeline's own output object, and the images in it are the same on every rank: the
cfg/dp ranks exchange their shares of each transformer call, the sequence-parallel exits are gathered, and
the parallel VAE gathers the decoded rows. Save them on one rank (``if pipe.rank == 0``).

Everything else (text encoders, the scheduler, latents preparation) runs replicated: it is cheap next to the
denoiser and keeping it replicated is what lets any pipeline work without a copied loop. The random latents
are drawn by the same generator on every rank, so they agree.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from xdit_fx.errors import PlanError
from xdit_fx.ops.comm import counting
from xdit_fx.plan import Plan
from xdit_fx.runtime.batch import PairState
from xdit_fx.runtime.groups import ProcessGroups
from xdit_fx.runtime.module import ParallelModule

#: Pipeline components called inside the denoising loop, by diffusers' naming convention.
DENOISER_PREFIXES = ("transformer", "unet", "prior")


def is_pipeline(obj: Any) -> bool:
    """A diffusers DiffusionPipeline, or anything shaped like one (components + scheduler + __call__)."""
    return isinstance(getattr(obj, "components", None), dict) and hasattr(obj, "scheduler") and callable(obj)


def denoiser_names(pipe: Any) -> list[str]:
    return [name for name, comp in pipe.components.items()
            if isinstance(comp, nn.Module) and name.startswith(DENOISER_PREFIXES)]


class ParallelPipeline:
    """A pipeline whose denoisers, scheduler steps and VAE decode run over the plan's ranks.

    Call it like the pipeline. Attributes fall through to the wrapped pipeline. `unwrap()` restores the
    original components.

    Attributes:
        pipe: the wrapped pipeline (its denoisers replaced by ParallelModules).
        plan: the Plan.
        rank: this process's global rank.
        denoisers: name -> ParallelModule.
        pair_state: what the scheduler hook has learnt about the current generation.
    """

    def __init__(self, pipe: Any, plan: Plan, groups: ProcessGroups | None) -> None:
        names = denoiser_names(pipe)
        if not names:
            raise PlanError(
                f"{type(pipe).__name__} has no denoiser component (an nn.Module named "
                f"{'/'.join(p + '*' for p in DENOISER_PREFIXES)}); components are {sorted(pipe.components)}. "
                "Parallelize the denoising model itself with parallelize(model, plan).")
        self.pipe = pipe
        self.plan = plan
        self.groups = groups
        self.rank = groups.rank if groups is not None else 0
        self.pair_state = PairState()
        #: bytes received per mesh axis and op during the last call (denoisers and VAE)
        self.last_comm: dict[str, dict[str, int]] = {}
        self._originals: dict[str, Any] = {}
        self.denoisers: dict[str, ParallelModule] = {}
        for name in names:
            original = getattr(pipe, name)
            pm = ParallelModule(original, plan, groups)
            if pm.batch is not None:
                pm.batch.state = self.pair_state
            self._originals[name] = original
            self.denoisers[name] = pm
            setattr(pipe, name, pm)
        self._hook_scheduler()
        self._vae_hooked = False
        if plan.parallel_vae and plan.world_size > 1 and getattr(pipe, "vae", None) is not None:
            from xdit_fx.runtime.vae import ParallelVAE
            self._vae_hooked = True
            pipe.vae.decode = ParallelVAE(pipe.vae, group=None).decode
        if self.rank != 0:
            from xdit_fx.loading import quiet_other_ranks

            quiet_other_ranks(self.rank)
            if hasattr(pipe, "set_progress_bar_config"):
                pipe.set_progress_bar_config(disable=True)

    def _hook_scheduler(self) -> None:
        scheduler = self.pipe.scheduler
        step = scheduler.step
        plan, state = self.plan, self.pair_state

        caches = [pm.cache for pm in self.denoisers.values() if pm.cache is not None]
        caches += [pm.pipefusion for pm in self.denoisers.values() if pm.pipefusion is not None]
        for cache in caches:
            cache.step_hooked = True

        @functools.wraps(step)
        def hooked_step(model_output, *args, **kwargs):
            state.end_step(model_output, plan.cfg_degree, plan.batch_degree)
            for cache in caches:
                cache.end_step()
            return step(model_output, *args, **kwargs)

        scheduler.step = hooked_step

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.pair_state.reset()
        for pm in self.denoisers.values():
            pm.reset_cache()
        with counting(axes=self._axes()) as counter:
            out = self.pipe(*args, **kwargs)
        self.last_comm = counter.snapshot()
        return out

    def _axes(self) -> dict[str, str]:
        axes = self.groups.axes() if self.groups is not None else {}
        if self._vae_hooked:  # the parallel VAE decodes over the world group
            import torch.distributed as dist

            axes.setdefault(dist.group.WORLD.group_name, "vae")
        return axes

    @property
    def cache_stats(self):
        """The last generation's CacheStats: of the denoiser, or a dict name -> stats when there are several
        (None without a cache)."""
        stats = {name: pm.cache_stats for name, pm in self.denoisers.items() if pm.cache is not None}
        if not stats:
            return None
        return next(iter(stats.values())) if len(stats) == 1 else stats

    def unwrap(self) -> Any:
        """Put the original components back and return the plain pipeline."""
        for name, original in self._originals.items():
            setattr(self.pipe, name, original)
        del self.pipe.scheduler.step  # the hook is an instance attribute over the class's method
        if self._vae_hooked:
            del self.pipe.vae.decode
        if self.rank != 0 and hasattr(self.pipe, "set_progress_bar_config"):
            self.pipe.set_progress_bar_config(disable=False)
        return self.pipe

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["pipe"], name)

