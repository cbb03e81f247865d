"""Token-mixing patterns beyond plain softmax self-attention, on tiny from-scratch models (gloo on CPU).

Each model is a stack of blocks (an nn.ModuleList) so that fallback gathers inside blocks are counted.
Every pattern must match the single-process output under ulysses=2 and ring=2 (2 processes; masked_rows and
linear_attn also under ulysses=2,ring=2 on 4) with no fallback gather:
  masked_rows   a block-causal mask that masks some query rows fully within one ring chunk
  causal        SDPA(is_causal=True) over the sharded sequence
  fold_frames   temporal attention with the spatial tokens folded into the batch dim ([B*HW, F, D])
  linear_attn   ReLU linear attention: K^T V and sum(K) over the tokens -> all-reduce
  grid_conv     tokens -> (H, W) grid -> depthwise 3x3 conv -> tokens (Mix-FFN): halo exchange
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xdit_fx
from dist_utils import spawn_gloo

ATOL = 2e-6  # fp32; see tests/tolerances.py (the same bound as the zoo equivalence tests)
HEADS, DIM = 4, 32


def _heads(x):  # [B, L, C] -> [B, H, L, D]
    b, l, _ = x.shape
    return x.view(b, l, HEADS, -1).transpose(1, 2)


def _merge(x):  # [B, H, L, D] -> [B, L, C]
    b, h, l, d = x.shape
    return x.transpose(1, 2).reshape(b, l, h * d)


class AttnBlock(nn.Module):
    def __init__(self, causal: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.out = nn.Linear(DIM, DIM)
        self.causal = causal

    def forward(self, x, mask=None):
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        o = F.scaled_dot_product_attention(_heads(q), _heads(k), _heads(v), attn_mask=mask, is_causal=self.causal)
        return x + self.out(_merge(o))


class Stack(nn.Module):
    def __init__(self, make, depth=2):
        super().__init__()
        self.proj_in = nn.Linear(8, DIM)
        self.blocks = nn.ModuleList([make() for _ in range(depth)])
        self.proj_out = nn.Linear(DIM, 8)

    def forward(self, x, extra=None):  # extra: a mask or text states, passed to every block
        h = self.proj_in(x)
        for blk in self.blocks:
            h = blk(h, extra) if extra is not None else blk(h)
        return self.proj_out(h)


def block_causal_mask(lengths):
    """Segment i attends to segments 0..i: the first segment's queries see no key of the later chunks."""
    total = sum(lengths)
    m = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for n in lengths:
        m[start:start + n, :start + n] = True
        start += n
    return m


def case_masked_rows():
    model = Stack(lambda: AttnBlock())
    return model, {"x": torch.randn(1, 24, 8), "extra": block_causal_mask([6, 6, 12])}


def case_causal():
    return Stack(lambda: AttnBlock(causal=True)), {"x": torch.randn(2, 22, 8)}


class FoldFramesDiT(nn.Module):
    """Latte-style video blocks on [B, F, HW, C]: spatial attention over HW with the frames in the batch
    ([B*F, HW, C]), then temporal attention over F with the spatial tokens in the batch ([B*HW, F, C])."""

    def __init__(self, frames=3):
        super().__init__()
        self.frames = frames
        self.proj_in = nn.Linear(8, DIM)
        self.spatial = nn.ModuleList([AttnBlock() for _ in range(2)])
        self.temporal = nn.ModuleList([AttnBlock() for _ in range(2)])
        self.temp_pos = nn.Parameter(torch.randn(1, frames, DIM))
        self.proj_out = nn.Linear(DIM, 8)

    def forward(self, x):  # x: [B, F*HW, 8], frame-major
        b, n, _ = x.shape
        f = self.frames
        hw = n // f
        h = self.proj_in(x).reshape(b * f, hw, DIM)
        for sp_blk, t_blk in zip(self.spatial, self.temporal):
            h = sp_blk(h)
            h = h.reshape(b, f, hw, DIM).permute(0, 2, 1, 3).reshape(b * hw, f, DIM)
            h = t_blk(h + self.temp_pos)
            h = h.reshape(b, hw, f, DIM).permute(0, 2, 1, 3).reshape(b * f, hw, DIM)
        return self.proj_out(h.reshape(b, f * hw, DIM))


def case_fold_frames():
    return FoldFramesDiT(), {"x": torch.randn(2, 3 * 9, 8)}


class LinearAttnBlock(nn.Module):
    """ReLU linear attention (Sana-style): out = (q (K^T V)) / (q . sum_L K), plus a token-mean context."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)  # with bias: padding tokens are not zero after it
        self.ctx = nn.Linear(DIM, DIM)
        self.out = nn.Linear(DIM, DIM)
        self.cross_q = nn.Linear(DIM, DIM)
        self.cross_kv = nn.Linear(8, 2 * DIM)

    def forward(self, x, text):
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        q, k, v = F.relu(_heads(q)), F.relu(_heads(k)), _heads(v)  # [B, H, L, D]
        kv = torch.matmul(k.transpose(-1, -2), v)  # [B, H, D, D]: a sum over the tokens
        z = 1.0 / (torch.matmul(q, k.sum(dim=2, keepdim=True).transpose(-1, -2)) + 1e-6)  # [B, H, L, 1]
        o = _merge(torch.matmul(q, kv) * z)
        x = x + self.out(o) + self.ctx(x.mean(dim=1, keepdim=True))
        tk, tv = self.cross_kv(text).chunk(2, dim=-1)  # the block's only SDPA: cross-attention to text
        return x + _merge(F.scaled_dot_product_attention(_heads(self.cross_q(x)), _heads(tk), _heads(tv)))


def case_linear_attn():  # 21 tokens: the last rank holds a padding token that must not enter the sums
    return Stack(LinearAttnBlock), {"x": torch.randn(2, 21, 8), "extra": torch.randn(2, 5, 8)}


class MixFFNBlock(nn.Module):
    """Attention, then a Mix-FFN: tokens -> (H, W) grid -> 1x1, depthwise 3x3, 1x1 convs -> tokens, and a
    1-D conv over the token sequence (kernel 3)."""

    def __init__(self, h, w):
        super().__init__()
        self.h, self.w = h, w
        self.attn = AttnBlock()
        self.inv = nn.Conv2d(DIM, 2 * DIM, 1)
        self.depth = nn.Conv2d(2 * DIM, 2 * DIM, 3, padding=1, groups=2 * DIM)
        self.point = nn.Conv2d(2 * DIM, DIM, 1)
        self.seq_conv = nn.Conv1d(DIM, DIM, 3, padding=1)

    def forward(self, x):
        x = self.attn(x)
        b, l, c = x.shape
        g = x.unflatten(1, (self.h, self.w)).permute(0, 3, 1, 2)
        g = self.point(F.silu(self.depth(F.silu(self.inv(g)))))
        x = x + g.flatten(2).transpose(1, 2)
        return x + self.seq_conv(x.transpose(1, 2)).transpose(1, 2)


def case_grid_conv():  # a 6 x 5 grid: 3 whole rows per rank
    return Stack(lambda: MixFFNBlock(6, 5)), {"x": torch.randn(1, 30, 8)}


CASES = {"masked_rows": case_masked_rows, "causal": case_causal, "fold_frames": case_fold_frames,
         "linear_attn": case_linear_attn, "grid_conv": case_grid_conv}


def run_cases(rank, world, plan_text, names):
    results = {}
    for name in names:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model, inputs = CASES[name]()
        model.eval()
        with torch.no_grad():
            ref = model(**inputs)
            pm = xdit_fx.parallelize(model, plan_text)
            out = pm(**inputs)
        counts = {}
        for h in pm.histories:
            for k, v in h.counts().items():
                counts[k] = counts.get(k, 0) + v
        results[name] = {"max_abs": (out - ref).abs().max().item(), "ref_max": ref.abs().max().item(),
                         "nan": bool(out.isnan().any()), "counts": counts}
    return results


PLANS = ["ulysses=2", "ring=2"]
# the mechanism each case must use (pass counts), so that a case cannot pass by running unparallelized
EXPECT = {"linear_attn": ("partial_sums", 6), "grid_conv": ("halo_exchanges", 4), "causal": ("sp_attention_sites", 2)}


USP_CASES = ["masked_rows", "linear_attn"]  # 4 processes: masks by global position, all-reduce over ring x ulysses


@pytest.fixture(scope="module", params=PLANS)
def plan_results(request):
    return request.param, spawn_gloo(2, run_cases, request.param, list(CASES))


@pytest.fixture(scope="module")
def usp_results():
    return "ulysses=2,ring=2", spawn_gloo(4, run_cases, "ulysses=2,ring=2", USP_CASES)


def _check(plan, per_rank, name):
    for rank, results in enumerate(per_rank):
        r = results[name]
        c = r["counts"]
        assert not r["nan"], f"{name} {plan} rank {rank}: NaN in the output"
        assert r["max_abs"] <= ATOL + 1e-6 * r["ref_max"], f"{name} {plan} rank {rank}: max abs {r['max_abs']:.3g}"
        assert c.get("fallback_gathers", 0) == 0, f"{name} {plan}: {c.get('fallback_gathers')} fallback gathers"
        assert c.get("token_spaces", 0) > 0, f"{name} {plan}: nothing sharded ({c})"
        assert c.get("blocks", 0) > 0, f"{name} {plan}: no transformer block found, fallbacks would not count"
        if name in EXPECT:
            key, count = EXPECT[name]
            assert c.get(key, 0) == count, f"{name} {plan}: expected {count} {key}, got {c.get(key, 0)} ({c})"


@pytest.mark.parametrize("name", list(CASES))
def test_pattern_matches_single_process(plan_results, name):
    _check(*plan_results, name)


@pytest.mark.parametrize("name", USP_CASES)
def test_pattern_matches_single_process_usp(usp_results, name):
    _check(*usp_results, name)


def test_inserted_node_names_are_unique():
    """Two values that would both be called shard_<x> (a value sliced along two layouts) get distinct names."""
    from xdit_fx.compiler.fx_utils import set_unique_name

    g = torch.fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.neg, (x,))
    b = g.call_function(torch.neg, (x,))
    set_unique_name(g, a, "shard_x")
    set_unique_name(g, b, "shard_x")
    c = g.call_function(torch.neg, (b,))  # a node fx names later does not take a name given above
    g.output(c)
    names = [n.name for n in g.nodes]
    assert names[1:3] == ["shard_x", "shard_x_v2"], names
    assert len(set(names)) == len(names), names
