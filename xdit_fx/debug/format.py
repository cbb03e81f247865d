"""The dump's file format, read back: one node line (`NodeLine`, `parse_line`), a pass's graph, a dump directory
(`read_dump`). What `xdit-fx diff`, the HTML page and the golden tests read; `xdit_fx.debug.dump` writes it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

# ---- one node, one line ------------------------------------------------------------------------------

@dataclass
class NodeLine:
    """One node of a dump, as written to and read back from a `.txt` line."""

    name: str
    expr: str                     # "input", "param", "view(%linear, 1, 8)", "return (%out,)"
    shape: str = ""
    layout: str = ""
    attention: str = ""
    comm: str = ""
    gather: str = ""
    module: str = ""
    created_by: str = ""
    source: str = ""
    extra: tuple[str, ...] = ()   # other xfx.* facts, "xfx.stage=1": what passes added after this writer

    @property
    def op(self) -> str:
        """'input', 'param', 'return' or the called target's short name."""
        return self.expr.split("(", 1)[0].strip()

    def facts(self) -> list[str]:
        return [f for f in (self.shape, self.layout, self.attention, self.comm, self.gather, *self.extra,
                            self.module, f"+ {self.created_by}" if self.created_by else "", self.source) if f]

    def format(self) -> str:
        facts = self.facts()
        return f"%{self.name} = {self.expr}" + (f"   # {' | '.join(facts)}" if facts else "")


_LINE = re.compile(r"^%(?P<name>\S+) = (?P<expr>.*?)(?:   # (?P<facts>.*))?$")


def parse_line(line: str) -> NodeLine | None:
    """Read back a line `NodeLine.format` wrote (None for headers and blank lines)."""
    m = _LINE.match(line.rstrip("\n"))
    if not m:
        return None
    n = NodeLine(m["name"], m["expr"])
    for fact in (m["facts"] or "").split(" | "):
        if not fact:
            continue
        if fact[0] in "[(" and not n.shape:
            n.shape = fact
        elif fact.startswith("tokens@"):
            n.layout = fact
        elif fact.startswith("attention["):
            n.attention = fact
        elif fact.startswith("comm"):
            n.comm = fact
        elif fact.startswith("gather ("):
            n.gather = fact
        elif fact.startswith("xfx."):
            n.extra += (fact,)
        elif fact.startswith("+ "):
            n.created_by = fact[2:]
        elif re.search(r"\.py:\d+", fact):
            n.source = fact
        else:
            n.module = fact
    return n


def parse_graph(text: str) -> list[NodeLine]:
    return [n for n in (parse_line(line) for line in text.splitlines()) if n is not None]



def plan_string(plan_dict: dict) -> str:
    """`Plan.to_string()` of a plan dict; also for a dict this version's Plan refuses (a dump from another)."""
    from xdit_fx.errors import XditFxError
    from xdit_fx.plan import AXES, Plan, _SHORT_NAMES

    try:
        return Plan.from_dict(plan_dict).to_string()
    except (XditFxError, TypeError):
        pass
    parts = [f"{axis}={plan_dict.get(_SHORT_NAMES[axis], 1)}" for axis in AXES
             if plan_dict.get(_SHORT_NAMES[axis], 1) > 1]
    if plan_dict.get("compile"):
        parts.append("compile=1")
    if plan_dict.get("parallel_vae") is False:
        parts.append("parallel_vae=0")
    return ",".join(parts) or "serial"


# ---- reading a dump directory back -----------------------------------------------------------------

_STEM = re.compile(r"^(\d\d)_(.+)\.txt$")


@dataclass
class PassDump:
    index: int
    name: str
    summary: str
    header: list[str]
    nodes: list[NodeLine]
    changed: bool = False
    nodes_before: int = 0
    nodes_after: int = 0
    op_delta: str = ""
    ms: str = ""


@dataclass
class Dump:
    """A dump directory as read back: its passes (in order), plan and index header."""

    path: str
    passes: list[PassDump]
    plan: dict
    header: list[str]


def graph_dirs(path: str) -> list[str]:
    """The graph dump directories under `path`: itself, or graph0/, graph1/, ... (sorted)."""
    if any(_STEM.match(f) for f in os.listdir(path)):
        return [path]
    subs = sorted((d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))),
                  key=lambda d: (len(d), d))
    return [os.path.join(path, d) for d in subs if graph_dirs_has_passes(os.path.join(path, d))]


def graph_dirs_has_passes(path: str) -> bool:
    return os.path.isdir(path) and any(_STEM.match(f) for f in os.listdir(path))


def read_dump(path: str) -> Dump:
    """Read one graph dump directory written by `write_dump`."""
    rows: dict[int, list[str]] = {}
    header: list[str] = []
    index = os.path.join(path, "index.md")
    if os.path.exists(index):
        for line in open(index):
            if line.startswith("| ") and not line.startswith("| #"):
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                if cells and cells[0].isdigit():
                    rows[int(cells[0])] = cells
            elif line.startswith("- "):
                header.append(line[2:].rstrip("\n"))
    plan: dict = {}
    if os.path.exists(os.path.join(path, "plan.json")):
        plan = json.load(open(os.path.join(path, "plan.json")))
    passes = []
    for f in sorted(os.listdir(path)):
        m = _STEM.match(f)
        if not m:
            continue
        text = open(os.path.join(path, f)).read()
        head = [ln[2:] for ln in text.splitlines() if ln.startswith("# ")]
        summary = next((h[len("summary: "):] for h in head if h.startswith("summary: ")), "")
        p = PassDump(int(m[1]), m[2], summary, head, parse_graph(text))
        cells = rows.get(p.index)
        if cells and len(cells) >= 7:
            p.changed = cells[2] == "yes"
            before, _, after = cells[3].partition(" -> ")
            p.nodes_before, p.nodes_after = int(before or 0), int(after or 0)
            p.op_delta, p.ms = cells[4], cells[6]
        else:
            p.nodes_before = p.nodes_after = len(p.nodes)
        passes.append(p)
    return Dump(path, passes, plan, header)


# ---- golden comparisons ----------------------------------------------------------------------------

_MS_CELL = re.compile(r"\| [0-9.]+ \|$")


def normalise_for_golden(name: str, text: str) -> str:
    """Drop what legitimately differs between two runs of the same dump: timings and versions."""
    if name.endswith("index.md"):
        lines = []
        for line in text.splitlines():
            if line.startswith("- generated by "):
                continue
            lines.append(_MS_CELL.sub("| - |", line))
        return "\n".join(lines) + "\n"
    return text
