"""xdit_fx: parallel inference for Diffusion Transformers, as a torch.fx compiler.

    import xdit_fx
    pipe.transformer = xdit_fx.parallelize(pipe.transformer, xdit_fx.Plan(ulysses_degree=2, ring_degree=2))
    pipe = xdit_fx.load_pipeline("/models/FLUX.1-dev", dtype="bf16")   # on this rank's device
    pipe = xdit_fx.parallelize(pipe, "cfg=2,ulysses=2")  # a whole pipeline: CFG, data parallel, VAE
"""

from xdit_fx.api import auto_plan, parallelize
from xdit_fx.cache_config import FirstBlockCache, TeaCache
from xdit_fx.loading import load_pipeline, local_device
from xdit_fx.errors import MissingBackend, PassError, PlanError, UnsupportedGraph, XditFxError
from xdit_fx.pipeline import ParallelPipeline
from xdit_fx.ops.comm import counting
from xdit_fx.ops.kernels import attention_backend
from xdit_fx.plan import Plan
from xdit_fx.runtime.groups import init_distributed
from xdit_fx.version import __version__

__all__ = ["FirstBlockCache", "MissingBackend", "ParallelPipeline", "PassError", "Plan", "PlanError", "TeaCache", "UnsupportedGraph",
           "XditFxError", "__version__", "attention_backend", "auto_plan", "counting", "init_distributed", "load_pipeline",
           "local_device", "parallelize"]
