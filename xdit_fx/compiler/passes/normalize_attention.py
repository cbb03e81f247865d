"""normalize_attention: rewrite attention that is not written as SDPA into a scaled_dot_product_attention node.

Two forms, both recognised from the graph alone (no module or class names):

* hand-written attention: ``matmul(q, k^T)`` (``@``, ``torch.matmul``, ``bmm``, or ``baddbmm(bias, q, k^T,
  beta, alpha)``) -> optional scaling by constants -> optional mask (``+ mask`` or ``masked_fill(cond, -inf)``)
  -> ``softmax(dim=-1)`` (optionally between dtype-preserving casts) -> optional dropout that is off
  (``training=False`` or ``p=0``) -> ``matmul(probs, v)``.  It becomes ``sdpa(q, k, v, attn_mask, scale)``
  when the probabilities have no other use.
* ``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` is captured as): in-projection,
  head split, SDPA, head merge, out-projection, as plain ops (packed or separate projection weights,
  key-padding and 2-D attention masks, ``is_causal``).  Only when the attention weights it returns are
  not used.

After the rewrite the attention is an ordinary site for ``find_attention`` and everything downstream
(token dims, Ulysses / ring).  New nodes carry the fake values, module path and source line of the nodes
they replace.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from xdit_fx.compiler.fx_utils import example_value, node_arg
from xdit_fx.compiler.passes.base import PassContext, PassResult, graph_pass
from xdit_fx.compiler.passes.flex_attention import normalize_flex
from xdit_fx.compiler.passes.library_attention import normalize_library
from xdit_fx.compiler.passes.node_builder import Builder as _Builder

_MATMUL = {operator.matmul, torch.matmul, torch.bmm}
_SOFTMAX = {torch.softmax, F.softmax}
_SDPA = F.scaled_dot_product_attention


def _is(node: Any, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _is_method(node: Any, *names: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def _ndim(node: Any) -> int | None:
    v = example_value(node)
    return v.dim() if isinstance(v, torch.Tensor) else None


def _dtype(node: Any):
    v = example_value(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _swaps_last_two(node: fx.Node) -> bool:
    """transpose(-2, -1) / transpose(1, 2) on 3-D / .mT / permute swapping only the last two dims."""
    nd = _ndim(node.args[0]) if node.args else None
    if nd is None:
        return False
    if _is_method(node, "transpose") or _is(node, {torch.transpose}):
        a, b = (node.args[1], node.args[2]) if len(node.args) >= 3 else (None, None)
        if not isinstance(a, int) or not isinstance(b, int):
            return False
        return {a % nd, b % nd} == {nd - 2, nd - 1}
    if _is_method(node, "permute") or _is(node, {torch.permute}):
        dims = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (list, tuple)) else node.args[1]
        dims = [d % nd for d in dims]
        return dims == list(range(nd - 2)) + [nd - 1, nd - 2]
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2 and node.args[1] == "mT":
        return True
    return False


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_identity_cast(node: fx.Node) -> bool:
    """.float() / .to(dtype) / .type_as(x) that does not change the dtype (fp32 graphs)."""
    if not (_is_method(node, "float", "to", "type_as", "type") or _is(node, {torch.Tensor.to})):
        return False
    src = node.args[0] if node.args else None
    return _dtype(src) is not None and _dtype(src) == _dtype(node) and example_value(src).shape == example_value(node).shape


def _scalar(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


# ------------------------------------------------------------------------------------------------
# hand-written softmax(q k^T) v
# ------------------------------------------------------------------------------------------------


def _match_manual(scores: fx.Node) -> dict | None:
    """`scores` is a matmul/bmm/baddbmm node; follow its single-user chain to the value matmul."""
    mask, bias = None, None
    if _is(scores, {torch.baddbmm}) or _is_method(scores, "baddbmm"):
        bias, q, kt = scores.args[0], scores.args[1], scores.args[2]
        beta, alpha = _scalar(scores.kwargs.get("beta", 1)), _scalar(scores.kwargs.get("alpha", 1))
        if beta is None or alpha is None:
            return None
        scale = alpha
        if beta == 0:
            bias = None
        elif beta != 1 or not isinstance(bias, fx.Node):
            return None
        mask = bias
    elif _is(scores, _MATMUL) or _is_method(scores, "matmul", "bmm"):
        q, kt = scores.args[0], scores.args[1]
        scale = 1.0
    else:
        return None
    if not isinstance(q, fx.Node) or not isinstance(kt, fx.Node) or _ndim(q) is None or _ndim(q) < 3:
        return None
    if _ndim(kt) != _ndim(q):
        return None
    chain = [scores]
    cur = scores
    # constant scaling (before any mask)
    while True:
        nxt = _single_user(cur)
        if nxt is None:
            return None
        if mask is None and (_is(nxt, {operator.mul, torch.mul}) or _is_method(nxt, "mul")) and nxt.args[0] is cur:
            s = _scalar(nxt.args[1])
        elif mask is None and (_is(nxt, {operator.mul, torch.mul})) and nxt.args[1] is cur:
            s = _scalar(nxt.args[0])
        elif mask is None and (_is(nxt, {operator.truediv, torch.div}) or _is_method(nxt, "div")) and nxt.args[0] is cur:
            s = _scalar(nxt.args[1])
            s = None if not s else 1.0 / s
        else:
            break
        if s is None:
            return None
        scale *= s
        chain.append(nxt)
        cur = nxt
    nxt = _single_user(cur)
    # mask: + tensor, or masked_fill(cond, -inf / very negative)
    if mask is None and nxt is not None and (_is(nxt, {operator.add, torch.add}) or _is_method(nxt, "add")):
        other = nxt.args[1] if nxt.args[0] is cur else nxt.args[0]
        if not isinstance(other, fx.Node) or len(nxt.args) > 2 or nxt.kwargs:
            return None
        mask = other
        chain.append(nxt)
        cur, nxt = nxt, _single_user(nxt)
    elif mask is None and nxt is not None and _is_method(nxt, "masked_fill") and nxt.args[0] is cur:
        cond, value = nxt.args[1], _scalar(nxt.args[2])
        if not isinstance(cond, fx.Node) or value is None or not (value == -math.inf or value < -1e30):
            return None
        mask = ("keep_not", cond)
        chain.append(nxt)
        cur, nxt = nxt, _single_user(nxt)
    while nxt is not None and _is_identity_cast(nxt):
        chain.append(nxt)
        cur, nxt = nxt, _single_user(nxt)
    if nxt is None or not (_is(nxt, _SOFTMAX) or _is_method(nxt, "softmax")) or nxt.args[0] is not cur:
        return None
    dim = node_arg(nxt, 1, "dim")
    if not isinstance(dim, int) or dim % _ndim(cur) != _ndim(cur) - 1 or _dtype(nxt) != _dtype(cur):
        return None
    chain.append(nxt)
    cur, nxt = nxt, _single_user(nxt)
    while nxt is not None and (_is_identity_cast(nxt) or (
            _is(nxt, {F.dropout, torch.dropout}) and (node_arg(nxt, 2, "training", True) is False or node_arg(nxt, 1, "p", 0.5) == 0))):
        chain.append(nxt)
        cur, nxt = nxt, _single_user(nxt)
    if nxt is None or not (_is(nxt, _MATMUL) or _is_method(nxt, "matmul", "bmm")) or nxt.args[0] is not cur:
        return None
    v = nxt.args[1]
    if not isinstance(v, fx.Node) or _ndim(v) != _ndim(q):
        return None
    return {"q": q, "kt": kt, "v": v, "scale": scale, "mask": mask, "chain": chain, "out": nxt}


def _rewrite_manual(gm: fx.GraphModule, m: dict) -> fx.Node:
    out = m["out"]
    b = _Builder(gm, out, like=m["chain"][-1])
    kt = m["kt"]
    k = kt.args[0] if _swaps_last_two(kt) else b.method("transpose", kt, -2, -1)
    q, v, mask = m["q"], m["v"], m["mask"]
    if isinstance(mask, tuple):
        mask = b.fn(torch.logical_not, mask[1])
    folded = _ndim(q) == 3  # bmm over [batch * heads, L, D]: give SDPA the [B, H, L, D] form with B = 1
    if folded:
        q, k, v = (b.method("unsqueeze", t, 0) for t in (q, k, v))
        if mask is not None and _ndim(mask) == 3:
            mask = b.method("unsqueeze", mask, 0)
    sdpa = b.fn(_SDPA, q, k, v, attn_mask=mask, scale=m["scale"])
    result = b.method("squeeze", sdpa, 0) if folded else sdpa
    out.replace_all_uses_with(result)
    for n in reversed([*m["chain"], out]):
        if not n.users:
            gm.graph.erase_node(n)
    if kt.op != "placeholder" and not kt.users:
        gm.graph.erase_node(kt)
    return sdpa


# ------------------------------------------------------------------------------------------------
# F.multi_head_attention_forward (nn.MultiheadAttention)
# ------------------------------------------------------------------------------------------------

_MHA_PARAMS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
               "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias")


def _mha_args(node: fx.Node) -> dict:
    a = dict(zip(_MHA_PARAMS, node.args))
    a.update(node.kwargs)
    return a


def _rewrite_mha(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    a = _mha_args(node)
    users = list(node.users)
    if not all(_is(u, {operator.getitem}) for u in users) or any(u.args[1] != 0 and u.users for u in users):
        return None  # the attention weights are used
    if a.get("bias_k") is not None or a.get("bias_v") is not None or a.get("add_zero_attn"):
        return None
    if a.get("training", True) and a.get("dropout_p", 0.0):
        return None
    q_in, k_in, v_in = a["query"], a["key"], a["value"]
    if _ndim(q_in) != 3 or _ndim(k_in) != 3:
        return None  # unbatched form
    heads = a["num_heads"]
    e = example_value(q_in).shape[-1]
    d = e // heads
    kpm, attn_mask = a.get("key_padding_mask"), a.get("attn_mask")
    if attn_mask is not None and _ndim(attn_mask) != 2:
        return None
    outs = [u for u in users if u.args[1] == 0]
    anchor = outs[0] if outs else node
    b = _Builder(gm, node, like=node)
    if a.get("use_separate_proj_weight", False):
        ws = [a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]]
        bias = a.get("in_proj_bias")
        bs = [None if bias is None else b.fn(operator.getitem, bias, slice(i * e, (i + 1) * e)) for i in range(3)]
    else:
        w, bias = a["in_proj_weight"], a.get("in_proj_bias")
        ws = [b.fn(operator.getitem, w, slice(i * e, (i + 1) * e)) for i in range(3)]
        bs = [None if bias is None else b.fn(operator.getitem, bias, slice(i * e, (i + 1) * e)) for i in range(3)]

    def heads_first(x, w_, b_):  # [L, B, E] -> [B, H, L, D]
        xb = b.method("transpose", x, 0, 1)
        y = b.fn(F.linear, xb, w_, b_)
        n, length = example_value(y).shape[0], example_value(y).shape[1]
        return b.method("transpose", b.method("view", y, n, length, heads, d), 1, 2)

    q, k, v = heads_first(q_in, ws[0], bs[0]), heads_first(k_in, ws[1], bs[1]), heads_first(v_in, ws[2], bs[2])
    bsz, lq, lk = example_value(q).shape[0], example_value(q).shape[2], example_value(k).shape[2]
    mask = None

    def as_additive(m, shape):  # bool (True = masked) or float (added) -> float additive
        if _dtype(m) == torch.bool:
            m = b.fn(torch.where, m, -math.inf, 0.0)
        return b.method("view", m, *shape)

    if kpm is not None:
        mask = as_additive(kpm, (bsz, 1, 1, lk))
    if attn_mask is not None:
        am = as_additive(attn_mask, (1, 1, lq, lk))
        mask = am if mask is None else b.fn(operator.add, mask, am)
    sdpa = b.fn(_SDPA, q, k, v, attn_mask=mask, is_causal=bool(a.get("is_causal", False)) and mask is None)
    merged = b.method("reshape", b.method("transpose", sdpa, 1, 2), bsz, lq, e)
    proj = b.fn(F.linear, merged, a["out_proj_weight"], a.get("out_proj_bias"))
    out = b.method("transpose", proj, 0, 1)
    for u in users:
        if u.args[1] == 0:
            u.replace_all_uses_with(out)
        gm.graph.erase_node(u)
    gm.graph.erase_node(node)
    del anchor
    return sdpa


@graph_pass()
def normalize_attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Rewrite hand-written softmax(q @ k^T) @ v attention and nn.MultiheadAttention into SDPA nodes.

    Runs first, so every later pass sees attention in one form: a scaled_dot_product_attention node.
    """
    manual = mha = 0
    library = normalize_library(gm, ctx)  # flash-attn, xformers (library_attention.py)
    flex = normalize_flex(gm, ctx)  # flex_attention (flex_attention.py)
    if flex:
        library["flex_attention"] = flex
    for node in list(gm.graph.nodes):
        if getattr(node, "_erased", False):
            continue
        if _is(node, {F.multi_head_attention_forward}):
            if _rewrite_mha(gm, node) is not None:
                mha += 1
            continue
        if _is(node, _MATMUL | {torch.baddbmm}) or _is_method(node, "matmul", "bmm", "baddbmm"):
            m = _match_manual(node)
            if m is not None:
                _rewrite_manual(gm, m)
                manual += 1
    n = manual + mha + sum(library.values())
    summary = (f"{manual} hand-written attention, {mha} nn.MultiheadAttention"
               + "".join(f", {c} {what}" for what, c in library.items()) + " -> scaled_dot_product_attention"
               if n else "no attention outside SDPA")
    return PassResult(gm, changed=bool(n), summary=summary,
                      counts={"normalized_attention": n, "library_attention": sum(library.values())})
