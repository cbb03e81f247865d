"""Everything that holds live torch.distributed state: process groups, the executor (ParallelModule), batch
splitting, the cache and PipeFusion runtimes, the parallel VAE, the launcher."""

from xdit_fx.runtime.groups import ProcessGroups, build_groups, init_distributed
from xdit_fx.runtime.vae import ParallelVAE, UnsupportedVAEOp, parallel_decode

__all__ = ["ParallelVAE", "ProcessGroups", "UnsupportedVAEOp", "build_groups", "init_distributed",
           "parallel_decode"]
