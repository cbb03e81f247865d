"""Everything that touches live torch.distributed state: groups, collectives, executor, launcher."""

from .collectives import COMM
from .mesh import ProcessGroups, build_groups, init_distributed

__all__ = ["COMM", "ProcessGroups", "build_groups", "init_distributed"]
