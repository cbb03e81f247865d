"""Everything that touches live torch.distributed state: groups, collectives, executor, launcher, VAE."""

from xdit_fx.ops.collectives import COMM
from xdit_fx.runtime.groups import ProcessGroups, build_groups, init_distributed
from xdit_fx.runtime.vae import ParallelVAE, UnsupportedVAEOp, parallel_decode

__all__ = ["COMM", "ParallelVAE", "ProcessGroups", "UnsupportedVAEOp", "build_groups", "init_distributed",
           "parallel_decode"]
