"""`index.html` for a dump directory: every pass's graph on one self-contained page (inline CSS and JS, no
network), read back from the `.txt` files, so it can be made for any dump, also one written inside a run.

Per pass, nodes are grouped by module path: the repeated blocks (`transformer_blocks.3`) and top-level
modules fold into <details>, parameters into one group. Nodes the pass created are green, nodes whose facts
it changed are yellow, attention sites carry a purple marker, collectives an orange one, gathers a red
one. Every `%arg` links to the node that produced it. The search box filters every pass by name, op,
module path, layout or source line and opens the groups that match.
"""

from __future__ import annotations

import html
import os
import re

from xdit_fx.debug.format import Dump, NodeLine, PassDump, graph_dirs, plan_string, read_dump

_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")
_ARG = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)")


def _group_key(n: NodeLine, stacks: set[str]) -> str:
    """'parameters', 'inputs', 'output', a block ('transformer_blocks.3': an entry of a module list that
    holds attention somewhere in the graph), or 'outside blocks'."""
    if n.op == "param":
        return "parameters"
    if n.op == "input":
        return "inputs"
    if n.op.startswith("return"):
        return "output"
    m = _BLOCK.match(n.module)
    if m and m.group(1).rsplit(".", 1)[0] in stacks:
        return m.group(1)
    return "outside blocks"


def _block_stacks(nodes: list[NodeLine]) -> set[str]:
    out = set()
    for n in nodes:
        m = _BLOCK.match(n.module) if n.attention else None
        if m:
            out.add(m.group(1).rsplit(".", 1)[0])
    return out


def _esc(s: str) -> str:
    return html.escape(s, quote=True)


def _expr_html(expr: str, pid: int, known: set[str]) -> str:
    out, last = [], 0
    for m in _ARG.finditer(expr):
        out.append(_esc(expr[last:m.start()]))
        name = m.group(1)
        if name in known:
            out.append(f'<a href="#p{pid}-{_esc(name)}">%{_esc(name)}</a>')
        else:
            out.append(_esc(m.group(0)))
        last = m.end()
    out.append(_esc(expr[last:]))
    return "".join(out)


def _row(n: NodeLine, pid: int, known: set[str], status: str) -> str:
    cls = ["n"]
    if status:
        cls.append(status)
    if n.attention:
        cls.append("attn")
    if n.comm:
        cls.append("comm")
    if n.gather:
        cls.append("gather")
    chips = []
    if n.attention:
        chips.append(f'<span class="chip c-attn">&#9670; {_esc(n.attention)}</span>')
    if n.comm:
        chips.append(f'<span class="chip c-comm">&#8644; {_esc(n.comm)}</span>')
    if n.gather:
        chips.append(f'<span class="chip c-gather">{_esc(n.gather)}</span>')
    for fact in n.extra:
        chips.append(f'<span class="chip c-xfx">{_esc(fact)}</span>')
    if n.layout:
        chips.append(f'<span class="chip c-layout">{_esc(n.layout)}</span>')
    if n.created_by:
        chips.append(f'<span class="chip c-new">+ {_esc(n.created_by)}</span>')
    expr = n.expr if len(n.expr) <= 220 else n.expr[:217] + "..."
    title = f' title="{_esc(n.expr)}"' if expr != n.expr else ""  # search reads the row's text
    return (f'<div class="{" ".join(cls)}" id="p{pid}-{_esc(n.name)}">'
            f'<span class="nm">%{_esc(n.name)}</span><span class="ex"{title}>'
            f'{_expr_html(expr, pid, known)}</span><span class="sh">{_esc(n.shape)}</span>'
            f'<span class="ch">{"".join(chips)}</span><span class="md">{_esc(n.module)}</span>'
            f'<span class="src">{_esc(n.source)}</span></div>')


def _pass_html(p: PassDump, prev: PassDump | None, pid: int, last: bool) -> str:
    before = {n.name: n for n in prev.nodes} if prev is not None else {}
    known = {n.name for n in p.nodes}
    removed = [n for n in (prev.nodes if prev is not None else []) if n.name not in known]
    groups: list[tuple[str, list[tuple[NodeLine, str]]]] = []
    stacks = _block_stacks(p.nodes)
    # a pass that only annotates: show the nodes it annotated (the graph itself is the previous pass's)
    same_nodes = prev is not None and not removed and all(n.name in before for n in p.nodes)
    for n in p.nodes:
        status = ""
        if prev is not None:
            old = before.get(n.name)
            if old is None:
                status = "new"
            elif old.format() != n.format():
                status = "chg"
        if same_nodes and not status:
            continue
        key = _group_key(n, stacks)
        fixed = next((g for g in groups if g[0] == key), None) if key in ("inputs", "parameters") else None
        if fixed is not None:
            fixed[1].append((n, status))
            continue
        if not groups or groups[-1][0] != key:
            groups.append((key, []))
        groups[-1][1].append((n, status))
    body = []
    for key, members in groups:
        nodes = [m for m, _ in members]
        n_new = sum(s == "new" for _, s in members)
        n_chg = sum(s == "chg" for _, s in members)
        n_attn = sum(bool(m.attention) for m in nodes)
        n_comm = sum(bool(m.comm) for m in nodes)
        badges = [f'<span class="cnt">{len(nodes)} nodes</span>']
        if n_attn:
            badges.append(f'<span class="chip c-attn">&#9670; {n_attn} attention</span>')
        if n_comm:
            badges.append(f'<span class="chip c-comm">&#8644; {n_comm} comm</span>')
        if n_new:
            badges.append(f'<span class="chip c-new">+{n_new} new</span>')
        if n_chg:
            badges.append(f'<span class="chip c-chg">~{n_chg} changed</span>')
        is_block = key not in ("parameters", "inputs", "output", "outside blocks")
        if key == "outside blocks":
            tops = list(dict.fromkeys(m.module.split(".")[0] for m in nodes if m.module))
            label = ", ".join(tops[:6]) + (f", +{len(tops) - 6}" if len(tops) > 6 else "")
            key_html = f'{_esc(key)}<span class="cnt"> {_esc(label)}</span>' if label else _esc(key)
        else:
            key_html = _esc(key)
        open_ = " open" if (n_new or key in ("output", "inputs")) else ""
        rows = "".join(_row(m, pid, known, s) for m, s in members)
        kind = "blk" if is_block else "grp"
        body.append(f'<details class="{kind}"{open_}><summary><span class="gk">{key_html}</span>{"".join(badges)}'
                    f'</summary>{rows}</details>')
    if removed:
        rows = "".join(f'<div class="n gone"><span class="nm">%{_esc(r.name)}</span>'
                       f'<span class="ex">{_esc(r.expr)}</span><span class="sh">{_esc(r.shape)}</span></div>'
                       for r in removed)
        body.append(f'<details class="grp"><summary><span class="gk">removed by this pass</span>'
                    f'<span class="chip c-gone">-{len(removed)}</span></summary>{rows}</details>')
    if same_nodes:
        note = (f"the graph is that of pass {prev.index:02d}; shown: the {sum(len(g[1]) for g in groups)} nodes "
                f"whose facts this pass added or changed")
        body.insert(0, f'<div class="note">{_esc(note)}</div>')
    tag = '<span class="chip c-new">rewrite</span>' if p.changed else '<span class="chip c-an">analysis / unchanged</span>'
    n_new = sum(1 for n in p.nodes if prev is not None and n.name not in before)
    n_chg = sum(1 for n in p.nodes if n.name in before and before[n.name].format() != n.format())
    if n_new:
        tag += f'<span class="chip c-new">+{n_new} new</span>'
    if removed:
        tag += f'<span class="chip c-gone">-{len(removed)} removed</span>'
    if n_chg:
        tag += f'<span class="chip c-chg">~{n_chg} annotated / changed</span>'
    delta = f'<div class="delta">ops: {_esc(p.op_delta)}</div>' if p.op_delta else ""
    return (f'<details class="pass" id="pass{pid}"{" open" if last or p.changed else ""}><summary><h2>'
            f'<span class="pi">{p.index:02d}</span> {_esc(p.name)} {tag}<span class="nodes">{p.nodes_before} &rarr; '
            f'{p.nodes_after} nodes</span></h2><div class="sum">{_esc(p.summary)}</div>{delta}</summary>'
            f'<div class="graph">{"".join(body)}</div></details>')


_CSS = """
:root{--bg:#fafafa;--fg:#1d232a;--mut:#6b7480;--line:#e3e6ea;--new:#e3f7e6;--newb:#2e9d4a;--chg:#fff6d6;
--chgb:#d9a400;--attn:#7b3fc4;--comm:#d0620a;--gather:#c62828;--lay:#1565c0}
*{box-sizing:border-box}body{margin:0;font:13px/1.45 -apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;
background:var(--bg);color:var(--fg)}
header{position:sticky;top:0;z-index:5;background:#1d232a;color:#fff;padding:10px 18px;display:flex;gap:16px;
align-items:center;flex-wrap:wrap}
header h1{font-size:16px;margin:0;font-weight:600}header .plan{background:#3b4652;border-radius:4px;padding:2px 8px;
font-family:ui-monospace,Menlo,Consolas,monospace}
header input[type=search]{flex:1;min-width:240px;max-width:460px;padding:6px 10px;border-radius:6px;border:0;font-size:13px}
header button{background:#3b4652;color:#fff;border:0;border-radius:6px;padding:6px 10px;cursor:pointer}
header label{font-size:12px;color:#cfd6de;display:flex;gap:4px;align-items:center}#hits{font-size:12px;color:#cfd6de;min-width:90px}
main{display:grid;grid-template-columns:250px 1fr;gap:0}
nav{position:sticky;top:52px;align-self:start;height:calc(100vh - 52px);overflow:auto;border-right:1px solid var(--line);
padding:12px;background:#fff}
nav a{display:block;padding:6px 8px;border-radius:6px;color:var(--fg);text-decoration:none;margin-bottom:2px}
nav a:hover{background:#eef1f4}nav .pn{font-weight:600}nav .ps{color:var(--mut);font-size:11px;display:block;
white-space:nowrap;overflow:hidden;text-overflow:ellipsis}nav .dot{display:inline-block;width:8px;height:8px;
border-radius:4px;margin-right:6px;background:#b8c0c8}nav .dot.chg{background:var(--newb)}
.content{padding:14px 20px;min-width:0}
.meta{color:var(--mut);margin:0 0 10px}.meta code{color:var(--fg)}
table.idx{border-collapse:collapse;margin:6px 0 16px;width:100%;background:#fff}
table.idx td,table.idx th{border:1px solid var(--line);padding:4px 8px;text-align:left;vertical-align:top}
table.idx th{background:#f1f3f5}table.idx td:nth-child(4){white-space:nowrap}
details.pass{background:#fff;border:1px solid var(--line);border-radius:8px;margin:0 0 12px}
details.pass>summary{padding:8px 12px;cursor:pointer;list-style:none}
details.pass>summary h2{font-size:15px;margin:0;display:flex;align-items:center;gap:8px}
.pi{color:var(--mut);font-family:ui-monospace,Menlo,monospace}.nodes{margin-left:auto;color:var(--mut);font-weight:400;
font-size:12px}.sum{color:#39424c;margin-top:2px}.delta{color:var(--mut);font-family:ui-monospace,Menlo,monospace;
font-size:11.5px}
.graph{padding:4px 10px 10px}
details.blk,details.grp{border-left:3px solid #d5dae0;margin:3px 0;padding-left:6px}
details.blk>summary,details.grp>summary{cursor:pointer;padding:2px 0;display:flex;gap:8px;align-items:center}
.gk{font-family:ui-monospace,Menlo,monospace;font-weight:600}.cnt{color:var(--mut);font-size:11.5px}
.n{display:grid;grid-template-columns:190px minmax(200px,1fr) 160px 330px;gap:2px 10px;padding:1px 6px;
font-family:ui-monospace,Menlo,Consolas,monospace;font-size:11.5px;border-radius:3px;align-items:baseline}
.n:hover{background:#f0f3f7}.n:hover .ex{white-space:normal;word-break:break-all}.n .nm{color:#0b5394;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.n .ex{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}.n .ex a{color:#0b5394;text-decoration:none}
.n .sh{color:var(--mut);white-space:nowrap;overflow:hidden;text-overflow:ellipsis}.n .ch{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.n .md,.n .src{grid-column:2/5;color:var(--mut);font-size:10.5px;display:none}
.n:hover .md,.n:hover .src,.n:target .md,.n:target .src{display:block}
.n.new{background:var(--new);box-shadow:inset 3px 0 0 var(--newb)}.n.chg{background:var(--chg);
box-shadow:inset 3px 0 0 var(--chgb)}.n.gone{text-decoration:line-through;color:var(--mut)}
.n.attn .nm{color:var(--attn);font-weight:700}.n.comm .nm{color:var(--comm);font-weight:700}
.n:target{outline:2px solid #0b5394}
.chip{display:inline-block;border-radius:10px;padding:0 7px;font-size:11px;margin-right:4px;border:1px solid;
font-family:-apple-system,Segoe UI,Roboto,sans-serif;white-space:nowrap}
.c-attn{color:var(--attn);border-color:#cdb5ec;background:#f6f0fd}.c-comm{color:var(--comm);border-color:#f2c9a6;
background:#fff4ea}.c-gather{color:var(--gather);border-color:#f1b4b4;background:#fdeeee}.c-layout{color:var(--lay);
border-color:#b9d3f2;background:#eef5fd}.c-new{color:var(--newb);border-color:#a9ddb6;background:#eefaf1}
.c-chg{color:#8a6a00;border-color:#ecd27a;background:#fff9e3}.c-an{color:var(--mut);border-color:#d5dae0}
.c-gone{color:var(--gather);border-color:#f1b4b4}.c-xfx{color:#00695c;border-color:#9fd6cc;background:#edf8f6}
.legend{display:flex;gap:10px;flex-wrap:wrap;margin:4px 0 12px;color:var(--mut)}
.legend .sw{display:inline-block;width:12px;height:12px;border-radius:3px;vertical-align:-2px;margin-right:4px}
.hide{display:none!important}.note{color:var(--mut);font-style:italic;margin:2px 0 6px}
"""

_JS = """
const q=document.getElementById('q'),hits=document.getElementById('hits'),onlyNew=document.getElementById('onlynew');
function apply(){const s=q.value.trim().toLowerCase(),on=onlyNew.checked;let h=0;
 document.querySelectorAll('.graph').forEach(g=>{g.querySelectorAll('details.blk,details.grp').forEach(d=>{let any=false;
  d.querySelectorAll('.n').forEach(r=>{const ok=(!s||(r.title+r.textContent).toLowerCase().includes(s))&&(!on||r.classList.contains('new')||
   r.classList.contains('chg')||r.classList.contains('gone'));r.classList.toggle('hide',!ok);if(ok){any=true;
   if(s)h++;}});d.classList.toggle('hide',!any);if((s||on)&&any)d.open=true;});
  if(s){const p=g.closest('details.pass');if(g.querySelector('.n:not(.hide)'))p.open=true;}});
 hits.textContent=s?h+' matches':'';}
let t;q.addEventListener('input',()=>{clearTimeout(t);t=setTimeout(apply,150);});onlyNew.addEventListener('change',apply);
function openHash(){const h=location.hash.slice(1);const el=h&&document.getElementById(h);if(!el)return;let d=el;
 while(d){if(d.tagName==='DETAILS')d.open=true;d=d.parentElement;}el.scrollIntoView();}
window.addEventListener('hashchange',openHash);openHash();
function setAll(o){document.querySelectorAll('details').forEach(d=>d.open=o);}
document.getElementById('exp').onclick=()=>setAll(true);document.getElementById('col').onclick=()=>setAll(false);
document.addEventListener('click',e=>{const a=e.target.closest('.ex a');if(!a)return;const el=document.getElementById(
 a.getAttribute('href').slice(1));if(el){let d=el.parentElement;while(d){if(d.tagName==='DETAILS')d.open=true;
 d=d.parentElement;}}});
"""


def render_html(dump: Dump, title: str = "") -> str:
    plan = plan_string(dump.plan) if dump.plan else "?"
    title = title or f"xdit_fx dump · {plan}"
    nav = []
    rows = []
    for i, p in enumerate(dump.passes):
        nav.append(f'<a href="#pass{i}"><span class="dot{" chg" if p.changed else ""}"></span><span class="pn">'
                   f'{p.index:02d} {_esc(p.name)}</span><span class="ps">{_esc(p.summary)}</span></a>')
        rows.append(f'<tr><td>{p.index}</td><td><a href="#pass{i}">{_esc(p.name)}</a></td>'
                    f'<td>{"yes" if p.changed else "no"}</td><td>{p.nodes_before} &rarr; {p.nodes_after}</td>'
                    f'<td>{_esc(p.op_delta)}</td><td>{_esc(p.summary)}</td><td>{_esc(p.ms)}</td></tr>')
    sections = [_pass_html(p, dump.passes[i - 1] if i else None, i, i == len(dump.passes) - 1)
                for i, p in enumerate(dump.passes)]
    meta = "".join(f"<div>{_esc(h)}</div>" for h in dump.header)
    legend = ('<div class="legend"><span><span class="sw" style="background:var(--new);border:1px solid var(--newb)">'
              '</span>created by this pass</span><span><span class="sw" style="background:var(--chg);border:1px solid '
              'var(--chgb)"></span>facts changed by this pass</span><span style="color:var(--attn)">&#9670; attention '
              'site</span><span style="color:var(--comm)">&#8644; collective</span><span style="color:var(--gather)">'
              'gather</span><span style="color:var(--lay)">tokens@dim[len/sp]: token layout (/sp = sharded)</span>'
              '<span>hover a node for its module path and source line; click a %arg to jump to it</span></div>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body><header><h1>xdit_fx graph dump</h1><span class="plan">{_esc(plan)}</span>
<input id="q" type="search" placeholder="search nodes: name, op, module path, layout, source..." autocomplete="off">
<span id="hits"></span><label><input type="checkbox" id="onlynew"> only what each pass changed</label>
<button id="exp">expand all</button><button id="col">collapse all</button></header>
<main><nav>{"".join(nav)}</nav><div class="content"><div class="meta">{meta}</div>
<table class="idx"><tr><th>#</th><th>pass</th><th>changed</th><th>nodes</th><th>op deltas</th><th>summary</th>
<th>ms</th></tr>{"".join(rows)}</table>{legend}{"".join(sections)}</div></main>
<script>{_JS}</script></body></html>
"""


def write_html(path: str) -> list[str]:
    """Write index.html into every graph dump directory under `path`; returns the files written."""
    written = []
    for d in graph_dirs(path):
        out = os.path.join(d, "index.html")
        with open(out, "w") as f:
            f.write(render_html(read_dump(d)))
        written.append(out)
    return written


# ---- screenshots (checks that the page renders in a real browser) --------------------------------------

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    import shutil

    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def screenshot(html_path: str, png_path: str, width: int = 1400, height: int = 2400, fragment: str = "",
               timeout_s: float = 120.0) -> str:
    """Render `html_path` in headless Chromium and save a PNG; returns png_path. Raises RuntimeError without a
    browser or when none was written."""
    import subprocess
    import tempfile

    browser = find_browser()
    if browser is None:
        raise RuntimeError(f"no headless browser found (tried {', '.join(BROWSERS)}); e.g. apt-get install chromium")
    url = "file://" + os.path.abspath(html_path) + (f"#{fragment}" if fragment else "")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
               f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={os.path.abspath(png_path)}", url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if not os.path.exists(png_path) or os.path.getsize(png_path) == 0:
        raise RuntimeError(f"{browser} wrote no screenshot (exit {proc.returncode}): {proc.stderr[-500:]}")
    return png_path
