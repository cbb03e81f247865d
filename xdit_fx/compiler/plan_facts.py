"""What the plan cost model needs to know about a model, read once from its captured (serial) graph.

`model_facts(model, inputs)` captures the forward (any device, the meta device included: only fake shapes are
read), runs the analysis passes (attention sites, transformer blocks, token dims) and reduces every node to a
`NodeWork`: its FLOPs and bytes (`cost.py`), its op class, where it sits (before, inside or after the block
stack, and which block), whether it carries the sharded token sequence (so sequence parallelism and
PipeFusion's patches divide it) and whether it carries the batch (so cfg and dp divide it). Parameters are
attributed to the block that reads them; the bytes crossing each possible PipeFusion cut are summed from the
values a later block reads from an earlier one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from xdit_fx.compiler.cost import VIEW_OPS, node_bytes, node_flops
from xdit_fx.compiler.fx_utils import (META_ATTENTION, META_BLOCK, META_TOKEN_DIMS, example_value, is_linear,
                                       is_param_placeholder, is_sdpa, sdpa_args, shape_of,
                                       target_name)

GEMM, ATTN, MEM, ACT, VIEW = "gemm", "attn", "mem", "act", "view"
#: elementwise ops with transcendental math, and normalisations: the `act` class (a CPU computes them far
#: below its memory bandwidth; a GPU at it)
ACT_OPS = frozenset({"gelu", "silu", "sigmoid", "tanh", "exp", "erf", "softmax", "log_softmax", "_softmax",
                     "layer_norm", "native_layer_norm", "rms_norm", "group_norm", "native_group_norm", "sin",
                     "cos", "pow", "rsqrt", "sqrt", "log", "mish", "softplus", "hardswish", "elu"})


@dataclass(frozen=True)
class NodeWork:
    kind: str                 # gemm | attn | mem | act | view
    flops: float
    bytes: int
    where: str                # pre | stack | post
    block: int | None         # index of the block in the stack (mid-stack glue joins the block before it)
    tokens: bool              # carries the sharded token sequence
    batched: bool             # its first dim is the batch
    site: tuple | None = None  # attention: (batch, heads, kv_heads, q_len, kv_len, head_dim, kind)


@dataclass
class ModelFacts:
    nodes: list[NodeWork]
    blocks: int
    block_params: list[int]          # parameter bytes read by each block
    other_params: int                # parameter bytes read outside the blocks (or by several)
    sites: list[tuple]               # every attention site (see NodeWork.site)
    segments: tuple[int, ...]        # token segments of the sharded sequence (e.g. text, image)
    batch: int
    out_bytes: int                   # bytes of the graph's outputs
    cut_bytes: list[int]             # bytes crossing the cut after block i, i = 0..blocks-2
    dtype_bytes: int
    description: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(self.segments)

    @property
    def param_bytes(self) -> int:
        return self.other_params + sum(self.block_params)

    def sp_heads(self) -> list[int]:
        """Heads (and KV heads) of the self/joint attention sites: what Ulysses divides."""
        out = []
        for s in self.sites:
            if s[6] != "cross":
                out += [s[1], s[2]]
        return out


def _kind(node: fx.Node) -> str:
    if node.op not in ("call_function", "call_method", "call_module"):
        return "free"
    if is_sdpa(node):
        return ATTN
    name = target_name(node).split(".")[-1] if node.op != "call_module" else ""
    if name in VIEW_OPS:
        return VIEW
    if node_flops(node) > 0 or is_linear(node):
        return GEMM
    return ACT if name.rstrip("_") in ACT_OPS else MEM


def _has_tokens(node: fx.Node) -> bool:
    layouts = node.meta.get(META_TOKEN_DIMS) or {}
    for lay in layouts.values():
        if isinstance(lay, str) or any(sharded for _, sharded in getattr(lay, "segments", ())):
            return True
    return False


def _site(node: fx.Node) -> tuple | None:
    s = node.meta.get(META_ATTENTION)
    q = shape_of(sdpa_args(node)["query"])
    if s is None or not q:
        return None
    return (q[0], s.heads, s.kv_heads, s.q_len, s.kv_len, s.head_dim, s.kind)


def _segments(gm: fx.GraphModule) -> tuple[int, ...]:
    """Token segments of the longest sharded query sequence (a token refiner's text attention comes first in
    some models; the image/video sequence is the long one)."""
    best: tuple[int, ...] = ()
    for node in gm.graph.nodes:
        q = sdpa_args(node)["query"] if is_sdpa(node) else None
        if isinstance(q, fx.Node):
            lay = (q.meta.get(META_TOKEN_DIMS) or {}).get(None)
            if lay is not None and not isinstance(lay, str) and sum(n for n, _ in lay.segments) > sum(best):
                best = tuple(length for length, _ in lay.segments)
    return best


def _block_index(gm: fx.GraphModule) -> dict[fx.Node, tuple[str, int | None]]:
    """Per node: (pre | stack | post, block index)."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr")]
    order: dict[str, int] = {}
    for n in nodes:
        b = n.meta.get(META_BLOCK)
        if b is not None and b not in order:
            order[b] = len(order)
    placed: dict[fx.Node, tuple[str, int | None]] = {n: ("pre", None) for n in gm.graph.nodes}
    last = None
    last_pos = max((i for i, n in enumerate(nodes) if n.meta.get(META_BLOCK) is not None), default=-1)
    for i, n in enumerate(nodes):
        b = n.meta.get(META_BLOCK)
        if b is not None:
            last = order[b]
            placed[n] = ("stack", last)
        elif last is None:
            placed[n] = ("pre", None)
        elif i > last_pos:
            placed[n] = ("post", None)
        else:
            placed[n] = ("stack", last)
    return placed


def _param_bytes(gm: fx.GraphModule, placed: dict, blocks: int) -> tuple[list[int], int]:
    per_block = [0] * blocks
    other = 0
    for n in gm.graph.nodes:
        if not is_param_placeholder(n):
            continue
        v = example_value(n)
        size = int(v.numel()) * v.element_size() if isinstance(v, torch.Tensor) else 0
        users = {placed.get(u, ("pre", None))[1] for u in n.users}
        if len(users) == 1 and None not in users:
            per_block[users.pop()] += size
        else:
            other += size
    return per_block, other


def _cut_bytes(gm: fx.GraphModule, placed: dict, blocks: int) -> list[int]:
    """Bytes of the values produced in block <= c and read by a block > c (or after the stack), per cut c."""
    cuts = [0] * max(blocks - 1, 0)
    for n in gm.graph.nodes:
        where, b = placed.get(n, ("pre", None))
        if where != "stack" or b is None:
            continue
        readers = [placed.get(u, ("pre", None)) for u in n.users]
        far = max((blocks if w == "post" else (rb if rb is not None else -1) for w, rb in readers), default=-1)
        v = example_value(n)
        size = int(v.numel()) * v.element_size() if isinstance(v, torch.Tensor) else 0
        for c in range(b, min(far, blocks - 1)):
            cuts[c] += size
    return cuts


def facts_from_graphs(graphs: list[fx.GraphModule], batch: int, description: str = "") -> ModelFacts:
    """Reduce analysed graphs (attention, blocks and token dims tagged) to ModelFacts; several graphs (graph
    breaks) are summed with their blocks numbered on."""
    nodes: list[NodeWork] = []
    block_params: list[int] = []
    cuts: list[int] = []
    other = out_bytes = 0
    sites: list[tuple] = []
    segments: tuple[int, ...] = ()
    dtype_bytes = 4
    for gm in graphs:
        placed = _block_index(gm)
        nb = 1 + max((b for _, b in placed.values() if b is not None), default=-1)
        offset = len(block_params)
        pb, po = _param_bytes(gm, placed, nb)
        block_params += pb
        other += po
        cuts += ([0] if cuts and nb else []) + _cut_bytes(gm, placed, nb)
        segments = max(segments, _segments(gm), key=sum)
        for n in gm.graph.nodes:
            kind = _kind(n)
            if n.op == "output":
                out_bytes += sum(node_bytes_of(a) for a in n.all_input_nodes)
            if kind == "free":
                continue
            where, b = placed[n]
            shape = shape_of(n)
            site = _site(n) if kind == ATTN else None
            if site is not None:
                sites.append(site)
            v = example_value(n)
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                dtype_bytes = v.element_size()
            nodes.append(NodeWork(kind, node_flops(n), node_bytes(n) if kind != VIEW else 0, where,
                                  None if b is None else b + offset, _has_tokens(n),
                                  bool(shape) and shape[0] == batch, site))
    return ModelFacts(nodes, len(block_params), block_params, other, sites, segments, batch, out_bytes, cuts,
                      dtype_bytes, description)


def node_bytes_of(node: fx.Node) -> int:
    v = example_value(node)
    if isinstance(v, torch.Tensor):
        return int(v.numel()) * v.element_size()
    if isinstance(v, (tuple, list)):
        return sum(int(t.numel()) * t.element_size() for t in v if isinstance(t, torch.Tensor))
    return 0


def _batch_of(inputs: dict[str, Any]) -> int:
    for key in ("hidden_states", "x", "sample"):
        if isinstance(inputs.get(key), torch.Tensor):
            return int(inputs[key].shape[0])
    for v in inputs.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return 1


def model_facts(model: nn.Module, inputs: dict[str, Any], description: str = "") -> ModelFacts:
    """Capture `model(**inputs)` (fake shapes only: the meta device works) and read its ModelFacts."""
    from xdit_fx.compiler.capture import capture_graphs
    from xdit_fx.compiler.mesh import Mesh
    from xdit_fx.compiler.passes import (PassContext, find_attention, find_transformer_blocks, infer_token_dims,
                                         normalize_attention, run_pipeline)
    from xdit_fx.plan import Plan

    plan = Plan(ring_degree=2)  # token dims are a property of the graph; the degree only names the mesh
    ctx = PassContext(plan, Mesh.of(plan))
    graphs = capture_graphs(model, **inputs)
    passes = [normalize_attention, find_attention, find_transformer_blocks, infer_token_dims]
    analysed = [run_pipeline(gm, passes, ctx) for gm in graphs]
    return facts_from_graphs(analysed, _batch_of(inputs), description or type(model).__name__)


def total_flops(facts: ModelFacts) -> float:
    return math.fsum(n.flops for n in facts.nodes)
