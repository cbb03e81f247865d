"""Node predicates, the node.meta keys xdit_fx writes, and small graph helpers."""

from __future__ import annotations

import re
from typing import Any, Iterator

import torch
import torch.fx as fx

# ---- facts kept on nodes (node.meta keys) ----------------------------------------------------------
META_BLOCK = "xfx.block"          # (stack_name, index) of the repeated transformer block the node is in
META_ATTENTION = "xfx.attention"  # AttentionSite on scaled_dot_product_attention nodes
META_TOKEN_DIMS = "xfx.token_dims"  # per output tensor: its SeqLayout (or "multi"), from infer_token_dims
META_LAYOUT = "xfx.layout"        # SeqLayout of a value after shard_sequence (None: not sharded)
META_SP_ATTENTION = "xfx.sp_attention"  # SPAttentionSpec on attention nodes that run on local shards
META_CREATED_BY = "xfx.created_by"      # name of the pass that created the node (stamped by the runner)
META_CACHE = "xfx.cache"          # on the call of a cache region (insert_cache): what is skipped and how
META_GATHER = "xfx.gather"        # "exit" or "fallback" on inserted gather nodes, with the reason
META_WHOLE = "xfx.whole"          # set by patch_sequence: shard_sequence leaves the node whole (the reason)

_INDEX = re.compile(r"\[(\d+)\]")
_QUOTED = re.compile(r"\[['\"]([^'\"]+)['\"]\]")


def clean_module_path(path: str) -> str:
    """Dynamo's "L['self'].blocks[0].attn" -> "blocks.0.attn"."""
    path = re.sub(r"^(L|G)\['[^']+'\]\.?", "", path)
    path = re.sub(r"^self\.?", "", path)
    path = _QUOTED.sub(r".\1", path)
    path = _INDEX.sub(r".\1", path)
    parts = [p for p in path.split(".") if p and p not in ("__dict__", "_modules")]
    return ".".join(parts)


def module_path(node: fx.Node) -> str:
    """Innermost module path of the code that produced `node` ('' at the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    last = list(stack.values())[-1]
    path = last[0] if isinstance(last, tuple) else str(last)
    return clean_module_path(path)


def source_line(node: fx.Node) -> str:
    """'file.py:123 in fn' for the innermost user frame of the node's stack trace, or ''."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', trace)
    if not frames:
        return ""
    path, line, fn = frames[-1]
    return f"{short_source_path(path)}:{line}, in {fn}"


def describe_node(node) -> str:
    """One line that locates an fx node: its name, module path and the user source line."""
    parts = [f"node '{node.name}'"]
    path = module_path(node)
    if path:
        parts.append(f"({path})")
    text = " ".join(parts)
    src = source_line(node)
    if src:
        text += f"\n  source: {src}"
    return text


_PACKAGE_ROOTS = re.compile(r"^.*/(?:site-packages|dist-packages)/|^.*/(?=(?:xdit_fx|tests|examples|benchmarks)/)")


def short_source_path(path: str) -> str:
    """A source path that reads the same on every checkout: 'diffusers/models/attention.py',
    'xdit_fx/zoo.py' (from the package root), else the last two components."""
    short, n = _PACKAGE_ROOTS.subn("", path, count=1)
    return short if n else "/".join(path.split("/")[-2:])


def example_value(node: Any) -> Any:
    """The fake value dynamo recorded for a node (tensor, tuple of tensors, int, ...)."""
    if not isinstance(node, fx.Node):
        return node
    if "example_value" in node.meta:
        return node.meta["example_value"]
    return node.meta.get("val")


def tensor_meta(node: Any) -> torch.Tensor | None:
    value = example_value(node)
    return value if isinstance(value, torch.Tensor) else None


def shape_of(node: Any) -> tuple[int, ...] | None:
    t = tensor_meta(node)
    return tuple(int(s) for s in t.shape) if t is not None else None


def is_param_placeholder(node: fx.Node) -> bool:
    """A graph input that dynamo lifted from a module's parameters or buffers (not a user input)."""
    return node.op == "placeholder" and (isinstance(example_value(node), torch.nn.Parameter)
                                         or "_parameters_" in node.name or "_buffers_" in node.name)


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (torch._C._nn.linear, torch.nn.functional.linear)


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.nn.functional.scaled_dot_product_attention


def iter_tensor_args(node: fx.Node) -> Iterator[tuple[int | str, fx.Node]]:
    """(position or kwarg name, node) for every fx.Node argument that carries a tensor."""
    for i, a in enumerate(node.args):
        for n in _flat_nodes(a):
            yield i, n
    for k, a in node.kwargs.items():
        for n in _flat_nodes(a):
            yield k, n


def _flat_nodes(a: Any) -> Iterator[fx.Node]:
    if isinstance(a, fx.Node):
        yield a
    elif isinstance(a, (list, tuple)):
        for x in a:
            yield from _flat_nodes(x)
    elif isinstance(a, dict):
        for x in a.values():
            yield from _flat_nodes(x)


def target_name(node: fx.Node) -> str:
    """A short readable name of what a node calls: 'linear', 'view', 'getitem', 'blocks.0.attn', ..."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        t = node.target
        name = getattr(t, "__name__", None) or str(t)
        if hasattr(t, "_schema"):
            name = str(t).replace(".default", "")
        return name
    return f"{node.op}:{node.target}"


def count_ops(gm: fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method", "call_module"):
            key = target_name(n)
            counts[key] = counts.get(key, 0) + 1
    return counts


SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def sdpa_args(node: fx.Node) -> dict[str, Any]:
    """The arguments of a scaled_dot_product_attention node by name, however it was called."""
    bound = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    bound.update(zip(SDPA_PARAMS, node.args))
    bound.update(node.kwargs)
    return bound


def node_arg(node: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    """A call's argument however it was passed: positionally at `pos`, or by keyword `name`."""
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def set_unique_name(graph: fx.Graph, node: fx.Node, base: str) -> None:
    """Give an inserted node a readable name that no other node of the graph has."""
    taken = {n.name for n in graph.nodes if n is not node}
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_v{k}"
    node.name = name
    used = getattr(getattr(graph, "_graph_namespace", None), "_used_names", None)
    if isinstance(used, set):  # so that nodes fx names later do not take it
        used.add(name)


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of gm's graph (same node names, node facts copied shallowly) on the same module, with gm's
    `meta`: passes can rewrite it independently of gm."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    out = fx.GraphModule(gm, graph)
    out.meta.update(gm.meta)
    return out
