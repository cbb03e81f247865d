"""The compiler's one entry: rewrite a captured graph for a plan's mesh.

`ParallelModule` (on the ranks), `xdit-fx dump` (in one process, any world size) and the tests all call
`rewrite`; they differ only in the mesh's group names (real c10d groups, or the axis names).
"""

from __future__ import annotations

from typing import Any, Callable

import torch.fx as fx

from xdit_fx.compiler.mesh import Mesh
from xdit_fx.compiler.passes import GraphHistory, PassContext, build_pipeline, run_pipeline


def rewrite(gm: fx.GraphModule, plan: Any, mesh: Mesh | None = None, *, history: GraphHistory | None = None,
            render: Callable[[fx.GraphModule], str] | None = None, layout_patches: int = 0) -> fx.GraphModule:
    """Run the passes `plan` needs on `gm` and return the rewritten graph.

    Args:
        gm: a captured graph whose nodes carry fake values (``meta["example_value"]``); rewritten in place.
        plan: the Plan (degrees, patches, cache); its `Mesh` is derived when `mesh` is None.
        mesh: the mesh with the executor's group names (None: symbolic names, as in dumps).
        history: filled with one snapshot per pass (what a dump shows).
        render: renders a snapshot's graph text (a dump's node lines); None skips rendering.
        layout_patches: for PipeFusion's one-patch warm-up graph, the patch count of the patched graph it
            runs beside (both must compute the same token segments whole).
    """
    mesh = mesh if mesh is not None else Mesh.of(plan)
    return run_pipeline(gm, build_pipeline(plan), PassContext(plan, mesh, layout_patches), history, render)
