"""Which dim of which tensor is a token sequence: dim-correspondence rules and a union-find over dims.

Every op rule says which output dims index the *same things* as which input dims (a linear keeps every
dim but the last; a transpose moves them; an elementwise op keeps aligned dims of equal size). Joining
those dims with a union-find gives *token spaces*: sets of (tensor, dim) that all index one sequence.
A concatenation along a dim makes a *composite* space whose segments are the input spaces (Flux's
``cat([text, image])``); slicing or splitting a composite at segment boundaries gives a segment back.

Nothing here rewrites the graph. ``shard_sequence`` reads the result: spaces that are the query *and*
key sequence of some attention (self or joint attention) are sharded; everything linked to them follows.
An op without a rule links nothing, so a sharded input reaching it is gathered first: always correct,
reported as a fallback gather.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx

from xdit_fx.compiler.fx_utils import example_value, sdpa_args

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


def _arg(node: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


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
            groups.append(([i], [])); i += 1; continue
        if j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
            groups.append(([], [j])); j += 1; continue
        if i >= len(src) or j >= len(dst):
            return None
        gi, gj = [i], [j]
        pi, pj = src[i], dst[j]
        i += 1; j += 1
        while pi != pj:
            if pi < pj:
                if i >= len(src):
                    return None
                pi *= src[i]; gi.append(i); i += 1
            else:
                if j >= len(dst):
                    return None
                pj *= dst[j]; gj.append(j); j += 1
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


def rule_for(node: fx.Node) -> Rule | None:
    """The dim rule of one node, or None when xdit_fx knows no rule for its op."""
    name = op_name(node)
    if name is None:
        return None
    out = (node, None)
    rule = Rule()
    args = node.args
    x = args[0] if args else None

    if name == "getitem":
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

    if name == "setitem":  # x[index] = value, in place: x's indexed dims meet value's dims
        x, index, value = args[0], args[1], args[2]
        if not _is_tensor_node(x):
            return None
        view = Rule()
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

    if name == "scaled_dot_product_attention":
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

    if name in ELEMENTWISE or name in DTYPE_FROM_SECOND:
        if slot_shape(out) is None:
            return None
        ins = [a for a in list(args) + list(node.kwargs.values()) if _is_tensor_node(a)]
        if name in DTYPE_FROM_SECOND:
            rule.ignore.update((a, None) for a in ins[1:])
            ins = ins[:1]
        _broadcast_links(rule, ins, out)
        return rule

    if not _is_tensor_node(x) and name not in CONCATS and name not in ("stack", "outer", "einsum", "where"):
        return None
    xs = slot_shape((x, None)) if _is_tensor_node(x) else None
    os_ = slot_shape(out)

    if name == "linear":
        rule.links += [((x, None), d, out, d) for d in range(len(xs) - 1)]
        return rule
    if name in ("layer_norm", "rms_norm"):
        ns = _arg(node, 1, "normalized_shape")
        k = len(ns) if isinstance(ns, (tuple, list)) else 1
        rule.links += [((x, None), d, out, d) for d in range(len(xs) - k)]
        return rule
    if name == "group_norm":
        rule.links.append(((x, None), 0, out, 0))
        return rule
    if name in ("matmul", "bmm", "baddbmm") or (name == "matmul" and node.op == "call_function"):
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
    if name == "outer":
        a, b = args[0], args[1]
        rule.links += [((a, None), 0, out, 0), ((b, None), 0, out, 1)]
        return rule
    if name == "einsum":
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

    if name in PERMUTES:
        nd = len(xs)
        if name == "t":
            perm = [1, 0] if nd == 2 else list(range(nd))
        elif name == "permute":
            dims = args[1:] if len(args) > 2 or isinstance(args[1], int) else args[1]
            dims = dims if dims else node.kwargs.get("dims")
            perm = [_norm_dim(int(d), nd) for d in dims]
        elif name in ("movedim", "moveaxis"):
            src = _arg(node, 1, "source"); dst = _arg(node, 2, "destination")
            src = [src] if isinstance(src, int) else list(src)
            dst = [dst] if isinstance(dst, int) else list(dst)
            src = [_norm_dim(s, nd) for s in src]; dst = [_norm_dim(d, nd) for d in dst]
            rest = [d for d in range(nd) if d not in src]
            perm = [None] * nd
            for s, d in zip(src, dst):
                perm[d] = s
            it = iter(rest)
            perm = [p if p is not None else next(it) for p in perm]
        else:
            d0 = _norm_dim(int(_arg(node, 1, "dim0")), nd); d1 = _norm_dim(int(_arg(node, 2, "dim1")), nd)
            perm = list(range(nd)); perm[d0], perm[d1] = perm[d1], perm[d0]
        rule.links += [((x, None), p, out, d) for d, p in enumerate(perm)]
        return rule

    if name in RESHAPES:
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
        if name in ("view_as", "reshape_as") and _is_tensor_node(args[1]):
            rule.links += [((args[1], None), d, out, d) for d in range(len(os_))]
        return rule

    if name in ("unsqueeze", "squeeze"):
        if os_ is None:
            return None
        groups = reshape_groups(xs, os_)
        for gi, gj in groups or []:
            if len(gi) == 1 and len(gj) == 1:
                rule.links.append(((x, None), gi[0], out, gj[0]))
        return rule

    if name in EXPANDS or name == "repeat":
        if os_ is None:
            return None
        off = len(os_) - len(xs)
        for d, s in enumerate(xs):
            if s == os_[d + off] and s != 1:
                rule.links.append(((x, None), d, out, d + off))
        if name == "expand_as" and _is_tensor_node(args[1]):
            rule.links += [((args[1], None), d, out, d) for d in range(len(os_))]
        return rule

    if name in ("max", "min") and _is_tensor_node(_arg(node, 1, "other")):
        _broadcast_links(rule, [a for a in args if _is_tensor_node(a)], out)
        return rule
    if name in REDUCTIONS or name in ("max", "min"):
        pos = 2 if name == "norm" else 1  # x.norm(p, dim, keepdim)
        dim = _arg(node, pos, "dim")
        if dim is None:
            return None  # a full reduction: nothing survives
        keepdim = bool(_arg(node, pos + 1, "keepdim", False))
        nd = len(xs)
        dims = {_norm_dim(int(d), nd) for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
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

    if name in ALONG_DIM:
        nd = len(xs)
        if name == "repeat_interleave":
            dim = _arg(node, 2, "dim")
        elif name == "roll":
            dim = _arg(node, 2, "dims")
        elif name == "flip":
            dim = _arg(node, 1, "dims")
        elif name == "normalize":
            dim = _arg(node, 2, "dim", 1)  # F.normalize(x, p, dim)
        else:
            dim = _arg(node, 1, "dim", -1 if name in ("sort", "argsort", "softmax", "log_softmax") else None)
        if dim is None:
            return None
        dims = {_norm_dim(int(d), nd) for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
        outs = [out] if name != "sort" else [(node, 0), (node, 1)]
        for o in outs:
            rule.links += [((x, None), d, o, d) for d in range(nd) if d not in dims]
        return rule

    if name in CONCATS or name == "stack":
        tensors = _arg(node, 0, "tensors")
        if not isinstance(tensors, (list, tuple)) or os_ is None:
            return None
        dim = _norm_dim(int(_arg(node, 1, "dim", 0)), len(os_))
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

    if name in SPLITS:
        nd = len(xs)
        dim = _norm_dim(int(_arg(node, 2 if name != "unbind" and name != "chunk" else 1, "dim", 0)), nd)
        if name == "chunk":
            dim = _norm_dim(int(_arg(node, 2, "dim", 0)), nd)
        if name == "unbind":
            dim = _norm_dim(int(_arg(node, 1, "dim", 0)), nd)
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

    if name in ("narrow",):
        nd = len(xs)
        dim = _norm_dim(int(args[1]), nd)
        start, length = int(args[2]), int(args[3])
        rule.links += [((x, None), d, out, d) for d in range(nd) if d != dim]
        rule.selects.append(((x, None), dim, start, start + length, out, dim))
        return rule
    if name == "select":
        nd = len(xs)
        dim = _norm_dim(int(args[1]), nd)
        rule.links += [((x, None), d, out, d if d < dim else d - 1) for d in range(nd) if d != dim]
        return rule
    if name in ("view_as_complex", "view_as_real"):
        nd = min(len(xs), len(os_))
        rule.links += [((x, None), d, out, d) for d in range(nd - (1 if name == "view_as_complex" else 0))
                       if d < len(xs) - (1 if name == "view_as_complex" else 0)]
        return rule
    if name in ("conv1d", "conv2d", "conv3d"):
        # [B, C, *spatial]: the batch and every spatial dim the conv keeps the size of (stride 1, 'same'
        # padding) index the same positions; a kernel wider than 1 along a sharded dim needs a halo
        if os_ is None or len(xs) != len(os_) or len(xs) < 3:
            return None
        rule.links.append(((x, None), 0, out, 0))
        for d in range(2, len(xs)):
            if xs[d] == os_[d]:
                rule.links.append(((x, None), d, out, d))
        return rule
    if name == "pad":
        pad = _arg(node, 1, "pad")
        nd = len(xs)
        padded = {nd - 1 - i // 2 for i, p in enumerate(pad) if p}
        rule.links += [((x, None), d, out, d) for d in range(nd) if d not in padded]
        return rule
    return None


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
    selects: list[tuple[DimSlot, int, int, DimSlot]] = []
    concats: list[tuple[DimSlot, list[DimSlot]]] = []
    unflattens: list[tuple[DimSlot, int, DimSlot]] = []
    flattens: list[tuple[DimSlot, int, DimSlot]] = []
    seq_dims: list[DimSlot] = []  # query and key sequence dims of every attention
    for node in graph.nodes:
        if op_name(node) == "scaled_dot_product_attention":
            sa = sdpa_args(node)
            for t in (sa["query"], sa["key"]):
                shp = slot_shape((t, None)) if isinstance(t, fx.Node) else None
                if shp and len(shp) >= 2:
                    seq_dims.append((t, None, len(shp) - 2))
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        try:
            rule = rule_for(node)
        except (TypeError, ValueError, IndexError, AttributeError):
            rule = None
        td.rules[node] = rule
        if rule is None:
            continue
        good = []
        for (si, di, so, do) in rule.links:
            a, b = (si[0], si[1], di), (so[0], so[1], do)
            if a in td.parent and b in td.parent and td.size[a] == td.size[b]:
                good.append((si, di, so, do))
        rule.links = good
        for (si, di, so, do) in rule.links:
            td.union((si[0], si[1], di), (so[0], so[1], do))
        for (so, do, parts) in rule.concat:
            concats.append(((so[0], so[1], do), [(s[0], s[1], d) for s, d in parts]))
        for (si, di, start, stop, so, do) in rule.selects:
            selects.append(((si[0], si[1], di), start, stop, (so[0], so[1], do)))
        for (si, di, count, so, do) in rule.unflattens:
            unflattens.append(((si[0], si[1], di), count, (so[0], so[1], do)))
        for (si, di, count, so, do) in rule.flattens:
            flattens.append(((si[0], si[1], di), count, (so[0], so[1], do)))
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
    # segment selections resolve once composites are known; repeat until nothing changes
    changed = True
    while changed:
        changed = False
        seq_roots = set()
        for ds in seq_dims:
            if ds in td.parent:
                seq_roots.update(td.segments(ds))
        for src, count, out in flattens:
            root = td.find(out)
            if td.find(src) in seq_roots and root not in seq_roots and root not in td.composite:
                td.composite[root] = [src] * count
                changed = True
        for src, count, out in unflattens:
            rep = repeated_space(td, src, count)
            if rep is not None:
                changed |= td.union(rep, out)
        for src, start, stop, out in selects:
            picked = select_segments(td, src, start, stop)
            if picked is None:
                continue
            if len(picked) == 1:
                changed |= td.union(picked[0], out)
            elif td.find(out) not in td.composite:
                td.composite[td.find(out)] = picked
                changed = True
    return td


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
