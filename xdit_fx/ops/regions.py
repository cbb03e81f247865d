"""The region shells the compiler cuts out of a graph: a submodule that holds the region's own GraphModule and,
once the executor binds it, hands each call to the runtime that owns the region's state (a cache's residuals,
PipeFusion's K/V buffers). Built unbound by the passes, so a dump or a test can hold one without processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from xdit_fx.errors import XditFxError


@dataclass(frozen=True)
class RegionSpec:
    """What insert_cache found: how to call and skip one region."""

    kind: str                              # "fbc" | "teacache"
    n_probe: int                           # leading call arguments that are the probe (1 or 2)
    residual_of: tuple[int | None, ...]    # per output: index of the live-in it is a residual over, or None
    stream_out: int                        # index of the main token-stream output (calibration measures it)
    blocks_total: int
    blocks_skipped: int
    description: str
    cost: int = 0                          # parameter elements the region reads: which region is the main stack



class CachedRegion(nn.Module):
    """The blocks insert_cache moved out of the graph: `body` is their GraphModule, run unless the bound
    CacheRuntime decides to reuse the cached residuals."""

    def __init__(self, body: fx.GraphModule, spec: RegionSpec) -> None:
        super().__init__()
        self.body = body
        self.spec = spec
        self.runtime: Any = None    # the CacheRuntime that decides, bound by the executor
        self.compiled: Any = None   # the body compiled on its own (Inductor), when the plan compiles

    def bind(self, runtime: Any, compiled: Any = None) -> None:
        self.runtime = runtime
        self.compiled = compiled

    def call_body(self, live_ins: tuple[Any, ...]) -> Any:
        return (self.compiled if self.compiled is not None else self.body)(*live_ins)

    def forward(self, *args: Any) -> tuple:
        if self.runtime is None:
            raise XditFxError("this cache region is not bound to a runtime (it was built by a dump or a test); "
                              "run the model through xdit_fx.parallelize(model, plan) to use the cache.")
        n = self.spec.n_probe
        return self.runtime.run(self, tuple(args[:n]), tuple(args[n:]))


class PipeFusionRegion(nn.Module):
    """The per-patch part of the graph, cut into stages. `body` is the whole region (for dumps);
    `spec.programs[s].body` what stage s runs. `warm_region`: the one-patch version (warm-up calls)."""

    def __init__(self, body, spec) -> None:
        super().__init__()
        self.body = body
        self.spec = spec
        self.runtime: Any = None    # the PipeFusionRuntime of this rank's stage, bound by the executor
        self.warm_region: PipeFusionRegion | None = None

    def bind(self, runtime: Any, warm_region: "PipeFusionRegion") -> None:
        self.runtime = runtime
        self.warm_region = warm_region

    def forward(self, *live_ins: Any) -> tuple:
        if self.runtime is None:
            raise XditFxError("this PipeFusion region is not bound to a runtime (it was built by a dump or a "
                              "test); run the model through xdit_fx.parallelize(model, plan).")
        return self.runtime.run(self, live_ins)
