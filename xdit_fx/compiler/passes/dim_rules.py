"""Dim-correspondence rules: for one node, which output dims index the same things as which input dims.

A rule is a small function per op family, registered with ``@dim_rule(op names...)`` under the names
``op_name`` gives (a call_function target's ``__name__`` or a call_method name alike). ``RULES`` is that
table, filled at import and read-only afterwards; ``token_dims.rule_for`` looks a node up in it and
``token_dims.infer`` joins the rules' dims into token spaces. An op without a rule gets none: a sharded
input reaching it is gathered first (the fallback gather).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
import torch.fx as fx

from xdit_fx.compiler.fx_utils import example_value, node_arg, sdpa_args

# A "slot" is one tensor value: (node, index) with index None for tensor-valued nodes and i for the i-th
# element of a tuple-valued node (split, chunk, unbind). A "dim slot" adds the dim: (node, index, dim).
Slot = tuple[fx.Node, Any]
DimSlot = tuple[fx.Node, Any, int]


@dataclass
class Rule:
    """What one node does to dims. `links`: (in_slot, in_dim, out_slot, out_dim) equalities.
    `concat`: (out_slot, out_dim, [(in_slot, in_dim), ...]) composite definitions.
    `selects`: (in_slot, in_dim, start, stop, out_slot, out_dim) slices of a dim.
    `ignore`: input slots whose token dims do not matter (only dtype/shape read, e.g. type_as's other)."""

    links: list[tuple[Slot, int, Slot, int]] = field(default_factory=list)
    concat: list[tuple[Slot, int, list[tuple[Slot, int]]]] = field(default_factory=list)
    selects: list[tuple[Slot, int, int, int, Slot, int]] = field(default_factory=list)
    ignore: set = field(default_factory=set)
    # (in_slot, in_dim, count, out_slot, out_dim): a dim made of `count` copies of one token space (a token
    # dim flattened into the batch: [B, L] -> [B*L]) is unflattened back ([B*L] -> [B, L]); out_dim is L
    unflattens: list[tuple[Slot, int, int, Slot, int]] = field(default_factory=list)
    # (in_slot, in_dim, count, out_slot, out_dim): [B, L] -> [B*L]; resolved only when L is an attention
    # sequence and B*L is not (a video's [F, HW] -> [F*HW] token sequence stays one plain space)
    flattens: list[tuple[Slot, int, int, Slot, int]] = field(default_factory=list)
    # (in_slot, in_dims, out_slot, out_dims): a reshape that splits one dim into a grid ([L] -> [H, W]) or
    # merges a grid back; a token dim sharded into whole rows makes the grid's leading dim sharded
    grids: list[tuple[Slot, list[int], Slot, list[int]]] = field(default_factory=list)


# ---- op names ---------------------------------------------------------------------------------------

def op_name(node: fx.Node) -> str | None:
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        t = node.target
        if t is operator.getitem:
            return "getitem"
        if t is torch.nn.functional.scaled_dot_product_attention:
            return "scaled_dot_product_attention"
        return getattr(t, "__name__", None)
    return None


ELEMENTWISE = {
    # arithmetic (operator.*, torch.*, Tensor methods, in-place variants)
    "add", "sub", "mul", "truediv", "div", "floordiv", "mod", "pow", "neg", "pos", "abs",
    "iadd", "isub", "imul", "itruediv", "add_", "sub_", "mul_", "div_", "neg_", "pow_", "rsub",
    "addcmul", "addcdiv", "lerp", "maximum", "minimum", "fmod", "remainder", "true_divide", "multiply",
    "subtract", "divide", "square", "float_power", "clamp", "clamp_", "clip", "clamp_min", "clamp_max",
    # pointwise math and activations
    "exp", "exp2", "expm1", "log", "log1p", "log2", "sin", "cos", "tan", "tanh", "sigmoid", "relu", "relu_",
    "gelu", "silu", "silu_", "mish", "softplus", "rsqrt", "sqrt", "reciprocal", "erf", "sign", "floor", "ceil",
    "round", "trunc", "leaky_relu", "elu", "selu", "hardswish", "hardsigmoid", "hardtanh", "logsigmoid",
    "tanh_", "sigmoid_", "exp_", "gelu_", "atan", "atan2", "sinh", "cosh", "asin", "acos", "frac",
    "nan_to_num", "dropout", "where", "masked_fill", "masked_fill_", "lt", "le", "gt", "ge", "eq", "ne",
    "logical_not", "logical_and", "logical_or", "and_", "or_", "xor", "invert", "bitwise_not", "isnan",
    "isinf", "isfinite", "fill_", "zero_", "copy_", "polar", "complex", "real", "imag", "conj",
    # dtype / memory format: identity on dims
    "float", "half", "bfloat16", "double", "int", "long", "bool", "to", "type", "contiguous", "clone",
    "detach", "requires_grad_", "cpu", "cuda",
    # *_like creators: local shape in, local shape out
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
}
DTYPE_FROM_SECOND = {"type_as"}  # x.type_as(y): dims of x, only the dtype of y
PERMUTES = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t"}
RESHAPES = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "_unsafe_view"}
EXPANDS = {"expand", "expand_as", "broadcast_to"}
REDUCTIONS = {"mean", "sum", "amax", "amin", "norm", "var", "std", "prod", "logsumexp", "all", "any",
              "nansum", "nanmean", "count_nonzero"}
ALONG_DIM = {"softmax", "log_softmax", "cumsum", "cumprod", "flip", "roll", "argsort", "sort",
             "repeat_interleave", "normalize"}
CONCATS = {"cat", "concat", "concatenate"}
SPLITS = {"split", "chunk", "unbind", "tensor_split", "split_with_sizes"}


def _shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor):
        return tuple(int(s) for s in value.shape)
    return None


def slot_shape(slot: Slot) -> tuple[int, ...] | None:
    node, idx = slot
    value = example_value(node)
    if idx is not None:
        if not isinstance(value, (tuple, list)) or idx >= len(value):
            return None
        value = value[idx]
    return _shape(value)


def tensor_slots(node: fx.Node) -> list[Slot]:
    value = example_value(node)
    if isinstance(value, torch.Tensor):
        return [(node, None)]
    if isinstance(value, (tuple, list)):
        return [(node, i) for i, v in enumerate(value) if isinstance(v, torch.Tensor)]
    return []


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _is_tensor_node(a: Any) -> bool:
    return isinstance(a, fx.Node) and isinstance(example_value(a), torch.Tensor)


def _broadcast_links(rule: Rule, inputs: Iterable[fx.Node], out: Slot) -> None:
    out_shape = slot_shape(out)
    if out_shape is None:
        return
    for a in inputs:
        if not _is_tensor_node(a):
            continue
        shp = slot_shape((a, None))
        off = len(out_shape) - len(shp)
        for d, s in enumerate(shp):
            od = d + off
            if od >= 0 and s == out_shape[od] and s != 1:
                rule.links.append(((a, None), d, out, od))


def reshape_groups(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair up dims of two shapes of equal numel into groups of equal product (size-1 dims alone)."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        if i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
            groups.append(([], [j]))
            j += 1
            continue
        if i >= len(src) or j >= len(dst):
            return None
        gi, gj = [i], [j]
        pi, pj = src[i], dst[j]
        i += 1
        j += 1
        while pi != pj:
            if pi < pj:
                if i >= len(src):
                    return None
                pi *= src[i]
                gi.append(i)
                i += 1
            else:
                if j >= len(dst):
                    return None
                pj *= dst[j]
                gj.append(j)
                j += 1
        groups.append((gi, gj))
    return groups


def _index_links(rule: Rule, node: fx.Node, src: fx.Node, index: Any) -> None:
    """x[index] for basic indexing (ints, slices, None, Ellipsis), plus one 1-D tensor index (``x[..., idx]``,
    ``table[ids]``): the indexed dim is replaced in place by the index's dim, which is linked to the output
    (a token dim picked by ids comes from the ids, not from x)."""
    shp = slot_shape((src, None))
    out = (node, None)
    items = list(index) if isinstance(index, tuple) else [index]
    advanced = [i for i in items if isinstance(i, (fx.Node, list, torch.Tensor))]
    if advanced:
        a = advanced[0]
        one_d = (isinstance(a, list) and all(isinstance(v, int) for v in a)) or (
            isinstance(a, fx.Node) and slot_shape((a, None)) is not None and len(slot_shape((a, None))) == 1
            and not example_value(a).dtype == torch.bool)
        if len(advanced) > 1 or not one_d or any(isinstance(i, int) and not isinstance(i, bool) for i in items):
            return  # general advanced indexing: no rule
    n_consume = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in items:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (len(shp) - n_consume))
        else:
            expanded.append(i)
    expanded.extend([slice(None)] * (len(shp) - sum(1 for i in expanded if i is not None)))
    d_in = d_out = 0
    for i in expanded:
        if i is None:
            d_out += 1
        elif isinstance(i, int):
            d_in += 1
        elif isinstance(i, (fx.Node, list)):
            if isinstance(i, fx.Node):
                rule.links.append(((i, None), 0, out, d_out))
            d_in += 1
            d_out += 1
        elif isinstance(i, slice):
            size = shp[d_in]
            start, stop, step = i.indices(size)
            if step == 1:
                if start == 0 and stop == size:
                    rule.links.append(((src, None), d_in, out, d_out))
                else:
                    rule.selects.append(((src, None), d_in, start, stop, out, d_out))
            d_in += 1
            d_out += 1
        else:
            return


# ---- the rule table ---------------------------------------------------------------------------------
# One small function per op family, registered under every op name (`op_name`) it covers. The table is
# filled while this module is imported and read-only afterwards (`RULES`).

DimRule = Callable[[fx.Node, str], "Rule | None"]
_table: dict[str, DimRule] = {}


def dim_rule(*ops: str, tensor_input: bool = True) -> Callable[[DimRule], DimRule]:
    """Register the decorated function as the dim rule of `ops` (one op name has one rule).

    With `tensor_input` (the default) the rule only applies when the op's first argument is a tensor;
    otherwise the op gets no rule. The function is called as `fn(node, name)` with `name = op_name(node)`."""

    def register(fn: DimRule) -> DimRule:
        if "RULES" in globals():
            raise RuntimeError(f"{fn.__name__}: dim rules are registered in dim_rules.py only, while it is imported")
        apply = _on_tensor_input(fn) if tensor_input else fn
        for op in ops:
            if op in _table:
                raise ValueError(f"two dim rules for {op!r}: {_table[op].__name__} and {fn.__name__}")
            _table[op] = apply
        return fn

    return register


def _on_tensor_input(fn: DimRule) -> DimRule:
    def apply(node: fx.Node, name: str) -> Rule | None:
        x = node.args[0] if node.args else None
        return fn(node, name) if _is_tensor_node(x) else None

    apply.__name__ = fn.__name__
    return apply


def _io(node: fx.Node) -> tuple[fx.Node, tuple[int, ...], tuple[int, ...] | None]:
    """The first argument, its shape and the output shape (for rules registered with a tensor input)."""
    x = node.args[0]
    return x, slot_shape((x, None)), slot_shape((node, None))


def _dims(dim: Any, nd: int) -> set[int]:
    return {_norm_dim(int(d), nd) for d in (dim if isinstance(dim, (list, tuple)) else [dim])}


# -- indexing and attention

@dim_rule("getitem", tensor_input=False)
def _getitem(node: fx.Node, name: str) -> Rule | None:
    args, out, rule = node.args, (node, None), Rule()
    x = args[0] if args else None
    value = example_value(x)
    if isinstance(value, (tuple, list)):
        shp = slot_shape((x, args[1]))
        if shp is not None:
            rule.links += [((x, args[1]), d, out, d) for d in range(len(shp))]
        return rule
    if not _is_tensor_node(x):
        return None
    _index_links(rule, node, x, args[1])
    return rule


@dim_rule("setitem", tensor_input=False)
def _setitem(node: fx.Node, name: str) -> Rule | None:
    """x[index] = value, in place: x's indexed dims meet value's dims."""
    x, index, value = node.args[0], node.args[1], node.args[2]
    if not _is_tensor_node(x):
        return None
    rule, view = Rule(), Rule()
    _index_links(view, node, x, index)
    if _is_tensor_node(value):
        vs = slot_shape((value, None))
        view_nd = max([do for (_, _, _, do) in view.links] + [-1]) + 1
        view_nd = max(view_nd, len(vs))
        off = view_nd - len(vs)
        for (si, di, _, do) in view.links:
            j = do - off
            if 0 <= j < len(vs) and vs[j] == slot_shape(si)[di]:
                rule.links.append((si, di, (value, None), j))
        for (si, di, start, stop, _, do) in view.selects:  # writing one segment of x
            j = do - off
            if 0 <= j < len(vs) and vs[j] == stop - start:
                rule.selects.append((si, di, start, stop, (value, None), j))
    return rule


@dim_rule("scaled_dot_product_attention", tensor_input=False)
def _sdpa(node: fx.Node, name: str) -> Rule | None:
    out, rule = (node, None), Rule()
    sa = sdpa_args(node)
    q, k, v = sa["query"], sa["key"], sa["value"]
    rule.links += [((q, None), d, out, d) for d in range(3)]
    rule.links.append(((k, None), 2, (v, None), 2))
    # batch (and head) dims index the same things in q, k and v: a token dim folded into the batch
    # (temporal attention over [B*HW, F, D]) stays sharded through an attention that is then local
    qs, ks, vs = slot_shape((q, None)), slot_shape((k, None)), slot_shape((v, None))
    if qs and ks and vs and len(qs) == len(ks) == len(vs) == 4:
        for d in (0, 1):
            if qs[d] == ks[d] == vs[d] != 1:
                rule.links += [((q, None), d, (k, None), d), ((q, None), d, (v, None), d)]
    return rule


# -- pointwise

@dim_rule(*ELEMENTWISE, *DTYPE_FROM_SECOND, tensor_input=False)
def _elementwise(node: fx.Node, name: str) -> Rule | None:
    out, rule = (node, None), Rule()
    if slot_shape(out) is None:
        return None
    ins = [a for a in list(node.args) + list(node.kwargs.values()) if _is_tensor_node(a)]
    if name in DTYPE_FROM_SECOND:
        rule.ignore.update((a, None) for a in ins[1:])
        ins = ins[:1]
    _broadcast_links(rule, ins, out)
    return rule


# -- linear algebra and normalization

@dim_rule("linear")
def _linear(node: fx.Node, name: str) -> Rule | None:
    x, xs, _ = _io(node)
    return Rule(links=[((x, None), d, (node, None), d) for d in range(len(xs) - 1)])


@dim_rule("layer_norm", "rms_norm")
def _norm_last(node: fx.Node, name: str) -> Rule | None:
    x, xs, _ = _io(node)
    ns = node_arg(node, 1, "normalized_shape")
    k = len(ns) if isinstance(ns, (tuple, list)) else 1
    return Rule(links=[((x, None), d, (node, None), d) for d in range(len(xs) - k)])


@dim_rule("group_norm")
def _group_norm(node: fx.Node, name: str) -> Rule | None:
    x, _, _ = _io(node)
    return Rule(links=[((x, None), 0, (node, None), 0)])


@dim_rule("matmul", "bmm", "baddbmm")
def _matmul(node: fx.Node, name: str) -> Rule | None:
    args, out, rule = node.args, (node, None), Rule()
    os_ = slot_shape(out)
    a, b = (args[1], args[2]) if name == "baddbmm" else (args[0], args[1])
    sa, sb = slot_shape((a, None)), slot_shape((b, None))
    if sa is None or sb is None or len(sa) < 2 or len(sb) < 2 or os_ is None:
        return None
    rule.links.append(((a, None), len(sa) - 2, out, len(os_) - 2))
    rule.links.append(((b, None), len(sb) - 1, out, len(os_) - 1))
    for src, shp in ((a, sa), (b, sb)):
        off = len(os_) - len(shp)
        for d in range(len(shp) - 2):
            if shp[d] == os_[d + off] and shp[d] != 1:
                rule.links.append(((src, None), d, out, d + off))
    return rule


@dim_rule("outer", tensor_input=False)
def _outer(node: fx.Node, name: str) -> Rule | None:
    out = (node, None)
    a, b = node.args[0], node.args[1]
    return Rule(links=[((a, None), 0, out, 0), ((b, None), 0, out, 1)])


@dim_rule("einsum", tensor_input=False)
def _einsum(node: fx.Node, name: str) -> Rule | None:
    args, out, rule = node.args, (node, None), Rule()
    eq = args[0].replace(" ", "")
    ops = args[1:] if len(args) > 2 or not isinstance(args[1], (list, tuple)) else args[1]
    lhs, _, rhs = eq.partition("->")
    if "..." in eq or not rhs:
        return None
    for spec, a in zip(lhs.split(","), ops):
        for d, ch in enumerate(spec):
            if ch in rhs:
                rule.links.append(((a, None), d, out, rhs.index(ch)))
    return rule


# -- dim moves and reshapes

def _permutation(node: fx.Node, name: str, nd: int) -> list[int]:
    """perm[d] = the input dim that output dim d comes from."""
    args = node.args
    if name == "t":
        return [1, 0] if nd == 2 else list(range(nd))
    if name == "permute":
        dims = args[1:] if len(args) > 2 or isinstance(args[1], int) else args[1]
        dims = dims if dims else node.kwargs.get("dims")
        return [_norm_dim(int(d), nd) for d in dims]
    if name in ("movedim", "moveaxis"):
        src = node_arg(node, 1, "source")
        dst = node_arg(node, 2, "destination")
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src = [_norm_dim(s, nd) for s in src]
        dst = [_norm_dim(d, nd) for d in dst]
        rest = [d for d in range(nd) if d not in src]
        perm = [None] * nd
        for s, d in zip(src, dst):
            perm[d] = s
        it = iter(rest)
        return [p if p is not None else next(it) for p in perm]
    d0 = _norm_dim(int(node_arg(node, 1, "dim0")), nd)
    d1 = _norm_dim(int(node_arg(node, 2, "dim1")), nd)
    perm = list(range(nd))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return perm


@dim_rule(*PERMUTES)
def _permute(node: fx.Node, name: str) -> Rule | None:
    x, xs, _ = _io(node)
    perm = _permutation(node, name, len(xs))
    return Rule(links=[((x, None), p, (node, None), d) for d, p in enumerate(perm)])


@dim_rule(*RESHAPES)
def _reshape(node: fx.Node, name: str) -> Rule | None:
    x, xs, os_ = _io(node)
    out, rule = (node, None), Rule()
    if os_ is None:
        return None
    groups = reshape_groups(xs, os_)
    if groups is None:
        return None
    for gi, gj in groups:
        if len(gi) == 1 and len(gj) == 1:
            rule.links.append(((x, None), gi[0], out, gj[0]))
        elif len(gi) > 1 and len(gj) == 1 and xs[gi[-1]] > 1:
            # [.., B, L, ..] -> [.., B*L, ..]: the merged dim is B segments, each one whole copy of L's
            # space (a sharded L then stays sharded: the local merged dim is [B, L_local] flattened)
            count = 1
            for d in gi[:-1]:
                count *= xs[d]
            rule.flattens.append(((x, None), gi[-1], count, out, gj[0]))
        elif len(gi) == 1 and len(gj) > 1 and os_[gj[-1]] > 1:
            count = 1
            for d in gj[:-1]:
                count *= os_[d]
            rule.unflattens.append(((x, None), gi[0], count, out, gj[-1]))
        if len(gi) != len(gj) and gi and gj and (len(gi) == 1 or len(gj) == 1):
            rule.grids.append(((x, None), list(gi), out, list(gj)))
    if name in ("view_as", "reshape_as") and _is_tensor_node(node.args[1]):
        rule.links += [((node.args[1], None), d, out, d) for d in range(len(os_))]
    return rule


@dim_rule("unsqueeze", "squeeze")
def _unsqueeze(node: fx.Node, name: str) -> Rule | None:
    x, xs, os_ = _io(node)
    out, rule = (node, None), Rule()
    if os_ is None:
        return None
    groups = reshape_groups(xs, os_)
    for gi, gj in groups or []:
        if len(gi) == 1 and len(gj) == 1:
            rule.links.append(((x, None), gi[0], out, gj[0]))
    return rule


@dim_rule(*EXPANDS, "repeat")
def _expand(node: fx.Node, name: str) -> Rule | None:
    x, xs, os_ = _io(node)
    out, rule = (node, None), Rule()
    if os_ is None:
        return None
    off = len(os_) - len(xs)
    for d, s in enumerate(xs):
        if s == os_[d + off] and s != 1:
            rule.links.append(((x, None), d, out, d + off))
    if name == "expand_as" and _is_tensor_node(node.args[1]):
        rule.links += [((node.args[1], None), d, out, d) for d in range(len(os_))]
    return rule


# -- reductions and ops along one dim

@dim_rule(*REDUCTIONS, "max", "min")
def _reduction(node: fx.Node, name: str) -> Rule | None:
    x, xs, _ = _io(node)
    out, rule = (node, None), Rule()
    if name in ("max", "min") and _is_tensor_node(node_arg(node, 1, "other")):
        _broadcast_links(rule, [a for a in node.args if _is_tensor_node(a)], out)
        return rule
    pos = 2 if name == "norm" else 1  # x.norm(p, dim, keepdim)
    dim = node_arg(node, pos, "dim")
    if dim is None:
        return None  # a full reduction: nothing survives
    keepdim = bool(node_arg(node, pos + 1, "keepdim", False))
    nd = len(xs)
    dims = _dims(dim, nd)
    outs = [out] if name not in ("max", "min") else [(node, 0), (node, 1)]
    for o in outs:
        od = 0
        for d in range(nd):
            if d in dims:
                od += 1 if keepdim else 0
                continue
            rule.links.append(((x, None), d, o, od))
            od += 1
    return rule


def _along_dim_arg(node: fx.Node, name: str) -> Any:
    if name == "repeat_interleave":
        return node_arg(node, 2, "dim")
    if name == "roll":
        return node_arg(node, 2, "dims")
    if name == "flip":
        return node_arg(node, 1, "dims")
    if name == "normalize":
        return node_arg(node, 2, "dim", 1)  # F.normalize(x, p, dim)
    return node_arg(node, 1, "dim", -1 if name in ("sort", "argsort", "softmax", "log_softmax") else None)


@dim_rule(*ALONG_DIM)
def _along_dim(node: fx.Node, name: str) -> Rule | None:
    x, xs, _ = _io(node)
    rule = Rule()
    nd = len(xs)
    dim = _along_dim_arg(node, name)
    if dim is None:
        return None
    dims = _dims(dim, nd)
    outs = [(node, None)] if name != "sort" else [(node, 0), (node, 1)]
    for o in outs:
        rule.links += [((x, None), d, o, d) for d in range(nd) if d not in dims]
    return rule


# -- concatenation, splits and slices

@dim_rule(*CONCATS, "stack", tensor_input=False)
def _concat(node: fx.Node, name: str) -> Rule | None:
    out, rule = (node, None), Rule()
    os_ = slot_shape(out)
    tensors = node_arg(node, 0, "tensors")
    if not isinstance(tensors, (list, tuple)) or os_ is None:
        return None
    dim = _norm_dim(int(node_arg(node, 1, "dim", 0)), len(os_))
    tensors = [t for t in tensors if _is_tensor_node(t)]
    if name == "stack":
        for t in tensors:
            for d in range(len(os_) - 1):
                rule.links.append(((t, None), d, out, d if d < dim else d + 1))
        return rule
    parts = [t for t in tensors if slot_shape((t, None)) and slot_shape((t, None))[dim] > 0]
    # an empty piece along the cat dim (RoPE on all of the head dim: x[..., rot:] is empty) still shares
    # the other dims with the output
    for t in [t for t in tensors if slot_shape((t, None)) and len(slot_shape((t, None))) == len(os_)]:
        for d in range(len(os_)):
            if d != dim:
                rule.links.append(((t, None), d, out, d))
    rule.concat.append((out, dim, [((t, None), dim) for t in parts]))
    return rule


@dim_rule(*SPLITS)
def _split(node: fx.Node, name: str) -> Rule | None:
    x, xs, _ = _io(node)
    rule = Rule()
    nd = len(xs)
    dim = _norm_dim(int(node_arg(node, 2 if name != "unbind" and name != "chunk" else 1, "dim", 0)), nd)
    if name == "chunk":
        dim = _norm_dim(int(node_arg(node, 2, "dim", 0)), nd)
    if name == "unbind":
        dim = _norm_dim(int(node_arg(node, 1, "dim", 0)), nd)
    value = example_value(node)
    if not isinstance(value, (list, tuple)):
        return None
    start = 0
    for i, piece in enumerate(value):
        ps = _shape(piece)
        if ps is None:
            return None
        o = (node, i)
        if name == "unbind":
            rule.links += [((x, None), d, o, d if d < dim else d - 1) for d in range(nd) if d != dim]
            continue
        rule.links += [((x, None), d, o, d) for d in range(nd) if d != dim]
        rule.selects.append(((x, None), dim, start, start + ps[dim], o, dim))
        start += ps[dim]
    return rule


@dim_rule("narrow")
def _narrow(node: fx.Node, name: str) -> Rule | None:
    x, xs, _ = _io(node)
    out, rule, args = (node, None), Rule(), node.args
    nd = len(xs)
    dim = _norm_dim(int(args[1]), nd)
    start, length = int(args[2]), int(args[3])
    rule.links += [((x, None), d, out, d) for d in range(nd) if d != dim]
    rule.selects.append(((x, None), dim, start, start + length, out, dim))
    return rule


@dim_rule("select")
def _select(node: fx.Node, name: str) -> Rule | None:
    x, xs, _ = _io(node)
    nd = len(xs)
    dim = _norm_dim(int(node.args[1]), nd)
    return Rule(links=[((x, None), d, (node, None), d if d < dim else d - 1) for d in range(nd) if d != dim])


# -- complex views, convolutions, padding

@dim_rule("view_as_complex", "view_as_real")
def _view_complex(node: fx.Node, name: str) -> Rule | None:
    x, xs, os_ = _io(node)
    nd = min(len(xs), len(os_))
    last = 1 if name == "view_as_complex" else 0
    return Rule(links=[((x, None), d, (node, None), d) for d in range(nd - last) if d < len(xs) - last])


@dim_rule("conv1d", "conv2d", "conv3d")
def _conv(node: fx.Node, name: str) -> Rule | None:
    # [B, C, *spatial]: the batch and every spatial dim the conv keeps the size of (stride 1, 'same'
    # padding) index the same positions; a kernel wider than 1 along a sharded dim needs a halo
    x, xs, os_ = _io(node)
    out, rule = (node, None), Rule()
    if os_ is None or len(xs) != len(os_) or len(xs) < 3:
        return None
    rule.links.append(((x, None), 0, out, 0))
    for d in range(2, len(xs)):
        if xs[d] == os_[d]:
            rule.links.append(((x, None), d, out, d))
    return rule


@dim_rule("pad")
def _pad(node: fx.Node, name: str) -> Rule | None:
    x, xs, _ = _io(node)
    pad = node_arg(node, 1, "pad")
    nd = len(xs)
    padded = {nd - 1 - i // 2 for i, p in enumerate(pad) if p}
    return Rule(links=[((x, None), d, (node, None), d) for d in range(nd) if d not in padded])


#: op name -> dim rule; read-only
RULES: Mapping[str, DimRule] = MappingProxyType(_table)
