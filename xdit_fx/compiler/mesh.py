"""The mesh as the compiler sees it: one frozen description derived from a Plan.

It carries every axis degree, PipeFusion's patch count and, per axis, the name of the c10d process group the
rewritten graph's collectives run over (the executor passes the names of the groups it built; without
process groups, in a dump or a unit test, each axis's group is named after the axis). Passes read degrees
from it and write group names into the graph; they never see a live process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

@dataclass(frozen=True)
class Mesh:
    dp: int = 1
    cfg: int = 1
    pipefusion: int = 1
    ring: int = 1
    ulysses: int = 1
    patches: int = 1
    #: (axis, c10d group name) pairs; axes: the five above plus "sp" (ring x ulysses) and "batch" (dp x cfg)
    group_names: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, plan: Any, group_names: Mapping[str, str] | None = None) -> "Mesh":
        """The mesh of `plan`, with the group names of the executor's process groups (None: symbolic)."""
        return cls(dp=plan.dp_degree, cfg=plan.cfg_degree, pipefusion=plan.pipefusion_degree,
                   ring=plan.ring_degree, ulysses=plan.ulysses_degree,
                   patches=plan.patches if plan.pipefusion_degree > 1 else 1,
                   group_names=tuple(sorted((group_names or {}).items())))

    @property
    def sp(self) -> int:
        """Sequence-parallel degree (ring x ulysses)."""
        return self.ring * self.ulysses

    def group(self, axis: str) -> str:
        """The c10d group name of `axis` (the axis name itself when no process group exists)."""
        return dict(self.group_names).get(axis, axis)
