"""PipeFusion on a forward that graph breaks split: a refusal with a checked fix, never a silent whole run.

PipeFusion cuts pipeline stages inside one captured graph that holds the block stack. When dynamo splits the
forward (a `.tolist()` in the loop over blocks, an `.item()` before an attention), a graph can hold attention
but no whole block (the pass refuses it), or no graph holds a block stack at all: then no stage is cut and
every rank would run the whole model, correct but not parallel. Both end in an error that says so, with
dynamo's break reasons and, as the fix, the plans of the same world size that give PipeFusion's ranks to
Ulysses or ring, but only those whose passes were run on copies of the captured graphs and made every graph
that holds attention sequence parallel (`checked_alternatives`)."""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from xdit_fx.compiler.fx_utils import copy_graph
from xdit_fx.compiler.mesh import Mesh
from xdit_fx.compiler.passes import GraphHistory
from xdit_fx.compiler.rewrite import rewrite
from xdit_fx.errors import XditFxError
from xdit_fx.plan import Plan


def checked_alternatives(graphs: list[fx.GraphModule], plan: Plan) -> list[str]:
    """Plans that replace `plan`'s PipeFusion degree by the same Ulysses or ring degree, under which the passes
    rewrite every graph of `graphs` (unrewritten copies) and shard at least one attention site in each graph
    that holds one."""
    n, default = plan.pipefusion_degree, Plan()
    found = []
    for axis in ("ulysses_degree", "ring_degree"):
        alt = dataclasses.replace(plan, pipefusion_degree=1, pipefusion_patches=default.pipefusion_patches,
                                  pipefusion_warmup_steps=default.pipefusion_warmup_steps,
                                  **{axis: getattr(plan, axis) * n})
        if all(_shards(g, alt) for g in graphs):
            found.append(alt.to_string())
    return found


def _shards(gm: fx.GraphModule, plan: Plan) -> bool:
    history = GraphHistory()
    try:
        rewrite(copy_graph(gm), plan, Mesh.of(plan), history=history)
    except XditFxError:
        return False
    counts = history.counts()
    return counts.get("attention_sites", 0) == 0 or counts.get("sp_attention_sites", 0) > 0


def explain(head: str, graphs: list[fx.GraphModule], plan: Plan, break_reasons: list[str]) -> str:
    """`head`, then why (the forward split by graph breaks, with dynamo's reasons) and a checked fix."""
    reasons = "; ".join(break_reasons) or "none reported by dynamo (a frame it skipped or runs eagerly)"
    fixes = checked_alternatives(graphs, plan)
    fix = (" or ".join(f"--plan {p}" for p in fixes)
           + f" (checked: its passes shard the attention of the {len(graphs)} graph(s) captured so far)"
           if fixes else "no plan of the same ranks was found to shard these graphs; run the model with cfg/dp")
    return "\n  ".join([
        head,
        f"the forward ran as {len(graphs)} captured graph(s): graph breaks: {reasons}",
        "PipeFusion cuts its stages inside one graph that holds the transformer blocks; move the code dynamo "
        "cannot trace (.tolist(), .item(), Python loops over tensor values) out of the forward to keep them in "
        "one graph (see the reasons with TORCH_LOGS=graph_breaks)",
        f"fix: {fix}"])
