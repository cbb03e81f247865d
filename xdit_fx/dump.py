"""Readable graph dumps: one text file per pass plus an index. A by-product of run_pipeline, never a pass.

Each node is one line: the fx node, then a comment with what xdit_fx knows about it:
    %q_1 = call_method[view](args = (%linear, 1, 8, 4, 16))   # [1, 16, 4, 16] f32 | tokens@1[16/sp] | blocks.0.attn | + shard_sequence
"""

from __future__ import annotations

import difflib
import json
import os

import torch
import torch.fx as fx

from .fx_utils import (META_ATTENTION, META_CREATED_BY, META_GATHER, META_LAYOUT, META_TOKEN_DIMS, example_value,
                       module_path, source_line)
from .passes.base import GraphHistory


def _shape(node: fx.Node) -> str:
    v = example_value(node)
    if isinstance(v, torch.Tensor):
        return f"[{', '.join(str(int(s)) for s in v.shape)}] {str(v.dtype).replace('torch.', '')}"
    if isinstance(v, (tuple, list)) and v and all(isinstance(t, torch.Tensor) for t in v):
        return "(" + ", ".join(f"[{', '.join(str(int(s)) for s in t.shape)}]" for t in v) + ")"
    return ""


def node_line(node: fx.Node) -> str:
    facts = [f for f in (_shape(node),) if f]
    layout = node.meta.get(META_LAYOUT)
    if layout is None and META_TOKEN_DIMS in node.meta:
        tok = node.meta[META_TOKEN_DIMS]
        layout = tok.get(None) if isinstance(tok, dict) else None
    if layout is not None:
        facts.append(str(layout))
    site = node.meta.get(META_ATTENTION)
    if site is not None:
        facts.append(site.describe())
    if META_GATHER in node.meta:
        facts.append(f"gather ({node.meta[META_GATHER]})")
    path = module_path(node)
    if path:
        facts.append(path)
    if META_CREATED_BY in node.meta:
        facts.append(f"+ {node.meta[META_CREATED_BY]}")
    src = source_line(node)
    if src and node.op != "placeholder":
        facts.append(src)
    text = node.format_node() or f"{node.op} {node.name}"
    return f"{text}   # {' | '.join(facts)}" if facts else text


def render_graph(gm: fx.GraphModule) -> str:
    return "\n".join(node_line(n) for n in gm.graph.nodes) + "\n"


def write_dump(history: GraphHistory, plan, out_dir: str) -> None:
    """index.md, NN_<pass>.txt per pass, NN_<pass>.diff for passes that changed the graph, plan.json."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "plan.json"), "w") as f:
        json.dump(plan.to_dict(), f, indent=2, sort_keys=True)
    rows = ["| # | pass | changed | nodes | op deltas | summary | ms |", "|---|---|---|---|---|---|---|"]
    prev = None
    for s in history.snapshots:
        stem = f"{s.index:02d}_{s.name}"
        header = (f"# xdit_fx · pass {s.index}/{len(history.snapshots) - 1} · {s.name}\n"
                  f"# plan: {plan.to_string()}\n# summary: {s.summary}\n"
                  f"# nodes: {s.nodes_before} -> {s.nodes_after}; ops: {s.op_delta or '{}'}\n")
        with open(os.path.join(out_dir, stem + ".txt"), "w") as f:
            f.write(header + s.graph_text)
        if prev is not None and s.changed:
            diff = difflib.unified_diff(prev.splitlines(), s.graph_text.splitlines(), "before", "after", lineterm="")
            with open(os.path.join(out_dir, stem + ".diff"), "w") as f:
                f.write("\n".join(diff) + "\n")
        delta = ", ".join(f"{k} {v:+d}" for k, v in s.op_delta.items())
        rows.append(f"| {s.index} | {s.name} | {'yes' if s.changed else 'no'} | {s.nodes_before} -> {s.nodes_after} "
                    f"| {delta} | {s.summary} | {s.seconds * 1e3:.1f} |")
        prev = s.graph_text
    with open(os.path.join(out_dir, "index.md"), "w") as f:
        f.write(f"# xdit_fx graph dump ({plan.to_string()})\n\n" + "\n".join(rows) + "\n")
