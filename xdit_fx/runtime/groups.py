"""Process groups for a Plan's named mesh axes (outer -> inner: dp, cfg, pipefusion, ring, ulysses).

Besides one group per axis there are two composite groups: "sp" (ring x ulysses, the ranks that share one
token sequence) and "batch" (dp x cfg, the ranks that share the images of one transformer call; batch rank =
dp_rank * cfg + cfg_rank).

Ranks are laid out row-major over the axes, so the innermost axis (ulysses) spans consecutive ranks. The
sequence-parallel group "sp" = ring x ulysses; inside it, sp rank = ring_rank * ulysses + ulysses_rank,
which is the order in which token chunks are laid out.
"""

from __future__ import annotations

import datetime
import itertools
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from xdit_fx.errors import PlanError
from xdit_fx.plan import AXES, Plan

DEFAULT_TIMEOUT_S = float(os.environ.get("XDIT_FX_TIMEOUT_S", "300"))


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> None:
    """Join the process group torchrun (or `xdit-fx run`) set up, if not joined yet.

    gloo on CPU, nccl when CUDA is available. A short timeout makes a rank that waits on a dead peer fail
    instead of hanging."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise PlanError(
            "torch.distributed is not initialised and RANK/WORLD_SIZE are not set: launch with "
            "`xdit-fx run --nproc N script.py` or `torchrun --nproc_per_node N script.py`."
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S))


def env_world_size() -> int:
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class ProcessGroups:
    """This rank's groups, one per mesh axis plus "sp" and "batch", and its coordinates."""

    plan: Plan
    rank: int
    coords: dict[str, int]
    names: dict[str, str] = field(default_factory=dict)  # axis -> c10d group name

    def axes(self) -> dict[str, str]:
        """c10d group name -> axis (how byte counters name what they count)."""
        return {name: axis for axis, name in self.names.items()}


def build_groups(plan: Plan) -> ProcessGroups:
    """Create the process groups of every axis (collectively: all ranks must call it in the same order)."""
    world = dist.get_world_size()
    plan.check_world_size(world)
    rank = dist.get_rank()
    degrees = [plan.degree(a) for a in AXES]
    coords_of = list(itertools.product(*[range(d) for d in degrees]))  # index = rank
    me = dict(zip(AXES, coords_of[rank]))
    names: dict[str, str] = {}

    def members(varying: tuple[str, ...]) -> list[list[int]]:
        groups: dict[tuple, list[int]] = {}
        for r, c in enumerate(coords_of):
            key = tuple(v for a, v in zip(AXES, c) if a not in varying)
            groups.setdefault(key, []).append(r)
        return list(groups.values())

    # every axis gets its own group (even one spanning the world) so bytes are counted per axis
    axes = [(a, (a,)) for a in AXES if plan.degree(a) > 1]
    if plan.sequence_parallel_degree > 1:
        axes.append(("sp", ("ring", "ulysses")))
    if plan.batch_degree > 1:
        axes.append(("batch", ("dp", "cfg")))
    for axis, varying in axes:
        for ranks in members(varying):
            pg = dist.new_group(ranks)
            if rank in ranks:
                names[axis] = pg.group_name
    return ProcessGroups(plan=plan, rank=rank, coords=me, names=names)
