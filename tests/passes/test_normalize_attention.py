"""normalize_attention on small graphs: each hand-written form becomes exactly one SDPA node, the rewritten
graph computes the same values, and forms that are not attention (or whose weights are used) are left alone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xdit_fx.compiler.fx_utils import is_sdpa
from xdit_fx.compiler.passes import Mesh, PassContext, normalize_attention, run_pipeline
from xdit_fx.plan import Plan

CTX = PassContext(plan=Plan(ulysses_degree=2), mesh=Mesh(ulysses=2))


def capture(model: nn.Module, *args):
    """One dynamo graph plus the real tensors it was called with (parameters included)."""
    got = []

    def recorder(gm, example_inputs):
        got.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=recorder, fullgraph=True, dynamic=False)(*args)
    assert len(got) == 1
    return got[0]


def normalized(model: nn.Module, *args):
    gm, inputs = capture(model, *args)
    with torch.no_grad():
        before = gm(*inputs)
    gm = run_pipeline(gm, [normalize_attention], CTX)
    with torch.no_grad():
        after = gm(*inputs)
    return gm, before, after


def ops(gm, *names):
    return sum(1 for n in gm.graph.nodes if any(name in str(n.target) for name in names))


class Manual(nn.Module):
    """Hand-written attention in the variants seen in real models."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.qkv = nn.Linear(16, 48)

    def forward(self, x, mask):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        if self.form == "matmul_div":
            w = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(8)
            return torch.softmax(w, dim=-1) @ v
        if self.form == "scaled_q_mask_add":
            w = (q * 8 ** -0.5) @ k.transpose(-2, -1) + mask
            return F.dropout(w.softmax(-1), p=0.1, training=False) @ v
        if self.form == "masked_fill":
            w = q @ k.transpose(-2, -1) * 0.25
            w = w.masked_fill(mask < -1, float("-inf"))
            return w.float().softmax(dim=-1).type_as(v) @ v
        if self.form == "bmm":
            q, k, v = (t.reshape(b * 2, n, 8) for t in (q, k, v))
            return torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)) * 0.3, dim=-1), v)
        if self.form == "baddbmm":
            q, k, v = (t.reshape(b * 2, n, 8) for t in (q, k, v))
            bias = torch.zeros(1, 1, n)
            return torch.bmm(torch.softmax(torch.baddbmm(bias, q, k.transpose(1, 2), beta=1.0, alpha=0.3), -1), v)
        if self.form == "baddbmm_beta0":  # T5-style: an empty input with beta=0
            q, k, v = (t.reshape(b * 2, n, 8) for t in (q, k, v))
            empty = torch.empty(b * 2, n, n)
            return torch.bmm(torch.baddbmm(empty, q, k.transpose(-1, -2), beta=0, alpha=0.3).softmax(-1), v)
        if self.form == "pre_transposed_k":
            kt = k.permute(0, 1, 3, 2).contiguous()
            return torch.softmax(q @ kt * 0.3, dim=-1) @ v
        raise AssertionError(self.form)


FORMS = ["matmul_div", "scaled_q_mask_add", "masked_fill", "bmm", "baddbmm", "baddbmm_beta0", "pre_transposed_k"]


@pytest.mark.parametrize("form", FORMS)
def test_hand_written_attention_becomes_one_sdpa(form):
    torch.manual_seed(0)
    x, mask = torch.randn(1, 6, 16), torch.randn(1, 1, 6, 6)
    gm, before, after = normalized(Manual(form).eval(), x, mask)
    assert ops(gm, "scaled_dot_product_attention") == 1
    assert ops(gm, "softmax") == 0
    torch.testing.assert_close(after, before, atol=2e-6, rtol=1e-5)


def test_attention_weights_with_another_use_are_left_alone():
    class ReturnsWeights(nn.Module):
        def forward(self, q, k, v):
            w = (q @ k.transpose(-2, -1)).softmax(dim=-1)
            return w @ v, w.mean()

    gm, before, after = normalized(ReturnsWeights(), *(torch.randn(1, 2, 5, 4) for _ in range(3)))
    assert ops(gm, "scaled_dot_product_attention") == 0 and ops(gm, "softmax") == 1


def test_softmax_over_another_dim_is_not_attention():
    class NotAttention(nn.Module):
        def forward(self, q, k, v):
            return (q @ k.transpose(-2, -1)).softmax(dim=-2) @ v

    gm, _, _ = normalized(NotAttention(), *(torch.randn(1, 2, 5, 4) for _ in range(3)))
    assert ops(gm, "scaled_dot_product_attention") == 0


@pytest.mark.parametrize("masks", ["none", "key_padding", "attn_mask", "both"])
@pytest.mark.parametrize("kdim", [None, 12])
def test_multihead_attention_becomes_sdpa(masks, kdim):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True, kdim=kdim, vdim=kdim)

        def forward(self, x, c, pad, am):
            out, _ = self.attn(x, c, c, key_padding_mask=pad if masks in ("key_padding", "both") else None,
                               attn_mask=am if masks in ("attn_mask", "both") else None)
            return out

    torch.manual_seed(0)
    x, c = torch.randn(2, 6, 16), torch.randn(2, 5, kdim or 16)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[0, -2:] = True
    am = torch.randn(6, 5)
    if masks == "both":  # mixed bool / float masks make torch warn (a graph break): both float here
        pad = torch.zeros(2, 5).masked_fill(pad, float("-inf"))
    gm, before, after = normalized(M().eval(), x, c, pad, am)
    assert ops(gm, "multi_head_attention_forward") == 0
    assert ops(gm, "scaled_dot_product_attention") == 1
    torch.testing.assert_close(after, before, atol=2e-6, rtol=1e-5)


def test_rewritten_nodes_keep_module_path_and_fake_values():
    gm, _, _ = normalized(Manual("matmul_div").eval(), torch.randn(1, 6, 16), torch.randn(1, 1, 6, 6))
    (sdpa,) = [n for n in gm.graph.nodes if is_sdpa(n)]
    assert tuple(sdpa.meta["example_value"].shape) == (1, 2, 6, 8)
    assert sdpa.meta.get("stack_trace")


def test_flex_attention_becomes_one_sdpa_site_and_a_non_bias_score_mod_is_refused_naming_the_node():
    from torch.nn.attention.flex_attention import flex_attention

    from xdit_fx.errors import UnsupportedGraph
    from xdit_fx.compiler.passes import find_attention

    class Flex(nn.Module):
        def forward(self, q, k, v):
            return flex_attention(q, k, v)

    class Capped(nn.Module):  # soft-capping: a score_mod that is not score + bias
        def forward(self, q, k, v):
            return flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: torch.tanh(s))

    inputs = [torch.randn(1, 2, 8, 4) for _ in range(3)]
    gm, _ = capture(Flex(), *inputs)
    run_pipeline(gm, [normalize_attention, find_attention], CTX)
    assert not any("flex_attention" in str(n.target) for n in gm.graph.nodes)
    assert sum(is_sdpa(n) for n in gm.graph.nodes) == 1
    out = gm(*inputs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, flex_attention(*inputs), atol=1e-6, rtol=0)  # measured worst 2.4e-7 over 5 seeds
    gm, _ = capture(Capped(), *inputs)
    with pytest.raises(UnsupportedGraph, match="flex_attention"):
        run_pipeline(gm, [normalize_attention, find_attention], CTX)
