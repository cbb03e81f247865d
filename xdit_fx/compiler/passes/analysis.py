"""Analysis passes: find the repeated transformer blocks and the attention sites. They only write meta."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch.fx as fx

from xdit_fx.errors import UnsupportedGraph
from xdit_fx.compiler.fx_utils import describe_node, META_ATTENTION, META_BLOCK, is_sdpa, module_path, sdpa_args, shape_of
from xdit_fx.compiler.passes.base import PassContext, PassResult, graph_pass

_BLOCK = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")


@dataclass
class AttentionSite:
    """One `scaled_dot_product_attention` call. Shapes are global (as captured), layout [B, H, L, D]."""

    index: int
    module: str
    block: str | None
    heads: int
    kv_heads: int
    head_dim: int
    q_len: int
    kv_len: int
    has_mask: bool
    is_causal: bool
    kind: str = "unknown"  # self | joint | cross, filled in by infer_token_dims

    def describe(self) -> str:
        mask = ", mask" if self.has_mask else ""
        gqa = f", kv_heads={self.kv_heads}" if self.kv_heads != self.heads else ""
        return f"attention[{self.kind}, heads={self.heads}{gqa}, q={self.q_len}, kv={self.kv_len}{mask}]"


def block_of(path: str) -> str | None:
    """'transformer_blocks.3.attn.to_q' -> 'transformer_blocks.3' (the first indexed module on the path)."""
    m = _BLOCK.match(path)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _is_flex_attention(node: fx.Node) -> bool:
    return node.op == "call_function" and "flex_attention" in str(getattr(node.target, "__name__", node.target))


@graph_pass(writes=[META_ATTENTION], mutates_graph=False)
def find_attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Record an AttentionSite on every scaled_dot_product_attention node."""
    sites = 0
    for node in gm.graph.nodes:
        if ctx.mesh.sp > 1 and _is_flex_attention(node):  # normalize_attention rewrites or refuses them first
            raise UnsupportedGraph(
                f"find_attention: {describe_node(node)}\n"
                "  is flex_attention that normalize_attention left as it is; its masks cannot be split.\n"
                "  fix: run it without sequence parallelism; to look at the graph: xdit-fx dump MODEL --plan ... "
                "--out DIR")
        if not is_sdpa(node):
            continue
        a = sdpa_args(node)
        qs, ks = shape_of(a["query"]), shape_of(a["key"])
        mask, causal = a["attn_mask"], a["is_causal"]
        path = module_path(node)
        node.meta[META_ATTENTION] = AttentionSite(
            index=sites, module=path, block=block_of(path), heads=qs[-3] if len(qs) >= 3 else 1,
            kv_heads=ks[-3] if len(ks) >= 3 else 1, head_dim=qs[-1], q_len=qs[-2], kv_len=ks[-2],
            has_mask=mask is not None, is_causal=bool(causal),
        )
        sites += 1
    return PassResult(gm, changed=False, summary=f"{sites} attention sites", counts={"attention_sites": sites})


@graph_pass(reads=[META_ATTENTION], writes=[META_BLOCK], mutates_graph=False)
def find_transformer_blocks(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Tag every node computed inside a transformer block: an entry of a module list that holds attention."""
    stacks = set()
    for node in gm.graph.nodes:
        site = node.meta.get(META_ATTENTION)
        if site is not None and site.block is not None:
            stacks.add(site.block.rsplit(".", 1)[0])
    per_stack: Counter[str] = Counter()
    seen = set()
    for node in gm.graph.nodes:
        block = block_of(module_path(node))
        if block is not None and block.rsplit(".", 1)[0] in stacks:
            node.meta[META_BLOCK] = block
            if block not in seen:
                seen.add(block)
                per_stack[block.rsplit(".", 1)[0]] += 1
    summary = ", ".join(f"{name} x{n}" for name, n in per_stack.items()) or "no transformer blocks"
    return PassResult(gm, changed=False, summary=summary, counts={"blocks": len(seen)})
