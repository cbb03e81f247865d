"""`xdit-fx diff DIR_A DIR_B`: two dumps compared pass by pass (two plans, or two versions of the library).

Passes are matched by name; within a pass, nodes by name (dump names are deterministic). For each pass it
reports nodes added and removed, op-count deltas, nodes whose expression changed, and nodes whose facts
(shape, layout, attention site, module, creating pass, source line) changed. Timings are ignored.
"""

from __future__ import annotations

import os
from collections import Counter

from xdit_fx.debug.format import Dump, NodeLine, PassDump, graph_dirs, plan_string, read_dump
from xdit_fx.errors import XditFxError

_FACTS = ("shape", "layout", "attention", "comm", "gather", "extra", "module", "created_by", "source")


def _load(path: str) -> list[Dump]:
    if not os.path.isdir(path):
        raise XditFxError(f"{path!r} is not a directory (expected a dump written by xdit-fx dump)")
    dirs = graph_dirs(path)
    if not dirs:
        raise XditFxError(f"{path!r} holds no dump (no NN_<pass>.txt files, no graphN/ folders)")
    return [read_dump(d) for d in dirs]


def _node_changes(a: NodeLine, b: NodeLine) -> list[str]:
    out = []
    if a.expr != b.expr:
        out.append(f"{a.expr} -> {b.expr}")
    for f in _FACTS:
        va, vb = getattr(a, f), getattr(b, f)
        if va != vb:
            out.append(f"{f}: {va or '-'} -> {vb or '-'}")
    return out


def diff_pass(pa: PassDump | None, pb: PassDump | None, max_nodes: int = 20,
              earlier: set | None = None) -> tuple[list[str], bool, set]:
    """Lines describing how pass `pb` differs from `pa`, whether they are the same, and the set of
    differences (for the next pass). Differences already listed for an earlier pass (`earlier`) are counted,
    not listed again, so each pass shows what it does differently."""
    if pa is None or pb is None:
        p = pa or pb
        side = "A" if pb is None else "B"
        return [f"== {p.index:02d} {p.name}: only in {side} ({p.summary})"], False, set()
    title = f"== {pb.index:02d} {pb.name}"
    na = {n.name: n for n in pa.nodes}
    nb = {n.name: n for n in pb.nodes}
    added = [n for n in pb.nodes if n.name not in na]
    removed = [n for n in pa.nodes if n.name not in nb]
    changed = [(na[n.name], n) for n in pb.nodes if n.name in na and _node_changes(na[n.name], n)]
    ops_a = Counter(n.op for n in pa.nodes if n.op not in ("input", "param"))
    ops_b = Counter(n.op for n in pb.nodes if n.op not in ("input", "param"))
    op_delta = {k: ops_b[k] - ops_a[k] for k in sorted(set(ops_a) | set(ops_b)) if ops_b[k] != ops_a[k]}
    summary_changed = pa.summary != pb.summary
    if not (added or removed or changed or summary_changed):
        return [f"{title}: same ({len(pb.nodes)} nodes)"], True, set()
    lines = [f"{title}: nodes {len(pa.nodes)} -> {len(pb.nodes)} (+{len(added)} -{len(removed)}), "
             f"{len(changed)} changed"]
    if summary_changed:
        lines += [f"   summary A: {pa.summary}", f"   summary B: {pb.summary}"]
    if op_delta:
        lines.append("   ops: " + ", ".join(f"{k} {v:+d}" for k, v in op_delta.items()))
    earlier = earlier or set()
    diffs = ({("+", n.format()) for n in added} | {("-", n.format()) for n in removed}
             | {("~", f"%{b.name}: " + "; ".join(_node_changes(a, b))) for a, b in changed})
    fresh = [("+", n.format()) for n in added] + [("-", n.format()) for n in removed] + \
        [("~", f"%{b.name}: " + "; ".join(_node_changes(a, b))) for a, b in changed]
    fresh = [d for d in fresh if d not in earlier]
    for sign, text in fresh[:max_nodes]:
        lines.append(f"   {sign} {text}")
    if len(fresh) > max_nodes:
        lines.append(f"   ... {len(fresh) - max_nodes} more")
    carried = len(diffs) - len(set(fresh))
    if carried:
        lines.append(f"   ({carried} differences carried over from the passes above)")
    return lines, False, diffs


def diff_dumps(path_a: str, path_b: str, max_nodes: int = 20) -> tuple[str, bool]:
    """The text `xdit-fx diff` prints, and whether the two dumps are the same (timings aside)."""
    ga, gb = _load(path_a), _load(path_b)
    lines = [f"# xdit-fx diff\n# A: {path_a}\n# B: {path_b}"]
    same = True
    pa_str = plan_string(ga[0].plan) if ga[0].plan else "?"
    pb_str = plan_string(gb[0].plan) if gb[0].plan else "?"
    if ga[0].plan != gb[0].plan:
        same = False
        lines.append(f"plan: {pa_str} -> {pb_str}")
    else:
        lines.append(f"plan: {pa_str} (same)")
    for key in ("model: ", "inputs: "):
        ha = next((h for h in ga[0].header if h.startswith(key)), "")
        hb = next((h for h in gb[0].header if h.startswith(key)), "")
        if ha != hb:
            same = False
            lines.append(f"{key.rstrip(': ')}: {ha[len(key):] or '-'} -> {hb[len(key):] or '-'}")
    if len(ga) != len(gb):
        same = False
        lines.append(f"graphs: {len(ga)} -> {len(gb)} (dynamo graph breaks differ)")
    differing = 0
    total = 0
    for i in range(max(len(ga), len(gb))):
        if i >= len(ga) or i >= len(gb):
            continue
        if len(ga) > 1 or len(gb) > 1:
            lines.append(f"\n## graph{i}")
        a, b = ga[i], gb[i]
        by_a = {p.name: p for p in a.passes}
        by_b = {p.name: p for p in b.passes}
        order = [p.name for p in b.passes] + [p.name for p in a.passes if p.name not in by_b]
        names_a = [p.name for p in a.passes]
        names_b = [p.name for p in b.passes]
        if names_a != names_b:
            lines.append(f"passes: {' -> '.join(names_a)}\n     vs {' -> '.join(names_b)}")
        earlier: set = set()
        for name in order:
            out, ok, earlier = diff_pass(by_a.get(name), by_b.get(name), max_nodes, earlier)
            lines += out
            total += 1
            differing += not ok
            same = same and ok
    lines.append(f"\n{'same' if same else 'different'}: {differing} of {total} passes differ")
    return "\n".join(lines) + "\n", same
