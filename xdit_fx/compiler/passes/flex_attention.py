"""flex_attention sites rewritten into scaled_dot_product_attention nodes (part of normalize_attention).

Dynamo captures ``torch.nn.attention.flex_attention.flex_attention`` as the higher-order operator
``torch.ops.higher_order.flex_attention(q, k, v, score_mod, block_mask, scale, kernel_options,
score_mod_buffers, mask_mod_buffers)``: the score_mod and the block mask's mask_mod are sub-GraphModules, the
block mask a tuple of tensors computed in the graph. The call becomes SDPA over the same q, k, v with an
``attn_mask`` computed in the graph by `xdit_fx.ops.flex.flex_dense_mask` over the whole sequence's
positions (the block structure, mask_mod, and score_mod as an additive bias), so every later pass sees an
ordinary masked attention site: Ulysses, ring and PipeFusion re-index that mask to each rank's queries and
keys, which re-expresses the mods over global token positions. Only under a plan that splits the sequence
(sequence parallel, PipeFusion): the dense mask costs [B, H, Lq, Lk] memory and SDPA in place of flex's
kernel, so cfg and dp plans keep the call as it is.

Left as it is, with the reason (a plan that splits the sequence refuses it, naming the node):

* a score_mod that is not ``score + f(b, h, q_idx, kv_idx)`` (soft-capping, a multiplied score): SDPA has
  no hook for it and a dense bias cannot hold it;
* a call whose log-sum-exp (or max) is used.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from xdit_fx.compiler.fx_utils import example_value, target_name

_SDPA = F.scaled_dot_product_attention
_ADD = {operator.add, torch.add, operator.iadd}
_SUB = {operator.sub, torch.sub, operator.isub}


def is_flex(node: fx.Node) -> bool:
    hop = getattr(torch.ops.higher_order, "flex_attention", None)
    return node.op == "call_function" and hop is not None and node.target is hop


def _submodule(gm: fx.GraphModule, node: Any):
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return gm.get_submodule(node.target)
    return None


def score_mod_kind(mod: fx.GraphModule | None) -> str | None:
    """'identity' (returns the score), 'additive' (score + f(b, h, q, kv)), or None (anything else)."""
    if mod is None:
        return None
    nodes = list(mod.graph.nodes)
    score = next((n for n in nodes if n.op == "placeholder"), None)
    out = next((n for n in nodes if n.op == "output"), None)
    if score is None or out is None:
        return None
    result = out.args[0]
    if isinstance(result, (tuple, list)):
        result = result[0] if len(result) == 1 else None
    if result is score:
        return "identity"
    users = list(score.users)
    if len(users) != 1 or users[0] is not result:
        return None
    u = users[0]
    if u.op == "call_function" and u.target in _ADD or u.op == "call_method" and u.target == "add":
        return "additive" if list(u.args[:2]).count(score) == 1 and "alpha" not in u.kwargs else None
    if u.op == "call_function" and u.target in _SUB or u.op == "call_method" and u.target == "sub":
        return "additive" if u.args[0] is score and u.args[1] is not score and "alpha" not in u.kwargs else None
    return None


def _why_not(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why this flex_attention call cannot become SDPA (None: it can)."""
    users = list(node.users)
    if not all(u.op == "call_function" and u.target is operator.getitem for u in users):
        return "its output tuple is used whole"
    if any(u.args[1] != 0 and u.users for u in users):
        return "its log-sum-exp (or max) used"
    mod = _submodule(gm, node.args[3])
    if score_mod_kind(mod) is None:
        ops = [target_name(n) for n in mod.graph.nodes if n.op in ("call_function", "call_method")] if mod else []
        return (f"a score_mod that is not score + f(b, h, q_idx, kv_idx) (it computes {', '.join(ops[:6]) or '?'} "
                "of the score): only an additive one is an attention bias")
    block = node.args[4]
    if not isinstance(block, (tuple, list)) or _submodule(gm, block[-1]) is None:
        return "a block mask in a form not recognised"
    return None


def _rewrite(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    from xdit_fx.ops.flex import flex_dense_mask

    q, k, v, score_node, block, scale = node.args[:6]
    score_buffers = tuple(node.args[7]) if len(node.args) > 7 else ()
    mask_buffers = tuple(node.args[8]) if len(node.args) > 8 else ()
    qv, kv = example_value(q), example_value(k)
    batch, heads, lq = qv.shape[0], qv.shape[1], qv.shape[2]
    lk = kv.shape[2]
    additive = score_mod_kind(_submodule(gm, score_node)) == "additive"
    graph = gm.graph
    with graph.inserting_before(node):
        mask = graph.call_function(flex_dense_mask, (batch, heads, lq, lk, score_node if additive else None,
                                                     tuple(block), score_buffers, mask_buffers, qv.dtype))
        kwargs: dict[str, Any] = {"attn_mask": mask, "scale": scale}
        if kv.shape[1] != heads:
            kwargs["enable_gqa"] = True
        sdpa = graph.call_function(_SDPA, (q, k, v), kwargs)
    for new in (mask, sdpa):
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in node.meta:
                new.meta[key] = node.meta[key]
    with qv.fake_mode if hasattr(qv, "fake_mode") else _null():
        dtype = qv.dtype if additive else torch.bool
        mask.meta["example_value"] = torch.empty(batch, heads, lq, lk, dtype=dtype, device=qv.device)
        sdpa.meta["example_value"] = torch.empty(batch, heads, lq, example_value(v).shape[-1], dtype=qv.dtype,
                                                 device=qv.device)
    for u in list(node.users):
        if u.args[1] == 0:
            u.replace_all_uses_with(sdpa)
        graph.erase_node(u)
    graph.erase_node(node)
    return sdpa


def _null():
    import contextlib
    return contextlib.nullcontext()


def normalize_flex(gm: fx.GraphModule, ctx) -> int:
    """normalize_attention's part: rewrite every flex_attention call that SDPA with a dense mask expresses;
    under a plan that splits the sequence, one left as it is is refused naming the node and why. A plan that
    does not split the sequence (cfg, dp) keeps flex_attention and its kernel as they are."""
    splits = ctx.mesh.sp > 1 or getattr(ctx.plan, "pipefusion_degree", 1) > 1
    if not splits:
        return 0
    done, left = 0, []
    for node in list(gm.graph.nodes):
        if not is_flex(node):
            continue
        why = _why_not(gm, node)
        if why is None:
            _rewrite(gm, node)
            done += 1
        else:
            left.append((node, why))
    if left:
        from xdit_fx.errors import UnsupportedGraph
        from xdit_fx.compiler.fx_utils import describe_node
        node, why = left[0]
        more = f"\n  ({len(left) - 1} more such calls)" if len(left) > 1 else ""
        raise UnsupportedGraph(
            f"normalize_attention: {describe_node(node)}\n  calls flex_attention with {why}; its score and block "
            f"masks cannot be re-expressed over global token positions, so its sequence cannot be split.{more}\n"
            "  fix: write the score_mod as score + bias (or use F.scaled_dot_product_attention with a mask), or "
            "run without sequence parallelism / PipeFusion")
    return done
