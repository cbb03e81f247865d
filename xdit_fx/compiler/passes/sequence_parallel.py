"""Sequence parallelism as three passes: infer_token_dims -> shard_sequence -> parallelize_attention.

Layouts, per tensor, over the "sp" axis (ring x ulysses, n ranks):
  replicated   every rank holds the whole tensor (no META_TOKEN_DIMS entry, or a full-mode node)
  sharded      along one dim made of segments ((length, sharded), ...): a sharded segment holds
               ceil(length / n) tokens per rank, zero-padded on the last ranks; a replicated segment
               is held whole. Local = the segments' local parts, concatenated in order.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from xdit_fx.errors import UnsupportedGraph
from xdit_fx.compiler.fx_utils import (describe_node, META_ATTENTION, META_BLOCK, META_GATHER, META_LAYOUT, META_SP_ATTENTION,
                        META_TOKEN_DIMS, META_WHOLE, example_value, is_sdpa, sdpa_args, set_unique_name, shape_of,
                                        target_name)
from xdit_fx.ops import attention as sp_attn
from xdit_fx.ops import collectives
from xdit_fx.compiler.passes.base import PassContext, PassResult, graph_pass
from xdit_fx.compiler.passes.token_dims import ELEMENTWISE, infer, op_name, rule_for, slot_shape, tensor_slots

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeqLayout:
    """How one token dim of one tensor is laid out: its dim and its segments ((length, sharded), ...)."""

    dim: int
    segments: tuple[tuple[int, bool], ...]

    def local_lens(self, n: int) -> list[int]:
        return [collectives.local_len(length, s, n) for length, s in self.segments]

    def local_len(self, n: int) -> int:
        return sum(self.local_lens(n))

    def local_range(self, start: int, stop: int, n: int) -> tuple[int, int] | None:
        """Local [start, stop) of the segments that global [start, stop) covers exactly."""
        g = lo = 0
        lstart = lstop = None
        for (length, _), ll in zip(self.segments, self.local_lens(n)):
            if g == start:
                lstart = lo
            g += length
            lo += ll
            if g == stop:
                lstop = lo
        if lstart is None or lstop is None:
            return None
        return lstart, lstop

    def whole_range(self, start: int, stop: int) -> bool:
        """Whether global [start, stop) is made of whole segments, none of them sharded (every rank holds
        the same tokens there: a select of it is replicated)."""
        g, covered, sharded = 0, False, False
        for length, s in self.segments:
            if g >= start and g + length <= stop:
                covered = covered or length > 0
                sharded = sharded or s
            elif g < stop and g + length > start:
                return False  # the range cuts this segment
            g += length
        return covered and not sharded and self.local_range(start, stop, 1) is not None

    def __str__(self) -> str:
        segs = "+".join(f"{length}{'/sp' if s else ''}{'' if s is True or not s else f':rows{s}'}"
                        for length, s in self.segments)
        return f"tokens@{self.dim}[{segs}]"


MULTI = "multi"  # a tensor with two or more token dims (e.g. hand-written attention scores)


def layout_of(node: Any, index: Any = None) -> SeqLayout | str | None:
    if not isinstance(node, fx.Node):
        return None
    return (node.meta.get(META_TOKEN_DIMS) or {}).get(index)


# ---- pass 1: which dims carry tokens, and which token spaces are sharded ---------------------------

@graph_pass(reads=[META_ATTENTION], writes=[META_TOKEN_DIMS], mutates_graph=False)
def infer_token_dims(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Find token spaces with dim rules; shard every space that is both the query and the key sequence
    of some attention (self or joint attention). Writes a SeqLayout per tensor dim that carries one."""
    td = infer(gm.graph)
    candidates = []
    queries: set = set()
    for node in gm.graph.nodes:
        if not is_sdpa(node):
            continue
        sa = sdpa_args(node)
        q, k = sa["query"], sa["key"]
        qsegs, ksegs = td.segments((q, None, 2)), td.segments((k, None, 2))
        common = [s for s in qsegs if s in ksegs]
        site = node.meta[META_ATTENTION]
        site.kind = ("joint" if len(qsegs) > 1 or len(ksegs) > 1 else "self") if common else "cross"
        candidates += [s for s in common if td.size[s] >= 2 and s not in candidates]
        queries.update(qsegs)
    # linear attention: K^T V contracts both operands over one token space. Sharded when that space is also
    # the query sequence of some attention (Sana's image tokens: cross-attention queries), which tells the
    # image/video tokens apart from the other sums a model does (chunked scans, pooling over channels)
    for node in gm.graph.nodes:
        c = _contracted_space(node, td)
        if c is not None and c in queries and td.size[c] >= 2 and c not in candidates:
            candidates.append(c)
    # no self, joint or linear attention here: shard the queries, K/V stay whole (sequence parallel only: a
    # PipeFusion patch needs the K/V of the other patches, which only a self-attention's buffers hold)
    sp_only = getattr(ctx.plan, "pipefusion_degree", 1) == 1
    query_only = not candidates and sp_only
    if query_only:
        candidates = _query_spaces(gm.graph, td, ctx.mesh.sp)
    sharded = _compatible_spaces(gm.graph, td, candidates)
    rows = _grid_rows(gm.graph, td, sharded, ctx.mesh.sp)
    sharded |= rows
    frames: dict = {}
    if sp_only:  # (PipeFusion's patches split segments their own way)
        frames = _frame_rows(gm.graph, td, sharded, ctx.mesh.sp)
        sharded |= set(frames)
    granule = {space: g for space, g in frames.values()}
    tensors = 0
    for node in gm.graph.nodes:
        layouts: dict[Any, SeqLayout | str] = {}
        for slot in tensor_slots(node):
            found = []
            for d in range(len(slot_shape(slot))):
                segs = td.segments((slot[0], slot[1], d))
                if any(s in sharded for s in segs):
                    found.append(SeqLayout(d, tuple((td.size[s], granule.get(s, True) if s in sharded else False)
                                                    for s in segs)))
            if found:
                layouts[slot[1]] = found[0] if len(found) == 1 else MULTI
        if layouts:
            node.meta[META_TOKEN_DIMS] = layouts
            tensors += 1
        else:
            node.meta.pop(META_TOKEN_DIMS, None)
    spaces = len(sharded)
    n_sites = sum(1 for n in gm.graph.nodes if is_sdpa(n))
    summary = f"{spaces} token spaces sharded, {tensors} nodes carry tokens"
    if frames:
        summary += "; frames an attention runs over one at a time sharded: " + ", ".join(dict.fromkeys(
            f"{td.size[f]} frames of {td.size[sp] // td.size[f]} tokens"
            + (f" (the sequence padded to {collectives.local_len(td.size[sp], g, ctx.mesh.sp) * ctx.mesh.sp} "
               f"tokens: whole frames per rank)" if g is not True else "") for f, (sp, g) in frames.items()))
    if query_only and spaces:
        summary += (" (queries only: no attention site here has one sequence as its query and its key sequence, "
                    "so each rank computes its rows of the queries against whole keys and values)")
    if n_sites and not spaces:
        summary = (f"NOT PARALLELIZED: none of the {n_sites} attention sites has a query sequence of at least "
                   f"{max(2, ctx.mesh.sp)} tokens to shard ("
                   + "; ".join(describe_node(n) for n in gm.graph.nodes if is_sdpa(n))
                   + "); this graph runs whole on every rank")
        log.warning("xdit_fx: %s. Look at it with XDIT_FX_DUMP_DIR=... .", summary)
    return PassResult(gm, changed=False, summary=summary,
                      counts={"token_spaces": spaces, "token_nodes": tensors,
                              "query_only_graphs": int(bool(query_only and spaces)), "frame_rows": len(frames),
                              "unparallelized_graphs": int(bool(n_sites and not spaces))})


def _query_spaces(graph: fx.Graph, td, n: int) -> list:
    """The query sequences of a graph whose attention shares no sequence between queries and keys: the
    graph's own cross-attention, or a self-attention whose q, k and v come in as separate inputs (a graph
    break between the projections and the attention). Queries are independent rows of an attention, so
    each rank computes its rows against the whole keys and values it already holds: exact, and no
    communication inside the graph. Sequences shorter than the rank count (a pooled query) stay whole."""
    spaces: list = []
    for node in graph.nodes:
        if is_sdpa(node):
            q = sdpa_args(node)["query"]
            spaces += [s for s in td.segments((q, None, 2)) if td.size[s] >= max(2, n) and s not in spaces]
    return spaces


def _contraction_dims(node: fx.Node):
    """(a, a_dim, b, b_dim) for a matmul/bmm whose operands are contracted along a_dim and b_dim."""
    name = op_name(node)
    if name not in ("matmul", "bmm") or len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    sa, sb = slot_shape((a, None)) if isinstance(a, fx.Node) else None, \
        slot_shape((b, None)) if isinstance(b, fx.Node) else None
    if not sa or not sb or len(sa) < 2 or len(sb) < 2:
        return None
    return a, len(sa) - 1, b, len(sb) - 2


def _contracted_space(node: fx.Node, td):
    """The token space a matmul sums over when both operands carry it there (K^T V of linear attention)."""
    cd = _contraction_dims(node)
    if cd is None:
        return None
    a, da, b, db = cd
    if (a, None, da) not in td.parent or (b, None, db) not in td.parent:
        return None
    sa, sb = td.segments((a, None, da)), td.segments((b, None, db))
    return sa[0] if len(sa) == 1 and sa == sb else None


def _grid_rows(graph: fx.Graph, td, sharded: set, n: int) -> set:
    """Leading dims of grids that a sharded token dim is reshaped into ([L] -> [H, W] or [F, H, W]) for a
    convolution, when every rank's chunk is whole rows (H divisible by n): those rows are sharded too (row
    sharding), so the convolutions run on local rows plus a halo."""
    conv_dims = set()  # spatial dims that some convolution runs over: only those grids are worth sharding
    for node in graph.nodes:
        if op_name(node) in CONVS and node.args and isinstance(node.args[0], fx.Node):
            shp = slot_shape((node.args[0], None))
            for d in range(2, len(shp or ())):
                if (node.args[0], None, d) in td.parent:
                    conv_dims.add(td.find((node.args[0], None, d)))
    rows: set = set()
    changed = bool(conv_dims)
    while changed:
        changed = False
        for node in graph.nodes:
            rule = td.rules.get(node)
            if rule is None:
                continue
            for (si, di, so, do) in rule.grids:
                if len(di) != 1 or len(do) < 2:
                    continue
                segs = td.segments((si[0], si[1], di[0]))
                if len(segs) != 1 or segs[0] not in sharded | rows:
                    continue
                lead = (so[0], so[1], do[0])
                if lead not in td.parent:
                    continue
                h = td.size[td.find(lead)]
                root = td.find(lead)
                if h >= n and h % n == 0 and root in conv_dims and root not in td.composite \
                        and root not in sharded | rows:
                    rows.add(root)
                    changed = True
    return rows


def _frame_rows(graph: fx.Graph, td, sharded: set, n: int) -> dict:
    """Frames of a sharded sequence that an attention runs over one at a time: [L] -> [F, T] (frames x tokens
    per frame) whose F becomes the batch of an attention (a per-frame cross-attention, Wan-Animate's face
    adapter). F is sharded too; when n does not divide F, L is padded to whole frames per rank
    (ceil(F / n) frames of T tokens each, the last rank's missing frames zero-padded), so every rank's
    chunk of L is the same whole frames as its chunk of F. Returns {F's space: (L's space, T)}; a sequence
    asked for two different frame sizes gets neither."""
    batch_dims = set()
    for node in graph.nodes:
        if is_sdpa(node):
            q = sdpa_args(node)["query"]
            if isinstance(q, fx.Node) and (q, None, 0) in td.parent:
                batch_dims.add(td.find((q, None, 0)))
    found: dict = {}
    clash: set = set()
    for node in graph.nodes:
        rule = td.rules.get(node)
        for (si, di, so, do) in (rule.grids if rule is not None else ()):
            if len(di) != 1 or len(do) < 2 or (so[0], so[1], do[0]) not in td.parent:
                continue
            segs = td.segments((si[0], si[1], di[0]))
            lead = td.find((so[0], so[1], do[0]))
            if len(segs) != 1 or segs[0] not in sharded or lead in sharded or lead not in batch_dims \
                    or lead in td.composite or td.size[lead] < n:
                continue
            inner = td.size[segs[0]] // td.size[lead]
            if inner < 2 or inner * td.size[lead] != td.size[segs[0]]:
                continue
            g = inner if td.size[lead] % n else True
            if found.get(lead, (segs[0], g)) != (segs[0], g) or any(
                    s == segs[0] and gg != g for s, gg in found.values()):
                clash |= {lead}
            found[lead] = (segs[0], g)
    return {lead: v for lead, v in found.items() if lead not in clash}


def _compatible_spaces(graph: fx.Graph, td, candidates: list) -> set:
    """Token spaces to shard: at most one per tensor. Two attention sequences that meet in one tensor as
    different dims (spatial attention over [B*F, HW, D] and temporal attention over [B*HW, F, D] of a
    video: the frames are the batch of one and the sequence of the other) cannot both be sharded; the
    longer one is, and the attention over the other runs locally on its sharded batch dim."""
    meets: dict = {c: set() for c in candidates}
    together: dict = {c: set() for c in candidates}  # segments of one sequence (joint text + image)
    cand = set(candidates)
    for node in graph.nodes:
        for slot in tensor_slots(node):
            dims = []
            for d in range(len(slot_shape(slot))):
                segs = {s for s in td.segments((slot[0], slot[1], d)) if s in cand}
                if segs:
                    dims.append(segs)
                    for x in segs:
                        together[x].update(segs)
            for i, a in enumerate(dims):
                for b in dims[i + 1:]:
                    for x in a:
                        meets[x].update(y for y in b if y != x)
                    for y in b:
                        meets[y].update(x for x in a if x != y)
    chosen: set = set()
    for c in sorted(candidates, key=lambda c: -td.size[c]):  # stable: ties keep graph order
        if not (meets[c] - together[c]) & chosen:  # a [L, L] mask over a joint sequence is no conflict
            chosen.add(c)
    return chosen


# ---- pass 2: slice at the sources, keep token-wise ops local, gather at the exits ------------------

def _tensor_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: out.append(a) if isinstance(a, fx.Node) else None)
    return out


def _arg_layout(node: fx.Node, a: fx.Node) -> Any:
    """Layout of argument `a` as `node` sees it (getitem on a tuple reads one element)."""
    if node.target is operator.getitem and isinstance(example_value(a), (tuple, list)):
        return layout_of(a, node.args[1])
    return layout_of(a)


def _carried(node: fx.Node, rule, n: int = 1) -> tuple[set, set]:
    """(input (node, index, dim), output (index, dim)) pairs whose token dims the rule carries through."""
    ins, outs = set(), set()

    def lay(slot):
        return layout_of(slot[0], slot[1])

    for (si, di, so, do) in rule.links:
        li, lo = lay(si), lay(so)
        if isinstance(li, SeqLayout) and isinstance(lo, SeqLayout) and li.dim == di and lo.dim == do:
            ins.add((si[0], si[1], di))
            if so[0] is node:
                outs.add((so[1], do))
            else:  # a link between two inputs (x[index] = value): both ends are carried
                ins.add((so[0], so[1], do))
    for (si, di, start, stop, so, do) in rule.selects:
        li, lo = lay(si), lay(so)
        if isinstance(li, SeqLayout) and isinstance(lo, SeqLayout) and li.dim == di and lo.dim == do \
                and li.local_range(start, stop, 1) is not None:
            ins.add((si[0], si[1], di))
            if so[0] is node:
                outs.add((so[1], do))
            else:  # x[..., a:b, ...] = value: the value fills one segment of x
                ins.add((so[0], so[1], do))
        elif isinstance(li, SeqLayout) and lo is None and li.dim == di and so[0] is node \
                and li.whole_range(start, stop):
            ins.add((si[0], si[1], di))  # selects segments every rank holds whole: the result is replicated
    for (si, di, count, so, do) in rule.unflattens:  # [B*L] -> [B, L]: L's layout is the segment's
        li, lo = lay(si), lay(so)
        if isinstance(li, SeqLayout) and isinstance(lo, SeqLayout) and li.dim == di and lo.dim == do \
                and len(li.segments) == count and set(li.segments) == {lo.segments[0]} and len(lo.segments) == 1:
            ins.add((si[0], si[1], di))
            outs.add((so[1], do))
    for (si, di, so, do) in rule.grids:  # [L] <-> [H, W] with whole rows per rank: the leading dims
        li, lo = lay(si), lay(so)
        if isinstance(li, SeqLayout) and isinstance(lo, SeqLayout) and li.dim == di[0] and lo.dim == do[0] \
                and len(li.segments) == 1 and len(lo.segments) == 1 and li.segments[0][1] and lo.segments[0][1]:
            si_shape, so_shape = slot_shape(si), slot_shape(so)
            inner_i = 1
            for d in di[1:]:
                inner_i *= si_shape[d]
            inner_o = 1
            for d in do[1:]:
                inner_o *= so_shape[d]
            li_len, lo_len = li.segments[0][0], lo.segments[0][0]
            # exact when every rank holds the same whole rows on both sides: no padding, or L padded to whole
            # rows (a segment sharded in rows of inner_o tokens)
            li_loc = collectives.local_len(li_len, li.segments[0][1], n)
            lo_loc = collectives.local_len(lo_len, lo.segments[0][1], n)
            if li_len * inner_i == lo_len * inner_o and li_loc * inner_i == lo_loc * inner_o \
                    and (li_len % n == 0 and lo_len % n == 0 or li.segments[0][1] is not True
                         or lo.segments[0][1] is not True):
                ins.add((si[0], si[1], di[0]))
                outs.add((so[1], do[0]))
    for (si, di, count, so, do) in rule.flattens:  # [B, L] -> [B*L]: B copies of L's layout
        li, lo = lay(si), lay(so)
        if isinstance(li, SeqLayout) and isinstance(lo, SeqLayout) and li.dim == di and lo.dim == do \
                and len(li.segments) == 1 and lo.segments == li.segments * count:
            ins.add((si[0], si[1], di))
            outs.add((so[1], do))
    for (so, do, parts) in rule.concat:
        lo = lay(so)
        if isinstance(lo, SeqLayout) and lo.dim == do:
            outs.add((so[1], do))
            for s, d in parts:
                li = lay(s)
                if isinstance(li, SeqLayout) and li.dim == d:
                    ins.add((s[0], s[1], d))
    return ins, outs


def _can_propagate(node: fx.Node, rule, n: int = 1) -> bool:
    if rule is None:
        return False
    if is_sdpa(node) and _batch_sharded_sdpa(node):
        pass  # tokens folded into the batch: attention is token-wise there, checked like any op below
    elif is_sdpa(node):
        sa = sdpa_args(node)
        lq, lk, lv = layout_of(sa["query"]), layout_of(sa["key"]), layout_of(sa["value"])
        # is_causal is fine (sp_attention masks by global position); dropout is not (its RNG stream differs)
        causal = bool(sa["dropout_p"]) or (sa["is_causal"] and sa["attn_mask"] is not None)
        return (isinstance(lq, SeqLayout) and lq.dim == 2 and not causal
                and (lk is None and lv is None or isinstance(lk, SeqLayout) and isinstance(lv, SeqLayout)
                     and lk.dim == 2 and lv.dim == 2))
    if op_name(node) in CONVS and _conv_halo(node, n) is False:
        return False
    ins, outs = _carried(node, rule, n)
    if node.target is operator.setitem:  # the token dim of x must be indexed by a full or segment slice
        x = node.args[0]
        lay = layout_of(x)
        if isinstance(lay, SeqLayout):
            try:
                _localize_index(node.args[1], slot_shape((x, None)), lay, 1)
            except TypeError:
                return False
            if layout_of(node.args[2]) is None:
                ins.add((x, None, lay.dim))
    for a in _tensor_args(node):
        if (a, None) in rule.ignore:
            continue
        if node.target is operator.getitem and isinstance(example_value(a), (tuple, list)):
            lay = layout_of(a, node.args[1])
            if lay is not None and (a, node.args[1], getattr(lay, "dim", -1)) not in ins:
                return False
            continue
        lay = layout_of(a)
        if lay is None:
            continue
        if lay == MULTI or (a, None, lay.dim) not in ins:
            return False
    for idx, lay in (node.meta.get(META_TOKEN_DIMS) or {}).items():
        if lay == MULTI or (idx, lay.dim) not in outs:
            return False
    return True


CONVS = ("conv1d", "conv2d", "conv3d")


def _conv_arg(node: fx.Node, pos: int, name: str, default: Any, nd: int) -> Any:
    v = _arg_at(node, pos, name, default)
    return [v] * nd if isinstance(v, int) else v


def _conv_halo(node: fx.Node, n: int):
    """For a convolution whose input is sharded along a spatial dim: (dim, halo rows), (dim, 0) when the
    kernel is 1 there, or False when it cannot run on local rows (stride, non-'same' padding, padded chunk)."""
    x = node.args[0]
    lay = layout_of(x)
    if not isinstance(lay, SeqLayout) or lay.dim < 2:
        return None
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    ws = shape_of(w) if isinstance(w, fx.Node) else None
    if not ws:
        return False
    nsp = len(ws) - 2
    i = lay.dim - 2
    k = ws[lay.dim]
    if k == 1:
        return lay.dim, 0
    stride = _conv_arg(node, 3, "stride", 1, nsp)
    padding = _conv_arg(node, 4, "padding", 0, nsp)
    dilation = _conv_arg(node, 5, "dilation", 1, nsp)
    if isinstance(padding, str) or stride[i] != 1 or (k - 1) % 2 or padding[i] != dilation[i] * (k - 1) // 2:
        return False
    if len(lay.segments) != 1 or lay.segments[0][1] is not True or lay.segments[0][0] % n:
        return False
    if lay.segments[0][0] // n < padding[i]:
        return False
    return lay.dim, padding[i]


def _partial_sum(node: fx.Node):
    """(operand, token dim) of a sum over the sharded token dim whose result carries no tokens: a matmul
    contracting two operands over it (K^T V), or x.sum(dim) / x.mean(dim). Each rank sums its tokens and an
    all-reduce adds the partial results (padding zeroed first)."""
    if META_TOKEN_DIMS in node.meta:
        return None
    cd = _contraction_dims(node)
    if cd is not None:
        a, da, b, db = cd
        la, lb = layout_of(a), layout_of(b)
        if isinstance(la, SeqLayout) and isinstance(lb, SeqLayout) and la.dim == da and lb.dim == db \
                and la.segments == lb.segments and all(sh for _, sh in la.segments):
            return a, da  # (a replicated segment would be summed on every rank: not a partial sum)
        return None
    name = op_name(node)
    if name in ("sum", "mean") and node.args and isinstance(node.args[0], fx.Node):
        x = node.args[0]
        lay = layout_of(x)
        dim = _arg_at(node, 1, "dim", None)
        if isinstance(dim, (list, tuple)) and len(dim) == 1:
            dim = dim[0]
        if isinstance(lay, SeqLayout) and isinstance(dim, int) and dim % len(slot_shape((x, None))) == lay.dim \
                and all(sh for _, sh in lay.segments) \
                and all(layout_of(a) is None for a in _tensor_args(node) if a is not x):
            return x, lay.dim
    return None


def _batch_sharded_sdpa(node: fx.Node) -> bool:
    """An attention whose queries carry the sharded tokens on the batch or head dim, not the sequence."""
    lq = layout_of(sdpa_args(node)["query"])
    return isinstance(lq, SeqLayout) and lq.dim in (0, 1)


def _mutated_arg(node: fx.Node) -> fx.Node | None:
    """The tensor an in-place op writes to (x[i] = v, x.add_(...), x += ...), or None."""
    name = op_name(node) or ""
    inplace = (name == "setitem" or name in ("iadd", "isub", "imul", "itruediv")
               or node.op == "call_method" and name.endswith("_") and not name.endswith("__"))
    x = node.args[0] if node.args else None
    return x if inplace and isinstance(x, fx.Node) else None


def _local_shape(node: fx.Node, n: int, index: Any = None) -> list[int]:
    shape = list(slot_shape((node, index)))
    lay = layout_of(node, index)
    if isinstance(lay, SeqLayout):
        shape[lay.dim] = lay.local_len(n)
    return shape


def _localize(node: fx.Node, n: int, original: Any = None) -> None:
    """Rewrite the sizes baked into a propagated node's arguments to rank-local sizes."""
    name = op_name(node)
    x = node.args[0] if node.args else None
    # node.args[0] may already be the local copy of a value sliced at its first use (a shard_tokens node,
    # which carries no shape or token dims): read layouts and shapes from the original value
    if original is not None:
        x = original
    if name in ("view", "reshape", "expand", "broadcast_to") and layout_of(node) is not None:
        shape = _local_shape(node, n)
        if node.op == "call_method":
            node.args = (node.args[0], *shape)
        else:
            node.args = (node.args[0], tuple(shape))
        node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("shape", "size")}
    elif name in ("getitem", "setitem") and not isinstance(example_value(x), (tuple, list)):
        lay = layout_of(x)
        if isinstance(lay, SeqLayout):
            node.args = (node.args[0], _localize_index(node.args[1], slot_shape((x, None)), lay, n), *node.args[2:])
    elif name in ("split", "split_with_sizes", "chunk", "tensor_split"):
        lay = layout_of(x)
        dim = _arg_at(node, 2, "dim", 0)
        if isinstance(lay, SeqLayout) and dim % len(slot_shape((x, None))) == lay.dim:
            sizes = []  # every piece's local length along the token dim (a segment, or the whole space)
            for i, piece in enumerate(example_value(node)):
                pl = layout_of(node, i)
                sizes.append(pl.local_len(n) if isinstance(pl, SeqLayout) else piece.shape[lay.dim])
            node.target = "split" if node.op == "call_method" else torch.split
            node.args = (node.args[0], sizes, lay.dim)
            node.kwargs = {}
    elif name == "unflatten" and isinstance(layout_of(node), SeqLayout) and isinstance(layout_of(x), SeqLayout) \
            and _arg_at(node, 1, "dim", 0) % len(slot_shape((x, None))) == layout_of(x).dim:
        # the token dim itself is unflattened (into grid rows): its sizes become the local ones
        dim = _arg_at(node, 1, "dim", 0) % len(slot_shape((x, None)))
        sizes = list(_arg_at(node, 2, "sizes", ()))
        local = _local_shape(node, n)
        node.args = (node.args[0], dim, tuple(local[dim:dim + len(sizes)]))
        node.kwargs = {}
    elif name == "narrow":
        lay = layout_of(x)
        dim, start, length = node.args[1], node.args[2], node.args[3]
        if isinstance(lay, SeqLayout) and dim % len(slot_shape((x, None))) == lay.dim:
            lo, hi = lay.local_range(start, start + length, n)
            node.args = (node.args[0], dim, lo, hi - lo)


def _arg_at(node: fx.Node, pos: int, name: str, default: Any) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _localize_index(index: Any, shape: tuple[int, ...], lay: SeqLayout, n: int) -> Any:
    items = list(index) if isinstance(index, tuple) else [index]
    n_consume = sum(1 for i in items if i is not None and i is not Ellipsis)
    out, d = [], 0
    for i in items:
        if i is Ellipsis:
            out.append(i)
            d += len(shape) - n_consume
            continue
        if i is None:
            out.append(i)
            continue
        if d == lay.dim and not isinstance(i, slice):
            raise TypeError(f"index {i!r} picks tokens by global position")
        if isinstance(i, slice) and d == lay.dim:
            start, stop, _ = i.indices(shape[d])
            if start == 0 and stop == shape[d]:
                out.append(slice(None))
            else:
                lo, hi = lay.local_range(start, stop, n)
                out.append(slice(lo, hi))
        else:
            out.append(i)
        d += 1
    return tuple(out) if isinstance(index, tuple) else out[0]


class _Rewriter:
    """Keeps, for each original value, the node giving its local and/or full version."""

    def __init__(self, gm: fx.GraphModule, n: int, group: str) -> None:
        self.gm, self.n, self.group = gm, n, group
        self.local: dict[fx.Node, fx.Node] = {}
        self.full: dict[fx.Node, fx.Node] = {}
        self.gathers = {"exit": 0, "fallback": 0, "mask": 0}
        self.fallback_sites: list[str] = []
        self.sources = 0
        self.partial_sums = 0
        self.halos = 0
        self.aligned: dict[tuple, fx.Node] = {}

    # Slices and gathers go right before their first consumer, not after the producer: a value written in
    # place (x[...] = v, x.data.copy_(...)) between the two must be seen by the copy.

    def get_local(self, a: fx.Node, consumer: fx.Node) -> fx.Node:
        if a in self.local:
            return self.local[a]
        lay = layout_of(a)
        if not isinstance(lay, SeqLayout):
            return a
        whole = self.full.get(a, a)  # the gathered copy, if a was last written whole
        with self.gm.graph.inserting_before(consumer):
            s = self.gm.graph.call_function(collectives.shard_tokens,
                                            (whole, lay.dim, lay.segments, self.group, self.n))
        set_unique_name(self.gm.graph, s, f"shard_{a.name}")
        s.meta[META_LAYOUT] = lay
        self.local[a] = s
        self.full.setdefault(a, whole)  # still there whole: a later whole use needs no gather
        self.sources += 1
        return s

    def slice_full_operands(self, node: fx.Node) -> None:
        """An elementwise op whose output carries tokens may also get a whole operand that spans the full
        token dim without being linked to it (built by a different chain of concatenations, e.g. per-token
        timestep tables [history | current] against hidden states [short | mid | long | current]).
        Broadcasting pairs position i with position i, so slicing that operand with the output's layout
        is exact and needs no communication."""
        lay = layout_of(node)
        if not isinstance(lay, SeqLayout) or op_name(node) not in ELEMENTWISE:
            return
        out_nd = len(slot_shape((node, None)))
        total = sum(length for length, _ in lay.segments)
        if total < 2:
            return

        def fix(a: Any) -> Any:
            if not isinstance(a, fx.Node) or a.op == "call_function" and a.target in (
                    collectives.shard_tokens, collectives.gather_tokens) or layout_of(a) is not None:
                return a
            shp = shape_of(a)
            if not shp:
                return a
            d = lay.dim - (out_nd - len(shp))
            if d < 0 or shp[d] != total:
                return a
            key = (a, d, lay.segments)
            if key not in self.aligned:
                with self.gm.graph.inserting_before(node):
                    s = self.gm.graph.call_function(collectives.shard_tokens, (a, d, lay.segments, self.group, self.n))
                set_unique_name(self.gm.graph, s, f"shard_{a.name}")
                s.meta[META_LAYOUT] = SeqLayout(d, lay.segments)
                self.aligned[key] = s
                self.sources += 1
            return self.aligned[key]

        node.args, node.kwargs = fx.node.map_aggregate((node.args, node.kwargs), fix)

    def partial_sum(self, node: fx.Node, operand: fx.Node, dim: int) -> None:
        """node sums over the sharded token dim of `operand` (and of its partner): run it on local tokens
        with the padding zeroed, then all-reduce; the result is whole on every rank."""
        lay = layout_of(operand)
        node.args, node.kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: self.get_local(a, node))
        graph = self.gm.graph
        if any(s and collectives.local_len(length, s, self.n) * self.n != length for length, s in lay.segments):
            local = self.local[operand]
            with graph.inserting_before(node):
                z = graph.call_function(collectives.zero_token_padding, (local, dim, lay.segments, self.group, self.n))
            set_unique_name(graph, z, f"unpad_{operand.name}")
            node.args, node.kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: z if a is local else a)
        last = node
        if op_name(node) == "mean":  # local mean over ceil(L/n) slots -> its share of the global mean
            total = sum(length for length, _ in lay.segments)
            with graph.inserting_after(node):
                last = graph.call_function(operator.mul, (node, lay.local_len(self.n) / total))
            set_unique_name(graph, last, f"share_{node.name}")
        with graph.inserting_after(last):
            ar = graph.call_function(collectives.all_reduce_tokens, (last, self.group))
        set_unique_name(graph, ar, f"allreduce_{node.name}")
        ar.meta = {k: v for k, v in node.meta.items() if k in ("example_value", "val", "tensor_meta")}
        keep = {ar, last}
        node.replace_all_uses_with(ar, delete_user_cb=lambda u: u not in keep)
        self.partial_sums += 1

    def halo(self, node: fx.Node, original: fx.Node) -> None:
        """A convolution over a sharded grid dim: extend the local rows by the neighbours' border rows and
        drop the conv's zero padding on that dim (the first and last rank get zero rows instead)."""
        lay = layout_of(original) if isinstance(original, fx.Node) else None
        if not isinstance(lay, SeqLayout) or lay.dim < 2:
            return
        w = node.args[1]
        nsp = len(shape_of(w)) - 2
        k = shape_of(w)[lay.dim]
        if k == 1:
            return
        padding = list(_conv_arg(node, 4, "padding", 0, nsp))
        p = padding[lay.dim - 2]
        graph = self.gm.graph
        with graph.inserting_before(node):
            h = graph.call_function(collectives.halo_rows, (node.args[0], lay.dim, p, self.group))
        set_unique_name(graph, h, f"halo_{original.name}")
        padding[lay.dim - 2] = 0
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        defaults = (None, None, None, 1, 0, 1, 1)
        args = [_arg_at(node, i, nm, d) for i, (nm, d) in enumerate(zip(names, defaults))]
        args[0], args[4] = h, tuple(padding)
        node.args, node.kwargs = tuple(args), {}
        self.halos += 1

    def get_full(self, a: fx.Node, consumer: fx.Node, kind: str | None = None) -> fx.Node:
        if a in self.full:
            return self.full[a]
        if a not in self.local:
            return a
        lay = layout_of(a)
        loc = self.local[a]
        with self.gm.graph.inserting_before(consumer):
            g = self.gm.graph.call_function(collectives.gather_tokens,
                                            (loc, lay.dim, lay.segments, self.group, self.n))
        set_unique_name(self.gm.graph, g, f"gather_{a.name}")
        kind = kind or ("fallback" if META_BLOCK in consumer.meta else "exit")
        g.meta[META_GATHER] = f"{kind}: needed by {consumer.name} ({target_name(consumer)})"
        if kind == "fallback":
            self.fallback_sites.append(f"{consumer.name} ({target_name(consumer)}, {consumer.meta[META_BLOCK]})")
        self.gathers[kind] += 1
        self.full[a] = g
        return g


@graph_pass(reads=[META_TOKEN_DIMS, META_BLOCK], writes=[META_LAYOUT, META_SP_ATTENTION])
def shard_sequence(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Run token-wise ops on each rank's chunk of the sequence.

    Before: every tensor is whole. After: tensors with a token dim are rank-local (SeqLayout in
    META_LAYOUT); values that enter whole (inputs, RoPE tables, positional embeddings) are sliced where
    first needed (shard_tokens, no communication); ops without a rule and the graph outputs get
    gather_tokens in front (a *fallback* gather if inside a transformer block, else an *exit* gather).
    Sizes baked into view/reshape/split/slice arguments become local sizes. Attention nodes are left
    on local q/k/v, marked META_SP_ATTENTION for parallelize_attention.
    """
    return shard_over(gm, ctx.mesh.sp, ctx.mesh.group("sp"))


def shard_over(gm: fx.GraphModule, n: int, group: str) -> PassResult:
    """shard_sequence's rewrite for `n` chunks of every sharded token segment over the process group named
    `group` (PipeFusion's patch_sequence calls it with the patch count: one chunk is one patch)."""
    rw = _Rewriter(gm, n, group)
    propagated = 0
    for node in list(gm.graph.nodes):
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output":
            node.args = fx.node.map_arg(node.args, lambda a: rw.get_full(a, node))
            continue
        args = _tensor_args(node)
        has_tokens = META_TOKEN_DIMS in node.meta or any(_arg_layout(node, a) is not None for a in args)
        if not has_tokens:
            continue
        rule = rule_for(node) if node.op in ("call_function", "call_method") else None
        whole = bool(node.meta.get(META_WHOLE))  # patch_sequence computes this node whole (before the patches)
        partial = _partial_sum(node) if node.op in ("call_function", "call_method") and not whole else None
        if partial is not None:
            rw.partial_sum(node, *partial)
            propagated += 1
            continue
        tuple_in = node.target is operator.getitem and args and isinstance(example_value(args[0]), (tuple, list))
        if tuple_in:
            ok = args[0] in rw.local and _can_propagate(node, rule, n)
        else:
            ok = _can_propagate(node, rule, n)
        mutated = _mutated_arg(node)
        if whole:
            ok = False
        if ok and not is_sdpa(node) and not tuple_in and not any(
                a in rw.local or isinstance(layout_of(a), SeqLayout) for a in args
                if rule is None or (a, None) not in rule.ignore):
            ok = False  # every input is whole (e.g. a cat of whole tables): the result is whole too
        if not ok:
            node.args, node.kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: rw.get_full(a, node))
            if META_TOKEN_DIMS in node.meta:
                rw.full[node] = node
            if mutated is not None and mutated in rw.local:  # only the whole copy saw the write
                rw.full[mutated] = node.args[0]
                rw.local.pop(mutated)
            continue
        if mutated is not None:  # only the local copy sees the write
            rw.full.pop(mutated, None)
        if is_sdpa(node) and not _batch_sharded_sdpa(node):
            sa = sdpa_args(node)
            q, k, v, mask = sa.pop("query"), sa.pop("key"), sa.pop("value"), sa["attn_mask"]
            if mask is not None:
                # attention reads the whole mask (re-indexed to the key order): a mask computed on local
                # tokens is gathered like keys are, counted apart from fallback gathers
                sa["attn_mask"] = rw.get_full(mask, node, kind="mask")
            node.args = (rw.get_local(q, node), rw.get_local(k, node), rw.get_local(v, node))
            node.kwargs = sa
            lk = layout_of(k)
            node.meta[META_SP_ATTENTION] = {
                "q_segments": layout_of(q).segments,
                "kv_segments": lk.segments if isinstance(lk, SeqLayout) else None,
            }
        else:
            def loc(a: fx.Node) -> fx.Node:
                if (a, None) in rule.ignore:
                    return rw.local.get(a, a)
                return rw.get_local(a, node)
            original = node.args[0] if node.args else None
            node.args, node.kwargs = fx.node.map_arg((node.args, node.kwargs), loc)
            _localize(node, n, original)
            rw.slice_full_operands(node)
            if op_name(node) in CONVS:
                rw.halo(node, original)
        if META_TOKEN_DIMS in node.meta or isinstance(example_value(node), (tuple, list)):
            rw.local[node] = node  # (a select of segments held whole is the same on every rank: no layout)
        lay = layout_of(node)
        if isinstance(lay, SeqLayout):
            node.meta[META_LAYOUT] = lay
        propagated += 1
    # fx counts no method call as impure: keep in-place writes (x.copy_(...)) whose result is unused
    # nor the enter/exit of a torch.func.vmap section (create_block_mask's), whose results are unused
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or _mutated_arg(n) is not None
                                 or "vmap_increment" in target_name(n) or "vmap_decrement" in target_name(n))
    changed = propagated > 0 or rw.sources > 0
    extra = {"partial_sums": rw.partial_sums, "halo_exchanges": rw.halos}
    summary = (f"{propagated} nodes run on local tokens, {rw.sources} values sliced, "
               f"{rw.gathers['exit']} exit gathers, {rw.gathers['fallback']} fallback gathers")
    if rw.gathers["mask"]:
        summary += f", {rw.gathers['mask']} attention masks gathered"
    if rw.partial_sums:
        summary += f", {rw.partial_sums} sums over tokens all-reduced"
    if rw.halos:
        summary += f", {rw.halos} convolutions with halo rows"
    if rw.fallback_sites:
        summary += " at " + "; ".join(rw.fallback_sites[:5])
    return PassResult(gm, changed=changed, summary=summary,
                      counts={"local_nodes": propagated, "sliced_values": rw.sources,
                              "exit_gathers": rw.gathers["exit"], "fallback_gathers": rw.gathers["fallback"],
                              "mask_gathers": rw.gathers["mask"], **{k: v for k, v in extra.items() if v}})


# ---- pass 3: attention over the whole sequence from local shards -----------------------------------

def _same_strides(gm: fx.GraphModule, new: fx.Node, original: fx.Node) -> fx.Node:
    """`new` laid out in memory like the attention it replaces returned its output (SDPA: [B, L, H, D]), so that
    views after it (`.transpose(1, 2).view(B, L, C)`) keep working."""
    from xdit_fx.ops.layout import in_memory_order, memory_order

    value = example_value(original)
    if not isinstance(value, torch.Tensor) or memory_order(value) == tuple(range(value.dim())):
        return new
    with gm.graph.inserting_after(new):
        laid = gm.graph.call_function(in_memory_order, (new, memory_order(value)))
    laid.meta = {k: v for k, v in new.meta.items() if k in ("example_value", "val", "nn_module_stack", "stack_trace",
                                                             META_LAYOUT)}
    set_unique_name(gm.graph, laid, f"strides_{original.name}")
    return laid


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@graph_pass(reads=[META_SP_ATTENTION, META_ATTENTION], writes=[])
def parallelize_attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Replace each attention on local shards with sp_attention: Ulysses all-to-all over "ulysses",
    ring attention over "ring", both for USP. Cross-attention to replicated keys stays local."""
    mesh = ctx.mesh
    sites = {"self": 0, "joint": 0, "cross": 0}
    for node in list(gm.graph.nodes):
        spec = node.meta.get(META_SP_ATTENTION)
        if spec is None or not is_sdpa(node):
            continue
        site = node.meta[META_ATTENTION]
        if mesh.ulysses > 1 and spec["kv_segments"] is not None and site.heads % mesh.ulysses:
            ok = [d for d in _divisors(site.heads) if d <= mesh.sp and mesh.sp % d == 0]
            raise UnsupportedGraph(
                f"parallelize_attention: attention {describe_node(node)}\n  has {site.heads} heads, which is not "
                f"divisible by ulysses_degree={mesh.ulysses}.\n  fix: choose ulysses_degree in {ok} and put the "
                f"rest of the {mesh.sp} sequence-parallel ranks on ring_degree (e.g. "
                f"ulysses={max(ok)}, ring={mesh.sp // max(ok)})."
            )
        sa = sdpa_args(node)
        q, k, v, mask = sa["query"], sa["key"], sa["value"], sa["attn_mask"]
        kwargs = dict(
            q_segments=spec["q_segments"], kv_segments=spec["kv_segments"],
            scale=sa["scale"], ulysses=mesh.ulysses, ring=mesh.ring,
            sp_group=mesh.group("sp"), ulysses_group=mesh.group("ulysses"), ring_group=mesh.group("ring"),
        )
        if sa["is_causal"]:
            kwargs["is_causal"] = True
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(sp_attn.sp_attention, (q, k, v, mask), kwargs)
        new.meta = {k2: v2 for k2, v2 in node.meta.items() if k2 != "xfx.created_by"}
        node.replace_all_uses_with(_same_strides(gm, new, node))
        gm.graph.erase_node(node)
        set_unique_name(gm.graph, new, f"sp_attention_{site.index}")
        sites[site.kind if site.kind in sites else "self"] += 1
    total = sum(sites.values())
    how = "+".join(a for a, d in (("ulysses", mesh.ulysses), ("ring", mesh.ring)) if d > 1) or "local"
    return PassResult(gm, changed=total > 0,
                      summary=f"{total} attention sites -> {how} ({sites['self']} self, {sites['joint']} joint, "
                              f"{sites['cross']} cross)",
                      counts={"sp_attention_sites": total, **{f"{k}_sites": v for k, v in sites.items()}})
