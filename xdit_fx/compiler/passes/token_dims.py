"""Which dim of which tensor is a token sequence: dim-correspondence rules and a union-find over dims.

Every op rule (one per op family, in ``dim_rules.py``; ``rule_for`` looks a node's rule up) says which
output dims index the *same things* as which input dims (a linear keeps every dim but the last; a
transpose moves them; an elementwise op keeps aligned dims of equal size). Joining
those dims with a union-find gives *token spaces*: sets of (tensor, dim) that all index one sequence.
A concatenation along a dim makes a *composite* space whose segments are the input spaces (Flux's
``cat([text, image])``); slicing or splitting a composite at segment boundaries gives a segment back.

Nothing here rewrites the graph. ``shard_sequence`` reads the result: spaces that are the query *and*
key sequence of some attention (self or joint attention) are sharded; everything linked to them follows.
An op without a rule links nothing, so a sharded input reaching it is gathered first: always correct,
reported as a fallback gather.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from xdit_fx.compiler.fx_utils import sdpa_args
from xdit_fx.compiler.passes.dim_rules import (ELEMENTWISE, RULES, DimSlot, Rule, Slot, op_name, reshape_groups,
                                               slot_shape, tensor_slots)

__all__ = ["ELEMENTWISE", "DimSlot", "Rule", "Slot", "TokenDims", "infer", "op_name", "reshape_groups", "rule_for",
           "slot_shape", "tensor_slots"]


def rule_for(node: fx.Node) -> Rule | None:
    """The dim rule of one node, or None when xdit_fx knows no rule for its op (the rules: dim_rules.py)."""
    name = op_name(node)
    rule = RULES.get(name) if name is not None else None
    return rule(node, name) if rule is not None else None


# ---- union-find over dim slots ---------------------------------------------------------------------

class TokenDims:
    """The result of token-dim inference for one graph."""

    def __init__(self) -> None:
        self.parent: dict[DimSlot, DimSlot] = {}
        self.size: dict[DimSlot, int] = {}
        self.composite: dict[DimSlot, list[DimSlot]] = {}  # root -> segment dim slots
        self.rules: dict[fx.Node, Rule | None] = {}
        self.conflicts: list[str] = []

    # union-find
    def add(self, ds: DimSlot, size: int) -> None:
        if ds not in self.parent:
            self.parent[ds] = ds
            self.size[ds] = size

    def find(self, ds: DimSlot) -> DimSlot:
        root = ds
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[ds] != root:
            self.parent[ds], ds = root, self.parent[ds]
        return root

    def union(self, a: DimSlot, b: DimSlot) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if self.size[ra] != self.size[rb]:
            self.conflicts.append(f"{a} size {self.size[ra]} vs {b} size {self.size[rb]}")
            return False
        ca, cb = self.composite.pop(ra, None), self.composite.pop(rb, None)
        self.parent[rb] = ra
        if ca is not None and cb is not None:
            if [self.size[self.find(s)] for s in ca] == [self.size[self.find(s)] for s in cb]:
                self.composite[ra] = ca
                for s, t in zip(ca, cb):
                    self.union(s, t)
            else:  # two different segmentations of one dim: keep the finer-grained one
                self.composite[ra] = ca if len(ca) >= len(cb) else cb
                self.conflicts.append(f"segmentations differ at {a}")
        elif ca is not None or cb is not None:
            self.composite[ra] = ca if ca is not None else cb
        return True

    def segments(self, ds: DimSlot) -> list[DimSlot]:
        """Base (non-composite) roots of a dim, flattened in order."""
        root = self.find(ds)
        comp = self.composite.get(root)
        if comp is None:
            return [root]
        result: list[DimSlot] = []
        for s in comp:
            result.extend(self.segments(s))
        return result

    def space_size(self, ds: DimSlot) -> int:
        return self.size[self.find(ds)]


def infer(graph: fx.Graph) -> TokenDims:
    """Build the token-dim union-find for `graph` (rules -> equalities, concats, segment selections)."""
    td = TokenDims()
    for node in graph.nodes:
        for slot in tensor_slots(node):
            for d, s in enumerate(slot_shape(slot)):
                td.add((slot[0], slot[1], d), s)
    seq_dims = _attention_sequence_dims(graph)
    pending = _Pending()
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        try:
            rule = rule_for(node)
        except (TypeError, ValueError, IndexError, AttributeError):
            rule = None
        td.rules[node] = rule
        if rule is not None:
            _apply_rule(td, rule, pending)
    _resolve_concats(td, pending.concats)
    _resolve_segments(td, seq_dims, pending, _attention_sequence_dims(graph, ("key",)))
    return td


@dataclass
class _Pending:
    """What a rule asks for beyond plain links, resolved once every link is in (in rule order)."""

    selects: list[tuple[DimSlot, int, int, DimSlot]] = field(default_factory=list)
    concats: list[tuple[DimSlot, list[DimSlot]]] = field(default_factory=list)
    unflattens: list[tuple[DimSlot, int, DimSlot]] = field(default_factory=list)
    flattens: list[tuple[DimSlot, int, DimSlot]] = field(default_factory=list)


def _attention_sequence_dims(graph: fx.Graph, which: tuple[str, ...] = ("query", "key")) -> list[DimSlot]:
    """The query and key sequence dims of every attention (`which`: only those of these operands)."""
    seq_dims: list[DimSlot] = []
    for node in graph.nodes:
        if op_name(node) == "scaled_dot_product_attention":
            sa = sdpa_args(node)
            for t in (sa[w] for w in which):
                shp = slot_shape((t, None)) if isinstance(t, fx.Node) else None
                if shp and len(shp) >= 2:
                    seq_dims.append((t, None, len(shp) - 2))
    return seq_dims


def _apply_rule(td: TokenDims, rule: Rule, pending: _Pending) -> None:
    """Join a rule's links (dropping those between dims of different sizes) and queue the rest."""
    good = []
    for (si, di, so, do) in rule.links:
        a, b = (si[0], si[1], di), (so[0], so[1], do)
        if a in td.parent and b in td.parent and td.size[a] == td.size[b]:
            good.append((si, di, so, do))
    rule.links = good
    for (si, di, so, do) in rule.links:
        td.union((si[0], si[1], di), (so[0], so[1], do))
    for (so, do, parts) in rule.concat:
        pending.concats.append(((so[0], so[1], do), [(s[0], s[1], d) for s, d in parts]))
    for (si, di, start, stop, so, do) in rule.selects:
        pending.selects.append(((si[0], si[1], di), start, stop, (so[0], so[1], do)))
    for (si, di, count, so, do) in rule.unflattens:
        pending.unflattens.append(((si[0], si[1], di), count, (so[0], so[1], do)))
    for (si, di, count, so, do) in rule.flattens:
        pending.flattens.append(((si[0], si[1], di), count, (so[0], so[1], do)))


def _resolve_concats(td: TokenDims, concats: list[tuple[DimSlot, list[DimSlot]]]) -> None:
    for out, parts in concats:
        root = td.find(out)
        if root not in td.composite and len(parts) > 1:
            td.composite[root] = parts
        elif len(parts) == 1:
            td.union(out, parts[0])
        else:
            tmp = (None, len(td.parent), 0)  # merge two definitions through a fresh composite slot
            td.parent[tmp] = tmp
            td.size[tmp] = td.size[root]
            td.composite[tmp] = parts
            td.union(root, tmp)


def _resolve_segments(td: TokenDims, seq_dims: list[DimSlot], pending: _Pending,
                      key_dims: list[DimSlot] = ()) -> None:
    """Segment selections resolve once composites are known; repeat until nothing changes. [B, L] -> [B*L]
    of a sequence L makes B*L B copies of L, unless B*L is an attention's key sequence itself (a video's
    frames x pixels): a batch folded into the queries of a cross-attention (PixArt's q.view(1, -1, H, D))
    stays B copies of the sharded sequence."""
    changed = True
    while changed:
        changed = False
        seq_roots, key_roots = set(), set()
        for ds in seq_dims:
            if ds in td.parent:
                seq_roots.update(td.segments(ds))
        for ds in key_dims:
            if ds in td.parent:
                key_roots.update(td.segments(ds))
        for src, count, out in pending.flattens:
            root = td.find(out)
            if td.find(src) in seq_roots and root not in key_roots and root not in td.composite:
                td.composite[root] = [src] * count
                changed = True
        for src, count, out in pending.unflattens:
            rep = repeated_space(td, src, count)
            if rep is not None:
                changed |= td.union(rep, out)
        for src, start, stop, out in pending.selects:
            picked = select_segments(td, src, start, stop)
            if picked is None:
                continue
            if len(picked) == 1:
                changed |= td.union(picked[0], out)
            elif td.find(out) not in td.composite:
                td.composite[td.find(out)] = picked
                changed = True


def repeated_space(td: TokenDims, ds: DimSlot, count: int) -> DimSlot | None:
    """The one space of which `ds`'s dim is `count` whole copies (a flattened [B, L]), else None."""
    comp = td.composite.get(td.find(ds))
    if comp is None or len(comp) != count:
        return None
    roots = {td.find(s) for s in comp}
    if len(roots) != 1 or td.find(comp[0]) in td.composite:
        return None
    return td.find(comp[0])


def select_segments(td: TokenDims, src: DimSlot, start: int, stop: int) -> list[DimSlot] | None:
    """Segments of `src`'s space covered exactly by [start, stop), or None if not on boundaries."""
    size = td.space_size(src)
    if start == 0 and stop == size:
        return [td.find(src)]
    comp = td.composite.get(td.find(src))
    if comp is None:
        return None
    picked, pos = [], 0
    for s in comp:
        n = td.space_size(s)
        if start <= pos and pos + n <= stop:
            picked.append(s)
        elif pos < stop and pos + n > start:
            inner = select_segments(td, s, max(start - pos, 0), min(stop - pos, n))
            if inner is None:
                return None
            picked.extend(inner)
        pos += n
    return picked or None
