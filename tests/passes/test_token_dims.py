"""Unit tests of the dim-correspondence rules and the token-space union-find (xdit_fx.compiler.passes.token_dims).

Each test captures a tiny module with dynamo (the same capture path as `parallelize`), runs `infer` on the
graph and checks which (tensor, dim) pairs end up in one token space. Nothing here rewrites a graph.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from xdit_fx.compiler.capture import capture_graphs
from xdit_fx.compiler.fx_utils import example_value
from xdit_fx.compiler.passes.token_dims import TokenDims, infer, reshape_groups, rule_for

B, S, T, H, D = 2, 6, 3, 2, 4  # batch, image tokens, text tokens, heads, head dim


def capture(model: nn.Module, *inputs: torch.Tensor) -> fx.GraphModule:
    """The one GraphModule dynamo captures for `model(*inputs)` (fullgraph, static shapes)."""
    (gm,) = capture_graphs(model.eval(), *inputs, fullgraph=True)
    return gm


def placeholder(gm: fx.GraphModule, name: str) -> fx.Node:
    """The graph input for the forward argument `name` (dynamo names it L_<name>_)."""
    for n in gm.graph.nodes:
        if n.op == "placeholder" and n.target == f"L_{name}_":
            return n
    raise KeyError(name)


def outputs(gm: fx.GraphModule) -> list[fx.Node]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return list(out.args[0])


def linked(td: TokenDims, a: fx.Node, da: int, b: fx.Node, db: int) -> bool:
    return td.find((a, None, da)) == td.find((b, None, db))


# ---- (a) reshape_groups: pure shape arithmetic -----------------------------------------------------

@pytest.mark.parametrize("src, dst, expected", [
    ((2, 6, 8), (2, 6, 8), [([0], [0]), ([1], [1]), ([2], [2])]),            # identity
    ((2, 6, 8), (2, 6, 2, 4), [([0], [0]), ([1], [1]), ([2], [2, 3])]),      # split heads
    ((2, 6, 2, 4), (2, 6, 8), [([0], [0]), ([1], [1]), ([2, 3], [2])]),      # merge heads
    ((2, 3, 4, 5), (2, 3, 20), [([0], [0]), ([1], [1]), ([2, 3], [2])]),     # flatten(2)
    ((2, 12), (2, 3, 4), [([0], [0]), ([1], [1, 2])]),                       # unflatten
    ((2, 6), (2, 1, 6), [([0], [0]), ([], [1]), ([1], [2])]),                # unsqueeze: size-1 alone
    ((2, 1, 6), (2, 6), [([0], [0]), ([1], []), ([2], [1])]),            # squeeze
    ((6, 4), (4, 6), [([0, 1], [0, 1])]),                                    # no common boundary
])
def test_reshape_groups(src, dst, expected):
    assert reshape_groups(src, dst) == expected


def test_reshape_groups_mismatched_numel_is_none():
    assert reshape_groups((2, 6), (2, 5)) is None
    assert reshape_groups((2, 6), (2, 6, 2)) is None


# ---- (b) linear + layernorm + gelu + residual ------------------------------------------------------

class _MLPBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def test_token_dim_survives_linear_norm_gelu_residual():
    gm = capture(_MLPBlock(), torch.randn(B, S, 8))
    td = infer(gm.graph)
    x, (y,) = placeholder(gm, "x"), outputs(gm)
    assert linked(td, x, 1, y, 1)
    assert linked(td, x, 0, y, 0)
    assert not linked(td, x, 1, y, 0)
    # every intermediate (layer_norm, linear, gelu, linear, add) carries the same token dim
    for n in gm.graph.nodes:
        if n.op == "call_function":
            assert linked(td, x, 1, n, 1), n.name
    assert td.conflicts == []


# ---- (c) view to heads, then transpose -------------------------------------------------------------

class _Heads(nn.Module):
    def forward(self, x):
        b, s, _ = x.shape
        return x.view(b, s, H, D).transpose(1, 2)


def test_view_then_transpose_moves_token_dim_to_2():
    gm = capture(_Heads(), torch.randn(B, S, H * D))
    td = infer(gm.graph)
    x, (y,) = placeholder(gm, "x"), outputs(gm)
    assert tuple(y.meta["example_value"].shape) == (B, H, S, D)
    assert linked(td, x, 1, y, 2)
    assert not linked(td, x, 1, y, 1)
    assert linked(td, x, 0, y, 0)
    # the split feature dim is not linked to anything of x (one dim became two)
    assert not any(linked(td, x, 2, y, d) for d in range(4))


# ---- (d) concatenation makes a composite space; slices and splits pick segments ------------------

class _JointCat(nn.Module):
    def forward(self, text, image):
        joint = torch.cat([text, image], dim=1) * 2.0
        t1, i1 = joint[:, :T], joint[:, T:]
        t2, i2 = joint.split([T, S], dim=1)
        return joint, t1, i1, t2, i2


def test_cat_is_composite_of_its_inputs_and_slices_resolve_to_segments():
    gm = capture(_JointCat(), torch.randn(B, T, 8), torch.randn(B, S, 8))
    td = infer(gm.graph)
    text, image = placeholder(gm, "text"), placeholder(gm, "image")
    joint, t1, i1, t2, i2 = outputs(gm)

    segs = td.segments((joint, None, 1))
    assert segs == [td.find((text, None, 1)), td.find((image, None, 1))]
    assert td.space_size((joint, None, 1)) == T + S
    # the composite itself is neither of its segments
    assert not linked(td, joint, 1, text, 1) and not linked(td, joint, 1, image, 1)
    # basic slicing at the segment boundary gives each segment back
    assert linked(td, t1, 1, text, 1) and linked(td, i1, 1, image, 1)
    # split at the boundary: getitem(split, i) resolves through the split's tuple slots
    assert linked(td, t2, 1, text, 1) and linked(td, i2, 1, image, 1)
    assert td.segments((t2, None, 1)) == [td.find((text, None, 1))]
    # feature and batch dims of the concatenation are shared by both inputs
    assert linked(td, text, 2, image, 2) and linked(td, joint, 0, image, 0)


class _OffBoundarySlice(nn.Module):
    def forward(self, text, image):
        joint = torch.cat([text, image], dim=1)
        return joint[:, : T + 1]


def test_slice_off_segment_boundary_resolves_to_nothing():
    gm = capture(_OffBoundarySlice(), torch.randn(B, T, 8), torch.randn(B, S, 8))
    td = infer(gm.graph)
    (y,) = outputs(gm)
    text, image = placeholder(gm, "text"), placeholder(gm, "image")
    assert not linked(td, y, 1, text, 1) and not linked(td, y, 1, image, 1)
    assert td.segments((y, None, 1)) == [td.find((y, None, 1))]


# ---- (e) merging dims links nothing --------------------------------------------------------------

class _Flatten(nn.Module):
    def forward(self, x):
        return x.flatten(2)


def test_flatten_merging_spatial_dims_does_not_link_them():
    h, w = 3, 4
    gm = capture(_Flatten(), torch.randn(B, 5, h, w))
    td = infer(gm.graph)
    x, (y,) = placeholder(gm, "x"), outputs(gm)
    assert tuple(y.meta["example_value"].shape) == (B, 5, h * w)
    assert linked(td, x, 0, y, 0) and linked(td, x, 1, y, 1)
    for dx in (2, 3):
        assert not any(linked(td, x, dx, y, dy) for dy in range(3))


# ---- (f) reduction over the token dim ----------------------------------------------------------------

class _SumTokens(nn.Module):
    def forward(self, x):
        return x.sum(dim=1), x.mean(dim=1, keepdim=True)


def test_sum_over_token_dim_links_nothing_for_that_dim():
    gm = capture(_SumTokens(), torch.randn(B, S, 8))
    td = infer(gm.graph)
    x, (s, m) = placeholder(gm, "x"), outputs(gm)
    assert tuple(s.meta["example_value"].shape) == (B, 8)
    assert linked(td, x, 0, s, 0) and linked(td, x, 2, s, 1)
    assert not any(linked(td, x, 1, s, d) for d in range(2))
    # keepdim: the reduced dim stays, as a size-1 dim of its own
    assert linked(td, x, 2, m, 2)
    assert not any(linked(td, x, 1, m, d) for d in range(3))


# ---- (g) ops without a rule ------------------------------------------------------------------------

class _NoRule(nn.Module):
    def forward(self, x):
        return torch.fft.fft(x, dim=1).real, torch.logcumsumexp(x, dim=1)


class _AlongDim(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, dim=1), x.sort(dim=1).values


def test_op_without_rule_links_nothing():
    gm = capture(_NoRule(), torch.randn(B, S, 8))
    td = infer(gm.graph)
    x = placeholder(gm, "x")
    no_rule = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is not getattr]
    assert len(no_rule) == 2
    for n in no_rule:
        assert rule_for(n) is None, n.name
        assert td.rules[n] is None
        assert not any(linked(td, x, dx, n, dn) for dx in range(3) for dn in range(3)), n.name


def test_along_dim_ops_keep_every_dim_but_the_one_they_scan():
    gm = capture(_AlongDim(), torch.randn(B, S, 8))
    td = infer(gm.graph)
    x, (c, s) = placeholder(gm, "x"), outputs(gm)
    for y in (c, s):
        assert linked(td, x, 0, y, 0) and linked(td, x, 2, y, 2)
        assert not linked(td, x, 1, y, 1)


# ---- argument parsing: positional p / dim ---------------------------------------------

class _NormPositionalP(nn.Module):
    def forward(self, x):  # x: [B, H, S, D]; reduce the head dim D
        return x.norm(2, dim=-1)


def test_norm_with_positional_p_keeps_the_token_dim():
    gm = capture(_NormPositionalP(), torch.randn(B, H, S, D))
    td = infer(gm.graph)
    x, (y,) = placeholder(gm, "x"), outputs(gm)
    assert tuple(y.meta["example_value"].shape) == (B, H, S)
    assert linked(td, x, 2, y, 2)


class _NormalizeOverTokens(nn.Module):
    def forward(self, x):  # x: [B, C, S] (channels first); normalize over the tokens, dim passed positionally
        return F.normalize(x, 2, 2)


def test_normalize_with_positional_dim_does_not_link_the_normalized_dim():
    gm = capture(_NormalizeOverTokens(), torch.randn(B, 8, S))
    td = infer(gm.graph)
    x, (y,) = placeholder(gm, "x"), outputs(gm)
    assert linked(td, x, 1, y, 1)  # the channel dim is kept
    assert not linked(td, x, 2, y, 2)  # the normalized (token) dim is not


def test_one_tensor_index_keeps_the_other_dims_and_ids_carry_the_picked_dim():
    class Index(nn.Module):
        def forward(self, x, ids, table):
            cols = torch.arange(1, 4, 2)
            return x[..., cols], table[ids]  # pick feature columns; gather table rows by token ids

    x, ids, table = torch.randn(B, S, D), torch.arange(S), torch.randn(10, D)
    gm = capture(Index(), x, ids, table)
    td = infer(gm.graph)
    picked, rows = outputs(gm)
    assert linked(td, placeholder(gm, "x"), 1, picked, 1)  # token dim of x passes through x[..., cols]
    assert linked(td, placeholder(gm, "ids"), 0, rows, 0)  # table[ids]: the row dim comes from the ids
    assert not linked(td, placeholder(gm, "table"), 0, rows, 0)


def test_cat_with_an_empty_piece_still_links_the_other_dims():
    class PartialRope(nn.Module):
        def forward(self, x):
            rot, rest = x[..., :4], x[..., 4:]  # rest is empty: the rotation covers the whole head dim
            return torch.cat((rot * 2.0, rest), dim=-1)

    gm = capture(PartialRope(), torch.randn(B, S, H, D))
    td = infer(gm.graph)
    (out,) = outputs(gm)
    rest = next(n for n in gm.graph.nodes if n.op != "output" and isinstance(example_value(n), torch.Tensor)
                and example_value(n).shape[-1] == 0)
    assert linked(td, rest, 1, out, 1)


def test_rule_table_is_read_only_after_import():
    from xdit_fx.compiler.passes.dim_rules import ELEMENTWISE, RULES, dim_rule

    assert all(name in RULES for name in ELEMENTWISE)
    with pytest.raises(TypeError):
        RULES["my_op"] = RULES["add"]  # type: ignore[index]
    with pytest.raises(RuntimeError):
        dim_rule("my_op")(lambda node, name: None)
    assert "my_op" not in RULES
