"""Pass-level tests on small hand-written DiT-like modules.

The forward is captured with dynamo, then the passes run with symbolic group names (`ctx.groups=None`).
The rewritten graph is only inspected, never executed, so no process group is needed.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from xdit_fx.compiler.capture import capture_graphs
from xdit_fx.errors import PassError, UnsupportedGraph, XditFxError
from xdit_fx.compiler.fx_utils import (META_ATTENTION, META_BLOCK, META_CREATED_BY, META_GATHER, META_LAYOUT,
                              META_SP_ATTENTION, is_sdpa, shape_of)
from xdit_fx.compiler.passes import (GraphHistory, Mesh, PassContext, PassResult, build_pipeline, check_pipeline,
                            graph_pass, run_pipeline, shard_sequence)
from xdit_fx.plan import Plan
from xdit_fx.ops.attention import sp_attention
from xdit_fx.ops.collectives import gather_tokens, shard_tokens

DIM, TEXT_DIM, TEXT_LEN = 16, 8, 4


# ---- tiny models -------------------------------------------------------------------------------

class Attention(nn.Module):
    """q/k/v Linear -> view -> transpose -> SDPA -> transpose -> reshape -> out Linear; cross if `context`."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        kv_dim = context_dim or dim
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(kv_dim, dim), nn.Linear(kv_dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, context=None):
        b, n, c = x.shape
        kv = x if context is None else context
        m = kv.shape[1]
        q = self.to_q(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
        k = self.to_k(kv).view(b, m, self.heads, c // self.heads).transpose(1, 2)
        v = self.to_v(kv).view(b, m, self.heads, c // self.heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, c))


TOKEN_MIXING_OPS = {  # ops that mix the tokens of the sequence: each needs the whole sequence
    "cumsum": lambda h: torch.cumsum(h, dim=1),                 # has a rule, but not along the token dim
    "sort": lambda h: h.sort(dim=1).values,                     # likewise
    "logcumsumexp": lambda h: torch.logcumsumexp(h, dim=1),     # no rule at all
    # mixes tokens (normalizes over them); the rule must not keep the token dim
    "normalize_tokens_kw": lambda h: F.normalize(h.transpose(1, 2), p=2, dim=2).transpose(1, 2),
    "normalize_tokens_positional": lambda h: F.normalize(h.transpose(1, 2), 2, 2).transpose(1, 2),
}


def _write_one_token(h: torch.Tensor) -> torch.Tensor:
    h = h.clone()
    h[:, 3] = 0.0  # an in-place write at a global token position: needs the whole sequence
    return h


TOKEN_MIXING_OPS["setitem_one_token"] = _write_one_token
FALLBACK_CASES = sorted(TOKEN_MIXING_OPS)


class Block(nn.Module):
    def __init__(self, heads: int, self_attn: bool = True, cross: bool = False, no_rule: str | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.attn = Attention(DIM, heads) if self_attn else None
        self.cross = Attention(DIM, heads, context_dim=TEXT_DIM) if cross else None
        self.norm2 = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))
        self.no_rule = no_rule

    def forward(self, x, context=None):
        if self.attn is not None:
            x = x + self.attn(self.norm1(x))
        if self.cross is not None:
            x = x + self.cross(x, context)
        if self.no_rule is not None:
            x = x + TOKEN_MIXING_OPS[self.no_rule](x)
        return x + self.mlp(self.norm2(x))


class DiT(nn.Module):
    """proj -> blocks (nn.ModuleList) -> out. `no_rule` puts an op without a token-dim rule in block 0."""

    def __init__(self, depth: int = 2, heads: int = 4, self_attn: bool = True, cross: bool = False,
                 no_rule: str | None = None) -> None:
        super().__init__()
        self.proj_in = nn.Linear(8, DIM)
        self.blocks = nn.ModuleList(
            Block(heads, self_attn, cross, no_rule if i == 0 else None) for i in range(depth))
        self.proj_out = nn.Linear(DIM, 8)

    def forward(self, x, context=None):
        h = self.proj_in(x)
        for block in self.blocks:
            h = block(h, context)
        return self.proj_out(h)


class JointDiT(nn.Module):
    """Flux/SD3-style joint attention over cat([text, image]); the image part is returned."""

    def __init__(self, heads: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Attention(DIM, heads) for _ in range(2))

    def forward(self, x, context):
        for attn in self.blocks:
            joint = attn(torch.cat([context, x], dim=1))
            context, x = joint[:, :TEXT_LEN], joint[:, TEXT_LEN:]
        return x


class ThreeHeads(nn.Module):
    """One attention with 3 heads: not divisible by ulysses_degree=2."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Linear(8, 12)
        self.blocks = nn.ModuleList([Attention(12, heads=3)])

    def forward(self, x):
        h = self.proj_in(x)
        for attn in self.blocks:
            h = h + attn(h)
        return h


class MLPStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


# ---- helpers -------------------------------------------------------------------------------------

def capture(model: nn.Module, *inputs: torch.Tensor) -> fx.GraphModule:
    """The one GraphModule dynamo captures for `model(*inputs)` (fullgraph, static shapes)."""
    (gm,) = capture_graphs(model.eval(), *inputs, fullgraph=True)
    return gm


def _dit(seq=6, depth=2, heads=4, self_attn=True, cross=False, no_rule=None):
    inputs = (torch.randn(2, seq, 8),) + ((torch.randn(2, TEXT_LEN, TEXT_DIM),) if cross else ())
    return DiT(depth, heads, self_attn, cross, no_rule), inputs


MODELS = {
    "dit": _dit,
    "joint": lambda seq=6: (JointDiT(), (torch.randn(2, seq, DIM), torch.randn(2, TEXT_LEN, DIM))),
    "mlp": lambda: (MLPStack(), (torch.randn(2, 6, 8),)),
    "three_heads": lambda: (ThreeHeads(), (torch.randn(2, 6, 8),)),
}


@functools.lru_cache(maxsize=None)
def _captured(name: str, options: tuple) -> fx.GraphModule:
    model, inputs = MODELS[name](**dict(options))
    return capture(model, *inputs)


def graph(name: str, **options) -> fx.GraphModule:
    """A fresh copy of the captured graph of MODELS[name](**options) (each model is captured once)."""
    bound = inspect.signature(MODELS[name]).bind(**options)
    bound.apply_defaults()
    return copy.deepcopy(_captured(name, tuple(sorted(bound.arguments.items()))))


PLAN = Plan(ulysses_degree=2)


def ctx_for(ulysses: int = 2, ring: int = 1) -> PassContext:
    return PassContext(plan=Plan(ulysses_degree=ulysses, ring_degree=ring), mesh=Mesh(ring=ring, ulysses=ulysses))


def pipeline(upto: str | None = None, plan: Plan = PLAN) -> list:
    """The passes `plan` needs (in the library's order), cut after the pass named `upto`."""
    passes = build_pipeline(plan)
    if upto is None:
        return passes
    names = [p.info.name for p in passes]
    return passes[: names.index(upto) + 1]


def run(gm: fx.GraphModule, upto: str | None = None, ulysses: int = 2, ring: int = 1):
    history = GraphHistory()
    plan = Plan(ulysses_degree=ulysses, ring_degree=ring)
    gm = run_pipeline(gm, pipeline(upto, plan), ctx_for(ulysses, ring), history)
    return gm, {s.name: s for s in history.snapshots}


def calls(gm: fx.GraphModule, target) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def placeholder(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == f"L_{name}_")


# ---- analysis passes -------------------------------------------------------------------------------

def test_find_transformer_blocks_tags_block_nodes():
    gm, snaps = run(graph("dit", depth=3), upto="find_transformer_blocks")
    tags = {n.name: n.meta.get(META_BLOCK) for n in gm.graph.nodes if n.op == "call_function"}
    assert {t for t in tags.values() if t} == {"blocks.0", "blocks.1", "blocks.2"}
    sdpas = [n for n in gm.graph.nodes if is_sdpa(n)]
    assert [n.meta[META_BLOCK] for n in sdpas] == ["blocks.0", "blocks.1", "blocks.2"]
    # the projections around the stack are not in a block
    entry = next(iter(placeholder(gm, "x").users))
    assert META_BLOCK not in entry.meta
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    assert META_BLOCK not in out.meta
    assert snaps["find_transformer_blocks"].counts["blocks"] == 3
    assert "blocks x3" in snaps["find_transformer_blocks"].summary


@pytest.mark.parametrize("cross", [False, True], ids=["self", "self+cross"])
def test_find_attention_records_sites(cross):
    gm, snaps = run(graph("dit", cross=cross), upto="find_attention")
    sites = [n.meta[META_ATTENTION] for n in gm.graph.nodes if is_sdpa(n)]
    assert len(sites) == (4 if cross else 2)
    assert [s.index for s in sites] == list(range(len(sites)))
    assert snaps["find_attention"].counts["attention_sites"] == len(sites)
    for s in sites:
        assert (s.heads, s.kv_heads, s.head_dim, s.q_len) == (4, 4, DIM // 4, 6)
        assert not s.has_mask and not s.is_causal
        assert s.block in ("blocks.0", "blocks.1")
    self_sites = [s for s in sites if s.module.endswith(".attn")]
    cross_sites = [s for s in sites if s.module.endswith(".cross")]
    assert [s.module for s in self_sites] == ["blocks.0.attn", "blocks.1.attn"]
    assert all(s.kv_len == 6 for s in self_sites)
    assert all(s.kv_len == TEXT_LEN for s in cross_sites)


def test_infer_token_dims_classifies_sites_and_shards_one_space():
    gm, snaps = run(graph("dit", cross=True), upto="infer_token_dims")
    kinds = {n.meta[META_ATTENTION].module: n.meta[META_ATTENTION].kind for n in gm.graph.nodes if is_sdpa(n)}
    assert kinds == {"blocks.0.attn": "self", "blocks.1.attn": "self",
                     "blocks.0.cross": "cross", "blocks.1.cross": "cross"}
    assert snaps["infer_token_dims"].counts["token_spaces"] == 1


def test_cross_attention_only_shards_the_queries_and_keeps_keys_whole():
    """No sequence is both a query and a key sequence (a graph of cross-attention, or a self-attention whose q,
    k, v come in separately after a graph break): the queries are sharded, K/V stay whole, no communication
    but the exit gather."""
    gm, snaps = run(graph("dit", self_attn=False, cross=True))
    assert snaps["infer_token_dims"].counts["token_spaces"] == 1
    assert snaps["infer_token_dims"].counts["query_only_graphs"] == 1
    assert snaps["infer_token_dims"].counts["unparallelized_graphs"] == 0
    assert "queries only" in snaps["infer_token_dims"].summary
    sps = calls(gm, sp_attention)
    assert [n.meta[META_ATTENTION].kind for n in sps] == ["cross", "cross"]
    assert all(n.kwargs["kv_segments"] is None and n.kwargs["q_segments"] == ((6, True),) for n in sps)
    assert [s.args[0] for s in calls(gm, shard_tokens)] == [placeholder(gm, "x")]  # the text stays whole
    assert snaps["shard_sequence"].counts["fallback_gathers"] == 0
    assert [n.meta[META_GATHER] for n in calls(gm, gather_tokens)][0].startswith("exit")


def test_a_query_shorter_than_the_ranks_shards_nothing_and_says_so():
    gm = graph("dit", seq=1, self_attn=False, cross=True)
    code = gm.code
    gm, snaps = run(gm)
    assert snaps["infer_token_dims"].counts["token_spaces"] == 0
    # running whole on every rank is reported, not silent
    assert snaps["infer_token_dims"].counts["unparallelized_graphs"] == 1
    summary = snaps["infer_token_dims"].summary
    assert summary.startswith("NOT PARALLELIZED") and "at least 2 tokens" in summary, summary
    assert "(blocks.0.cross)" in summary and "(blocks.1.cross)" in summary, summary  # the sites, by node
    assert not snaps["shard_sequence"].changed and not snaps["parallelize_attention"].changed
    assert gm.code == code


def test_joint_attention_shards_both_segments_and_localizes_slices():
    gm, snaps = run(graph("joint", seq=5))  # 4 text + 5 image tokens over 2 ranks: 2 + 3 local
    assert snaps["infer_token_dims"].counts["token_spaces"] == 2  # text and image
    sps = calls(gm, sp_attention)
    assert len(sps) == 2 and not any(is_sdpa(n) for n in gm.graph.nodes)
    for n in sps:
        assert n.meta[META_ATTENTION].kind == "joint"
        assert n.kwargs["q_segments"] == ((TEXT_LEN, True), (5, True))
        assert n.kwargs["kv_segments"] == ((TEXT_LEN, True), (5, True))
    # joint[:, :4] / joint[:, 4:] become the local text / image ranges
    slices = {(n.args[1][1].start, n.args[1][1].stop) for n in gm.graph.nodes
              if n.op == "call_function" and n.target is operator.getitem and META_LAYOUT in n.meta}
    assert slices == {(0, 2), (2, 5)}
    assert snaps["shard_sequence"].counts["fallback_gathers"] == 0


def test_analysis_passes_leave_the_graph_unchanged():
    gm = graph("dit")
    code = gm.code
    gm, snaps = run(gm, upto="infer_token_dims")
    assert gm.code == code
    assert all(not s.changed and s.op_delta == {} for s in snaps.values())


# ---- shard_sequence --------------------------------------------------------------------------------

@pytest.mark.parametrize("seq", [6, 5], ids=["even", "uneven"])
def test_shard_sequence_slices_inputs_gathers_at_exit_and_localizes_sizes(seq):
    gm, snaps = run(graph("dit", seq=seq), upto="shard_sequence")
    local = math.ceil(seq / 2)

    shards = calls(gm, shard_tokens)
    assert [s.args[0] for s in shards] == [placeholder(gm, "x")]
    assert shards[0].args[1:] == (1, ((seq, True),), "sp", 2)
    gathers = calls(gm, gather_tokens)
    assert len(gathers) == 1
    assert gathers[0].meta[META_GATHER].startswith("exit")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert out.args[0][0] is gathers[0]

    counts = snaps["shard_sequence"].counts
    assert (counts["sliced_values"], counts["exit_gathers"], counts["fallback_gathers"]) == (1, 1, 0)
    assert snaps["shard_sequence"].changed

    # every baked-in size at a token dim is the local length; the SDPAs are marked for the next pass
    reshapes = [n for n in gm.graph.nodes if n.op == "call_method" and n.target in ("view", "reshape")]
    assert len(reshapes) == 8  # 3 views + 1 reshape per block
    for n in reshapes:
        lay = n.meta[META_LAYOUT]
        sizes = list(n.args[1:])
        assert sizes[lay.dim] == local, (n.name, sizes)
        global_shape = shape_of(n)
        assert sizes[:lay.dim] + sizes[lay.dim + 1:] == \
            list(global_shape[:lay.dim]) + list(global_shape[lay.dim + 1:])
    for n in gm.graph.nodes:
        if is_sdpa(n):
            assert n.meta[META_SP_ATTENTION] == {"q_segments": ((seq, True),), "kv_segments": ((seq, True),)}


def test_nodes_created_by_shard_sequence_carry_provenance():
    gm, _ = run(graph("dit"))
    created = [n for n in gm.graph.nodes if n.target in (shard_tokens, gather_tokens)]
    assert created
    assert all(n.meta[META_CREATED_BY] == "shard_sequence" for n in created)
    assert all(n.meta[META_CREATED_BY] == "parallelize_attention" for n in calls(gm, sp_attention))
    captured = [n for n in gm.graph.nodes if n.op == "call_module" or n.target is F.layer_norm]
    assert captured and all(META_CREATED_BY not in n.meta for n in captured)


@pytest.mark.parametrize("op", FALLBACK_CASES)
def test_op_without_token_rule_in_a_block_is_a_fallback_gather(op):
    gm, snaps = run(graph("dit", no_rule=op), upto="shard_sequence")
    counts = snaps["shard_sequence"].counts
    assert counts["fallback_gathers"] == 1
    assert counts["exit_gathers"] == 1
    fallbacks = [n for n in calls(gm, gather_tokens) if n.meta[META_GATHER].startswith("fallback")]
    assert len(fallbacks) == 1
    assert "blocks.0" in snaps["shard_sequence"].summary
    # the op itself sees the whole sequence
    consumer = next(u for u in fallbacks[0].users if u.target is not gather_tokens)
    assert META_LAYOUT not in consumer.meta


# ---- parallelize_attention --------------------------------------------------------------------------

@pytest.mark.parametrize("ulysses, ring", [(2, 1), (1, 2), (2, 2)], ids=["ulysses", "ring", "usp"])
def test_parallelize_attention_replaces_self_attention(ulysses, ring):
    gm, snaps = run(graph("dit"), ulysses=ulysses, ring=ring)
    assert not any(is_sdpa(n) for n in gm.graph.nodes)
    sps = calls(gm, sp_attention)
    assert [n.name for n in sps] == ["sp_attention_0", "sp_attention_1"]
    for n in sps:
        assert n.kwargs["q_segments"] == ((6, True),) and n.kwargs["kv_segments"] == ((6, True),)
        assert (n.kwargs["ulysses"], n.kwargs["ring"]) == (ulysses, ring)
        assert n.kwargs["sp_group"] == "sp"
        assert n.args[3] is None  # no mask
    counts = snaps["parallelize_attention"].counts
    assert counts["sp_attention_sites"] == 2 and counts["self_sites"] == 2


def test_cross_attention_next_to_self_attention_keeps_kv_replicated():
    gm, snaps = run(graph("dit", cross=True))
    sps = calls(gm, sp_attention)
    by_kind = {}
    for n in sps:
        by_kind.setdefault(n.meta[META_ATTENTION].kind, []).append(n)
    assert len(by_kind["self"]) == 2 and len(by_kind["cross"]) == 2
    for n in by_kind["cross"]:
        assert n.kwargs["q_segments"] == ((6, True),) and n.kwargs["kv_segments"] is None
    assert snaps["parallelize_attention"].counts["cross_sites"] == 2
    assert snaps["shard_sequence"].counts["fallback_gathers"] == 0


def test_heads_not_divisible_by_ulysses_degree():
    gm = graph("three_heads")
    sdpa = next(n.name for n in gm.graph.nodes if is_sdpa(n))
    with pytest.raises(UnsupportedGraph) as info:
        run(gm)
    msg = str(info.value)
    assert f"node '{sdpa}' (blocks.0)" in msg
    assert "has 3 heads, which is not divisible by ulysses_degree=2" in msg
    assert "choose ulysses_degree in [1]" in msg and "ulysses=1, ring=2" in msg


def test_three_heads_run_on_ring_alone():
    gm, snaps = run(graph("three_heads"), ulysses=1, ring=2)
    assert snaps["parallelize_attention"].counts["sp_attention_sites"] == 1


def test_passes_are_no_ops_without_attention():
    gm = graph("mlp")
    code = gm.code
    gm, snaps = run(gm)
    assert not snaps["shard_sequence"].changed
    assert not snaps["parallelize_attention"].changed
    assert snaps["infer_token_dims"].counts["token_spaces"] == 0
    assert gm.code == code


# ---- the runner ------------------------------------------------------------------------------------

@graph_pass(mutates_graph=False)
def sneaky_analysis(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Claims to be an analysis pass but adds a node."""
    x = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "L_x_")
    with gm.graph.inserting_after(x):
        gm.graph.call_function(torch.relu, (x,))
    return PassResult(gm, changed=False)


@graph_pass(reads=["made.up.fact"])
def needs_a_fact(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    return PassResult(gm, changed=False)


@graph_pass()
def crashes(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    raise KeyError("boom")


def test_analysis_pass_that_changes_the_graph_is_an_error():
    gm = graph("mlp")
    with pytest.raises(PassError, match="analysis pass 'sneaky_analysis' changed the graph"):
        run_pipeline(gm, [sneaky_analysis], ctx_for())


@pytest.mark.parametrize("passes, missing", [
    ([needs_a_fact], "made.up.fact"),
    ([shard_sequence], "xfx."),
])
def test_check_pipeline_rejects_reads_before_writes(passes, missing):
    with pytest.raises(XditFxError, match="reads .* which no earlier pass writes") as info:
        check_pipeline(passes)
    assert f"pass '{passes[0].info.name}'" in str(info.value) and missing in str(info.value)
    gm = graph("mlp")
    with pytest.raises(XditFxError, match="no earlier pass writes"):
        run_pipeline(gm, passes, ctx_for())  # checked before anything runs


def test_library_pipelines_are_well_ordered():
    check_pipeline(build_pipeline(PLAN))
    assert [p.info.name for p in build_pipeline(Plan())] == [p.info.name for p in build_pipeline(PLAN)][:3]


def test_unexpected_exception_is_wrapped_with_the_pass_name():
    gm = graph("mlp")
    passes = pipeline("find_transformer_blocks") + [crashes]
    with pytest.raises(PassError, match="pass 'crashes' failed .*KeyError: 'boom'") as info:
        run_pipeline(gm, passes, ctx_for())
    assert "find_transformer_blocks" in str(info.value)  # what ran before
    assert isinstance(info.value.__cause__, KeyError)
