"""Everything that touches live torch.distributed state: groups, collectives, executor, launcher, VAE."""

from .collectives import COMM
from .mesh import ProcessGroups, build_groups, init_distributed
from .vae import ParallelVAE, UnsupportedVAEOp, parallel_decode

__all__ = ["COMM", "ParallelVAE", "ProcessGroups", "UnsupportedVAEOp", "build_groups", "init_distributed",
           "parallel_decode"]
