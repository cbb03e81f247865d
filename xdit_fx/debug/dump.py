"""Readable graph dumps: one text file per pass plus an index. A by-product of run_pipeline, never a pass.

Each node is one line: what it computes, then a comment with what xdit_fx knows about it:

    %view_1 = view(%linear, 1, 8, 4, 16)   # [1, 16, 4, 16] float32 | tokens@1[16/sp] | blocks.0.attn | + shard_sequence | xdit_fx/zoo.py:95, in forward

The facts, in this order, each present only when known: shape and dtype (global, as captured), token
layout (`tokens@DIM[SEGMENTS]`, `/sp` = sharded over the sequence-parallel ranks), attention site,
`comm` (a runtime collective), `gather (...)` (why a gather was inserted), any other `xfx.*` fact as
`xfx.key=value` (what newer passes record), module path, `+ PASS` (the pass that created the node), source
line. Lines hold no ids, addresses or timings, so two dumps of the
same model and plan are identical and `diff -r` / `xdit-fx diff` show only real changes.

A dump directory (`write_dump`):
    index.md              one row per pass: changed, nodes before -> after, op deltas, summary, ms
    NN_<pass>.txt         the graph after pass NN (00_captured: as dynamo captured it)
    NN_<pass>.diff        unified diff against the previous pass (rewriting passes only)
    plan.json             the plan
    index.html            with `formats=("text", "html")`: the same, as one self-contained page
Several graphs (dynamo graph breaks) go to graph0/, graph1/, ... under one top-level index.md.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx

from xdit_fx.compiler.fx_utils import (META_ATTENTION, META_BLOCK, META_CREATED_BY, META_GATHER, META_LAYOUT, META_SP_ATTENTION,
                       META_TOKEN_DIMS, example_value, module_path, source_line, target_name)
from xdit_fx.compiler.passes.base import GraphHistory
from xdit_fx.debug.format import NodeLine, plan_string

#: Environment variables read by in-run dumps (`Plan(debug_dump_dir=...)` is the other way in).
ENV_DUMP_DIR = "XDIT_FX_DUMP_DIR"
ENV_DUMP_FORMAT = "XDIT_FX_DUMP_FORMAT"  # "text" (default) or "text,html"

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_OPS_MODULE = "xdit_fx.ops"




def _fmt(a: Any) -> str:
    if isinstance(a, fx.Node):
        return f"%{a.name}"
    if isinstance(a, tuple):
        return "(" + ", ".join(_fmt(x) for x in a) + ("," if len(a) == 1 else "") + ")"
    if isinstance(a, list):
        return "[" + ", ".join(_fmt(x) for x in a) + "]"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k!r}: {_fmt(v)}" for k, v in a.items()) + "}"
    if isinstance(a, slice):
        return f"{'' if a.start is None else _fmt(a.start)}:{'' if a.stop is None else _fmt(a.stop)}" + (
            f":{_fmt(a.step)}" if a.step is not None else "")
    if isinstance(a, torch.dtype):
        return str(a).replace("torch.", "")
    if isinstance(a, (torch.device, torch.memory_format, torch.layout)):
        return repr(str(a))
    return _ADDRESS.sub("", repr(a))


def _shape(node: fx.Node) -> str:
    v = example_value(node)
    if isinstance(v, torch.Tensor):
        return f"[{', '.join(str(int(s)) for s in v.shape)}] {str(v.dtype).replace('torch.', '')}"
    if isinstance(v, (tuple, list)) and v and all(isinstance(t, torch.Tensor) for t in v):
        return "(" + ", ".join(f"[{', '.join(str(int(s)) for s in t.shape)}]" for t in v) + ")"
    return ""


# facts shown in their own form above, or implied by another (the block by the module path, the sp spec by
# the attention site); any other xfx.* key is shown as key=value
_SHOWN_META = {META_ATTENTION, META_CREATED_BY, META_GATHER, META_LAYOUT, META_TOKEN_DIMS, META_BLOCK,
               META_SP_ATTENTION}


def _fact_value(v: Any) -> str:
    text = " ".join(_fmt(v).replace(" | ", " / ").split())
    return text if len(text) <= 100 else text[:97] + "..."


def _is_param(node: fx.Node) -> bool:
    return isinstance(example_value(node), torch.nn.Parameter) or "_parameters_" in node.name \
        or "_buffers_" in node.name


def node_info(node: fx.Node) -> NodeLine:
    """What the dump says about one node."""
    if node.op == "placeholder":
        expr = "param" if _is_param(node) else "input"
    elif node.op == "output":
        expr = f"return {_fmt(node.args[0])}"
    elif node.op == "get_attr":
        expr = f"get_attr {node.target}"
    else:
        args = [_fmt(a) for a in node.args] + [f"{k}={_fmt(v)}" for k, v in node.kwargs.items()]
        name = target_name(node) if node.op != "call_module" else f"module {node.target}"
        expr = f"{name}({', '.join(args)})"
    info = NodeLine(node.name, expr, shape=_shape(node))
    layout = node.meta.get(META_LAYOUT)
    if layout is None and META_TOKEN_DIMS in node.meta:
        tok = node.meta[META_TOKEN_DIMS]
        layout = tok.get(None) if isinstance(tok, dict) else None
    if layout is not None:
        info.layout = str(layout) if str(layout).startswith("tokens@") else f"tokens@{layout}"
    site = node.meta.get(META_ATTENTION)
    if site is not None:
        info.attention = site.describe()
    if node.op == "call_function" and str(getattr(node.target, "__module__", "")).startswith(_OPS_MODULE):
        groups = sorted({str(v) for k, v in node.kwargs.items()
                         if k.endswith("group") and node.kwargs.get(k[:-len("_group")], 2) != 1}
                        | {a for a in node.args if isinstance(a, str)})
        info.comm = f"comm({', '.join(groups)})" if groups else "comm"
    if META_GATHER in node.meta:
        info.gather = f"gather ({node.meta[META_GATHER]})"
    info.extra = tuple(f"{k}={_fact_value(v)}" for k, v in sorted(node.meta.items())
                       if k.startswith("xfx.") and k not in _SHOWN_META)
    info.module = module_path(node)
    info.created_by = str(node.meta.get(META_CREATED_BY, ""))
    if node.op != "placeholder":
        info.source = source_line(node)
    return info


def node_line(node: fx.Node) -> str:
    return node_info(node).format()


def render_graph(gm: fx.GraphModule) -> str:
    """The graph as dump text: one `node_line` per node. `run_pipeline(..., render=render_graph)`.

    A call of a submodule that holds a graph (`body`, e.g. the cache region of insert_cache) is followed by
    the body's nodes, named ``%<submodule>.<node>``, so what moved into it stays visible."""
    lines = []
    for n in gm.graph.nodes:
        lines.append(node_line(n))
        if n.op == "call_module":
            body = getattr(gm.get_submodule(n.target), "body", None)
            if isinstance(body, fx.GraphModule):
                for b in body.graph.nodes:
                    if b.op == "placeholder" and _is_param(b):
                        continue
                    info = node_info(b)
                    info.name = f"{n.target}.{info.name}"
                    lines.append(info.format())
    return "\n".join(lines) + "\n"



# ---- writing a dump directory -----------------------------------------------------------------------

@dataclass
class DumpInfo:
    """What the dump header says besides the plan: the model and the inputs it was captured with."""

    model: str = ""
    inputs: dict[str, str] = field(default_factory=dict)  # name -> "[1, 16, 64] bfloat16"
    notes: list[str] = field(default_factory=list)
    versions: str = ""  # "torch 2.13.0, diffusers 0.42.1": kept out of golden comparisons


def library_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from xdit_fx.version import __version__
    parts = [f"xdit_fx {__version__}", f"torch {torch.__version__}"]
    try:
        parts.append(f"diffusers {version('diffusers')}")
    except PackageNotFoundError:  # pragma: no cover - diffusers is a dependency
        pass
    return ", ".join(parts)


def pass_stem(index: int, name: str) -> str:
    return f"{index:02d}_{name}"


def write_dump(history: GraphHistory, plan, out_dir: str, info: DumpInfo | None = None,
               formats: Sequence[str] = ("text",), plan_dict: dict | None = None) -> None:
    """index.md, NN_<pass>.txt per pass, NN_<pass>.diff for passes that changed the graph, plan.json;
    index.html too if "html" is in `formats`. `plan_dict` overrides what plan.json says (the plan as the
    user asked for it, when axes applied outside the graph were taken out of `plan`)."""
    info = info or DumpInfo()
    os.makedirs(out_dir, exist_ok=True)
    plan_dict = plan_dict if plan_dict is not None else plan.to_dict()
    plan_str = plan_string(plan_dict)
    with open(os.path.join(out_dir, "plan.json"), "w") as f:
        json.dump(plan_dict, f, indent=2, sort_keys=True)
        f.write("\n")
    rows = ["| # | pass | changed | nodes | op deltas | summary | ms |", "|---|---|---|---|---|---|---|"]
    prev = None
    last = len(history.snapshots) - 1
    for s in history.snapshots:
        stem = pass_stem(s.index, s.name)
        delta = ", ".join(f"{k} {v:+d}" for k, v in s.op_delta.items())
        header = (f"# xdit_fx · pass {s.index}/{last} · {s.name}\n"
                  f"# plan: {plan_str}\n# summary: {s.summary}\n"
                  f"# nodes: {s.nodes_before} -> {s.nodes_after}; ops: {delta or 'no change'}\n")
        with open(os.path.join(out_dir, stem + ".txt"), "w") as f:
            f.write(header + s.graph_text)
        if prev is not None and s.changed:
            diff = difflib.unified_diff(prev.splitlines(), s.graph_text.splitlines(),
                                        f"{pass_stem(s.index - 1, history.snapshots[s.index - 1].name)}.txt",
                                        f"{stem}.txt", lineterm="", n=1)
            with open(os.path.join(out_dir, stem + ".diff"), "w") as f:
                f.write("\n".join(diff) + "\n")
        link = f"[{s.name}]({stem}.txt)" + (f" ([diff]({stem}.diff))" if prev is not None and s.changed else "")
        rows.append(f"| {s.index} | {link} | {'yes' if s.changed else 'no'} | {s.nodes_before} -> {s.nodes_after} "
                    f"| {delta} | {s.summary} | {s.seconds * 1e3:.1f} |")
        prev = s.graph_text
    head = [f"# xdit_fx graph dump ({plan_str})", ""]
    if info.model:
        head.append(f"- model: {info.model}")
    if info.inputs:
        head.append("- inputs: " + ", ".join(f"`{k}` {v}" for k, v in info.inputs.items()))
    head += [f"- {note}" for note in info.notes]
    if info.versions:
        head.append(f"- generated by {info.versions}")
    with open(os.path.join(out_dir, "index.md"), "w") as f:
        f.write("\n".join(head) + ("\n\n" if len(head) > 2 else "") + "\n".join(rows) + "\n")
    if "html" in formats:
        from xdit_fx.debug.html import write_html
        write_html(out_dir)



def write_graphs_index(out_dir: str, subdirs: Iterable[str], title: str) -> None:
    """Top-level index.md for a forward that dynamo split into several graphs."""
    lines = [f"# {title}", "", "dynamo split the forward into several graphs; each is parallelized on its own:", ""]
    for d in subdirs:
        first = ""
        idx = os.path.join(out_dir, d, "index.md")
        if os.path.exists(idx):
            first = next((ln for ln in open(idx) if ln.startswith("| ") and "captured" in ln), "").strip()
        lines.append(f"- [{d}]({d}/index.md) {first.split('|')[-3].strip() if first else ''}")
    with open(os.path.join(out_dir, "index.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def dump_dir_for_run(plan) -> str | None:
    """Where an in-run dump goes: `Plan(debug_dump_dir=...)`, else $XDIT_FX_DUMP_DIR, else nowhere."""
    return plan.debug_dump_dir or os.environ.get(ENV_DUMP_DIR) or None


def run_formats() -> tuple[str, ...]:
    return tuple(f.strip() for f in os.environ.get(ENV_DUMP_FORMAT, "text").split(",") if f.strip())


# ---- dumping a module from the command line or a script -------------------------------------------

@dataclass
class DumpResult:
    out_dir: str
    graphs: int
    capture_s: float
    passes_s: float
    histories: list[GraphHistory]


def dump_module(model: torch.nn.Module, inputs: dict, plan, out_dir: str, *, formats: Sequence[str] = ("text",),
                model_name: str = "", notes: Sequence[str] = ()) -> DumpResult:
    """Capture `model(**inputs)` with dynamo and write a dump of every pass the plan runs, without running the
    rewritten graph and without any process group (the mesh has symbolic group names), so any
    world size dumps in one process. Inputs may live on the meta device.

    `plan` is a Plan or a plan string; cfg/dp degrees this version's Plan refuses are reported as applied
    outside the graph. If a pass fails, the passes before it are still dumped and the error says where.

    Example::

        from xdit_fx import zoo
        from xdit_fx.debug.dump import dump_module
        z = zoo.get("scratch_dit")
        dump_module(z.build(), z.inputs(), "ulysses=2", "/tmp/scratch_dump")
    """
    import time

    from xdit_fx.compiler.capture import capture_graphs
    from xdit_fx.debug.model import describe_inputs, outside_graph_note, parse_tool_plan, ToolPlan
    from xdit_fx.errors import XditFxError
    from xdit_fx.compiler.rewrite import rewrite

    if isinstance(plan, ToolPlan):
        tp = plan
    else:
        tp = parse_tool_plan(plan if isinstance(plan, str) else plan.to_string())
        if not isinstance(plan, str):
            tp = ToolPlan(plan, plan.to_dict(), tp.outside)
    gplan = tp.graph
    note = outside_graph_note(tp)
    info = DumpInfo(model=model_name, inputs=describe_inputs(inputs), notes=list(notes) + ([note] if note else []),
                    versions=library_versions())
    t0 = time.perf_counter()
    try:
        graphs = capture_graphs(model, **inputs)
    except Exception as e:  # dynamo's message is long; the first lines say what failed
        first = "\n  ".join(str(e).strip().splitlines()[:3])[:600]
        on_meta = any(isinstance(v, torch.Tensor) and v.is_meta for v in inputs.values())
        raise XditFxError(
            f"capturing {model_name or type(model).__name__} failed: {type(e).__name__}: {first}\n"
            f"  inputs: {', '.join(f'{k} {v}' for k, v in info.inputs.items())}\n"
            + ("  on the meta device a forward cannot read tensor values (.item(), .tolist(), data-dependent "
               "shapes); try --device cpu on a smaller config, or other --input shapes" if on_meta else
               "  check the inputs (--input NAME=SHAPE[:dtype]) against the model's forward")) from e
    capture_s = time.perf_counter() - t0
    if not graphs:
        raise XditFxError(f"dynamo captured no graph from {model_name or type(model).__name__}'s forward: it ran "
                          f"eagerly (e.g. a graph break inside a loop); see TORCH_LOGS=graph_breaks")
    histories = []
    t1 = time.perf_counter()
    subdirs = [f"graph{i}" for i in range(len(graphs))]
    for i, gm in enumerate(graphs):
        gdir = out_dir if len(graphs) == 1 else os.path.join(out_dir, subdirs[i])
        history = GraphHistory()
        histories.append(history)
        try:
            rewrite(gm, gplan, history=history, render=render_graph)
        except XditFxError as e:
            write_dump(history, gplan, gdir, info, formats, tp.requested)
            with open(os.path.join(gdir, "error.txt"), "w") as f:
                f.write(f"{type(e).__name__}: {e}\n")
            done = history.snapshots[-1].name if history.snapshots else "nothing"
            e.args = (f"{e}\n  the passes up to {done} are dumped in {gdir}",)
            raise
        write_dump(history, gplan, gdir, info, formats, tp.requested)
    if len(graphs) > 1:
        write_graphs_index(out_dir, subdirs, f"xdit_fx graph dump ({plan_string(tp.requested)}): {len(graphs)} graphs")
    return DumpResult(out_dir, len(graphs), capture_s, time.perf_counter() - t1, histories)
