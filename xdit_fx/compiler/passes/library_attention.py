"""Attention called through a library, rewritten into scaled_dot_product_attention nodes (part of
normalize_attention).

Recognised from the graph alone, by op name (what dynamo captures when it traces into the library) and by the
Python function (what a model that marks the library call `allow_in_graph` leaves in the graph):

* flash-attn >= 2.6: the custom ops ``flash_attn::_flash_attn_forward`` (q, k, v [B, S, H, D]) and
  ``flash_attn::_flash_attn_varlen_forward`` (q, k, v [total, H, D], sequences packed along total and delimited
  by ``cu_seqlens``), which every ``flash_attn_*func`` (kv-packed, qkv-packed, varlen) reaches; and those Python
  functions themselves.
* xformers: the op ``xformers::efficient_attention_forward_cutlass`` (q, k, v [B, M, H, K]; a tensor bias, a
  causal mask type, and ``seqstart_q`` / ``seqstart_k`` for a ``BlockDiagonalMask``), and
  ``xformers.ops.memory_efficient_attention`` called with no bias or a tensor bias.

Each becomes SDPA over [B, H, L, D] views of the same q, k, v; packed sequences become one sequence of B = 1
with a block-diagonal mask computed from ``cu_seqlens`` in the graph (so it is exact whatever the lengths are at
run time). Causal masks follow the library: flash-attn aligns them to the bottom-right corner of each block,
xformers' mask type says which corner. The output is made contiguous in the library's layout, so that a
``.view`` after it keeps working.

A library attention whose options SDPA cannot express (dropout, sliding windows, soft-capping, ALiBi, the
log-sum-exp used) is left as it is, and its reason is returned: a plan that shards the sequence refuses it
(never silently whole)."""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from xdit_fx.compiler.fx_utils import example_value
from xdit_fx.compiler.passes.node_builder import Builder

_SDPA = F.scaled_dot_product_attention

FLASH_FUNCS = {"flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
               "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func"}
#: op namespaces whose ops are attention kernels: an op of these that is not rewritten is reported
ATTENTION_NAMESPACES = ("flash_attn", "flash_attn_3", "xformers", "xformers_flash", "xformers_flash3")


def op_qualname(target: Any) -> str | None:
    """'flash_attn::_flash_attn_forward' for a torch.ops target (packet or overload), else None."""
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    return None


def _op_args(node: fx.Node) -> dict[str, Any]:
    """The op call's arguments by schema name, defaults filled in."""
    t = node.target
    schema = (t.default if isinstance(t, torch._ops.OpOverloadPacket) else t)._schema
    bound: dict[str, Any] = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args):
            bound[a.name] = node.args[i]
        elif a.name in node.kwargs:
            bound[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            bound[a.name] = a.default_value
    return bound


def _py_function(node: fx.Node) -> tuple[str, str] | None:
    """('flash_attn', name) / ('xformers', name) for a call of the library's Python entry point."""
    if node.op != "call_function":
        return None
    mod, name = getattr(node.target, "__module__", "") or "", getattr(node.target, "__name__", "")
    if mod.split(".")[0] == "flash_attn" and name in FLASH_FUNCS:
        return "flash_attn", name
    if mod.split(".")[0] == "xformers" and name == "memory_efficient_attention":
        return "xformers", name
    return None


def _bind(fn, node: fx.Node) -> dict[str, Any]:
    ba = inspect.signature(fn).bind(*node.args, **node.kwargs)
    ba.apply_defaults()
    return dict(ba.arguments)


# ---- what each form means: one spec per call ----------------------------------------------------------

def _flash_spec(a: dict, varlen: bool) -> tuple[dict | None, str | None]:
    ws = a.get("window_size", (a.get("window_size_left", -1), a.get("window_size_right", -1)))
    if a.get("dropout_p", 0.0):
        return None, "dropout_p > 0 (its random stream cannot be reproduced per shard)"
    if any(w is not None and w >= 0 for w in ws):
        return None, f"a sliding window {tuple(ws)}"
    if a.get("softcap", 0.0):
        return None, "soft-capping"
    if a.get("alibi_slopes") is not None:
        return None, "ALiBi slopes"
    if a.get("return_softmax") or a.get("return_attn_probs"):
        return None, "the softmax / log-sum-exp is returned"
    if varlen and (a.get("block_table") is not None or a.get("leftpad_k") is not None
                   or a.get("seqused_k") is not None):
        return None, "a paged KV cache (block_table / leftpad_k / seqused_k)"
    spec = {"layout": "thd" if varlen else "bshd", "scale": a.get("softmax_scale"),
            "causal": "bottom_right" if a.get("causal") else None, "bias": None}
    if varlen:
        spec["cu_q"], spec["cu_k"] = a["cu_seqlens_q"], a["cu_seqlens_k"]
    return spec, None


def _flash_py_tensors(name: str, a: dict) -> dict:
    """q, k, v of a flash_attn_*func call (packed forms: which tensor and index)."""
    if "qkvpacked" in name:
        return {"q": (a["qkv"], 0), "k": (a["qkv"], 1), "v": (a["qkv"], 2)}
    if "kvpacked" in name:
        return {"q": a["q"], "k": (a["kv"], 0), "v": (a["kv"], 1)}
    return {"q": a["q"], "k": a["k"], "v": a["v"]}


def _xformers_spec(a: dict) -> tuple[dict | None, str | None]:
    if a.get("dropout_p", 0.0) or a.get("p", 0.0):
        return None, "dropout > 0"
    if a.get("seqlen_k") is not None:
        return None, "seqlen_k (a padded KV cache)"
    if a.get("window_size") is not None:
        return None, "a sliding window"
    mask_type = a.get("custom_mask_type", 0)
    if mask_type not in (0, 1, 2):
        return None, f"custom_mask_type={mask_type}"
    bias = a.get("attn_bias", a.get("bias"))
    if bias is not None and not isinstance(bias, fx.Node):
        return None, f"an attention bias of type {type(bias).__name__} (only tensors and no bias in this form)"
    spec = {"layout": "bshd", "scale": a.get("scale"), "bias": bias,
            "causal": {0: None, 1: "top_left", 2: "bottom_right"}[mask_type]}
    sq, sk = a.get("seqstart_q", a.get("cu_seqlens_q")), a.get("seqstart_k", a.get("cu_seqlens_k"))
    if sq is not None or sk is not None:
        if sq is None or sk is None:
            return None, "only one of seqstart_q / seqstart_k"
        spec.update(layout="packed_bshd", cu_q=sq, cu_k=sk)
    return spec, None


def match(node: fx.Node) -> tuple[dict | None, str | None, str] | None:
    """(spec, None, what) for a library attention call SDPA can express, (None, reason, what) for one it cannot,
    None for anything else. A spec holds q, k, v (nodes, or (packed node, index)), the layout, scale, causal
    corner, bias, cu_seqlens, and `tuple_out` when the call returns a tuple whose [0] is the output."""
    name = op_qualname(node.target) if node.op == "call_function" else None
    if name in ("flash_attn::_flash_attn_forward", "flash_attn::_flash_attn_varlen_forward"):
        a = _op_args(node)
        spec, why = _flash_spec(a, varlen="varlen" in name)
        if spec is not None:
            spec.update(q=a["q"], k=a["k"], v=a["v"], tuple_out=True)
        return spec, why, name
    if name == "xformers::efficient_attention_forward_cutlass":
        a = _op_args(node)
        spec, why = _xformers_spec(a)
        if spec is not None:
            spec.update(q=a["query"], k=a["key"], v=a["value"], tuple_out=True)
        return spec, why, name
    py = _py_function(node)
    if py is not None:
        lib, fname = py
        what = f"{lib}.{fname}"
        try:
            a = _bind(node.target, node)
        except TypeError as e:
            return None, f"its arguments do not bind to {fname}'s signature ({e})", what
        if lib == "flash_attn":
            spec, why = _flash_spec(a, varlen="varlen" in fname)
            if spec is not None:
                if fname == "flash_attn_varlen_qkvpacked_func":
                    spec["cu_q"] = spec["cu_k"] = a["cu_seqlens"]
                spec.update(_flash_py_tensors(fname, a), tuple_out=False, packed_dim=1 if "varlen" in fname else 2)
            return spec, why, what
        spec, why = _xformers_spec(a)
        if spec is not None:
            if example_value(a["query"]) is not None and example_value(a["query"]).dim() != 4:
                return None, "3-D inputs [B, M, K] in the Python form", what
            spec.update(q=a["query"], k=a["key"], v=a["value"], tuple_out=False)
        return spec, why, what
    if name is not None and name.split("::")[0] in ATTENTION_NAMESPACES:
        return None, "an attention kernel op xdit_fx does not know", name
    return None


# ---- the rewrite ----------------------------------------------------------------------------------------

def _positions(b, cu: fx.Node, total: int) -> tuple[fx.Node, fx.Node, fx.Node]:
    """(position, sequence id, tokens to the end of its sequence) of every packed token, from cu_seqlens."""
    pos = b.method("sub", b.method("cumsum", b.method("new_ones", cu, total, dtype=torch.int64), 0), 1)
    starts = b.method("long", b.fn(operator.getitem, cu, slice(1, None)))
    seg = b.method("sum", b.fn(operator.ge, b.method("unsqueeze", pos, -1), starts), -1)
    n = example_value(cu).shape[0] - 1
    ends = b.fn(operator.getitem, b.method("long", cu), b.method("clamp", b.fn(operator.add, seg, 1), max=n))
    return pos, seg, b.fn(operator.sub, ends, pos)


def _packed_mask(b, spec: dict, lq: int, lk: int) -> fx.Node:
    """[Lq, Lk] bool: query and key in the same packed sequence (and the causal corner within it)."""
    pq, sq, to_end_q = _positions(b, spec["cu_q"], lq)
    pk, sk, to_end_k = _positions(b, spec["cu_k"], lk)
    mask = b.fn(operator.eq, b.method("unsqueeze", sq, -1), b.method("unsqueeze", sk, 0))
    if spec["causal"] == "bottom_right":  # as many keys left as queries left, or more
        keep = b.fn(operator.ge, b.method("unsqueeze", to_end_k, 0), b.method("unsqueeze", to_end_q, -1))
        mask = b.fn(operator.and_, mask, keep)
    elif spec["causal"] == "top_left":  # key offset in its sequence <= query offset in its sequence
        cq, ck = b.method("long", spec["cu_q"]), b.method("long", spec["cu_k"])
        nq, nk = example_value(cq).shape[0] - 1, example_value(ck).shape[0] - 1
        off_q = b.fn(operator.sub, pq, b.fn(operator.getitem, cq, b.method("clamp", sq, max=nq)))
        off_k = b.fn(operator.sub, pk, b.fn(operator.getitem, ck, b.method("clamp", sk, max=nk)))
        keep = b.fn(operator.le, b.method("unsqueeze", off_k, 0), b.method("unsqueeze", off_q, -1))
        mask = b.fn(operator.and_, mask, keep)
    return mask


def rewrite(gm: fx.GraphModule, node: fx.Node, spec: dict) -> fx.Node | None:
    """Replace one library attention call by SDPA; returns the SDPA node (None: left as it is)."""
    users = list(node.users)
    if spec["tuple_out"]:
        if not all(u.op == "call_function" and u.target is operator.getitem for u in users) \
                or any(u.args[1] != 0 and u.users for u in users):
            return None  # the log-sum-exp is used
        outs = [u for u in users if u.args[1] == 0]
    b = Builder(gm, node, like=node)
    layout = spec["layout"]
    packed_dim = spec.get("packed_dim", 2)

    def tensor(x):
        if isinstance(x, tuple):  # (packed qkv / kv, index)
            return b.method("select", x[0], packed_dim, x[1])
        return x

    q, k, v = tensor(spec["q"]), tensor(spec["k"]), tensor(spec["v"])
    if layout == "thd":  # [T, H, D] -> [1, H, T, D]
        qh, kh, vh = (b.method("unsqueeze", b.method("transpose", t, 0, 1), 0) for t in (q, k, v))
    else:  # [B, S, H, D] -> [B, H, S, D]
        qh, kh, vh = (b.method("transpose", t, 1, 2) for t in (q, k, v))
    lq, lk = example_value(qh).shape[2], example_value(kh).shape[2]
    heads, kv_heads = example_value(qh).shape[1], example_value(kh).shape[1]
    kwargs: dict[str, Any] = {"scale": spec["scale"]}
    mask = spec["bias"]
    if "cu_q" in spec:
        if example_value(qh).shape[0] != 1:
            return None
        packed = _packed_mask(b, spec, lq, lk)
        mask = packed if mask is None else b.fn(torch.where, packed, mask, float("-inf"))
    elif spec["causal"] is not None:
        if lq != lk or mask is not None:
            return None  # a corner-aligned causal mask over two lengths, or with a bias: not expressed yet
        kwargs["is_causal"] = True
    if mask is not None:
        kwargs["attn_mask"] = mask
    if heads != kv_heads:
        kwargs["enable_gqa"] = True
    sdpa = b.fn(_SDPA, qh, kh, vh, **kwargs)
    if layout == "thd":
        out = b.method("contiguous", b.method("transpose", b.method("squeeze", sdpa, 0), 0, 1))
    else:
        out = b.method("contiguous", b.method("transpose", sdpa, 1, 2))
    if spec["tuple_out"]:
        for u in outs:
            u.replace_all_uses_with(out)
        for u in users:
            gm.graph.erase_node(u)
    else:
        node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    return sdpa


def normalize_library_attention(gm: fx.GraphModule) -> tuple[dict[str, int], list[tuple[fx.Node, str, str]]]:
    """Rewrite every library attention call SDPA can express. Returns (rewritten count per library op, the
    calls left as they are: (node, what, why))."""
    done: dict[str, int] = {}
    left: list[tuple[fx.Node, str, str]] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        m = match(node)
        if m is None:
            continue
        spec, why, what = m
        if spec is not None and rewrite(gm, node, spec) is not None:
            done[what] = done.get(what, 0) + 1
        else:
            left.append((node, what, why or "its output tuple's other values are used, or a causal corner over "
                                              "two lengths / with a bias"))
    return done, left


def normalize_library(gm: fx.GraphModule, ctx) -> dict[str, int]:
    """normalize_attention's part: rewrite the library calls; under a plan that splits the sequence, a library
    attention left as it is is refused (it would run whole on every rank, or on a shard as if it were whole)."""
    done, left = normalize_library_attention(gm)
    plan = ctx.plan
    if left and (ctx.mesh.sp > 1 or getattr(plan, "pipefusion_degree", 1) > 1):
        from xdit_fx.errors import UnsupportedGraph
        from xdit_fx.compiler.fx_utils import describe_node
        node, what, why = left[0]
        more = f"\n  ({len(left) - 1} more such calls)" if len(left) > 1 else ""
        raise UnsupportedGraph(
            f"normalize_attention: {describe_node(node)}\n  calls {what} with {why}: it cannot be rewritten into "
            f"scaled_dot_product_attention, so its sequence cannot be split.{more}\n  fix: call it without that "
            "option (or through F.scaled_dot_product_attention), or run without sequence parallelism / PipeFusion")
    return done
