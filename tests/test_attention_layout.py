"""Attention without dense biases: an uneven split (padded keys) and a key mask build no [Lq, Lk] tensor, and
grouped-query K/V travel and attend with their own heads (no repeated heads), with the single process's output.

One 2-process spawn runs `ulysses=2` and `ring=2` on a Flux-architecture model with an odd text and image
token count (178 tokens: padded chunks on rank 1) and on the from-scratch MMDiT (GQA 4 query / 2 K/V heads and a
boolean text key mask; 23 tokens, uneven). A second forward runs under a TorchDispatchMode that records every
op and the shape of every tensor it returns. The [Lq, Lk] check: no tensor whose last two dims both lie
between the local and the global token count (flux: hidden 64, MLP 256 and head dim 16 are outside [87, 180],
so only an attention-shaped tensor can match). The old code built a [1, 1, 180, 180] (ulysses) or
[1, 1, 90, 180] (ring) additive bias on every call, which this check flags.

Measured on this machine (2 CPU cores, torch 2.13): max abs error against the single process 4.8e-7 (flux) and
3.0e-7 (scratch_mmdit); tolerances are tests/tolerances.py's."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import xdit_fx
from xdit_fx import zoo
from xdit_fx.ops.attention import layout, runs_of
from xdit_fx.ops.collectives import _parse_keep
from dist_utils import spawn_gloo
from tolerances import tolerance

PLANS = ["ulysses=2", "ring=2"]
FLUX_GRID, FLUX_TEXT = (13, 13), 9  # 169 image + 9 text tokens: both odd


class OpShapes(TorchDispatchMode):
    """Every aten op run and the shapes of the tensors it returns."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []
        self.kernels: list[tuple[tuple, tuple]] = []  # (q shape, k shape) of every fused attention call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "flash_attention" in str(func):
            self.kernels.append((tuple(args[0].shape), tuple(args[1].shape)))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for t in outs:
            if isinstance(t, torch.Tensor):
                self.ops.append((str(func.overloadpacket.__name__), tuple(t.shape)))
        return out


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _cases():
    torch.manual_seed(0)
    flux = zoo.build_flux(num_layers=1, num_single_layers=1).eval()
    entry = zoo.get("scratch_mmdit")
    return {"flux": (flux, zoo.flux_inputs(*FLUX_GRID, FLUX_TEXT)),
            "scratch_mmdit": (entry.build().eval(), entry.inputs(uneven=True))}


def _runs(rank: int, world: int) -> dict:
    results = {}
    for plan in PLANS:
        for name, (model, inputs) in _cases().items():
            torch._dynamo.reset()
            with torch.no_grad():
                ref = _first(model(**inputs))
                pm = xdit_fx.parallelize(model, plan)
                pm(**inputs)  # capture
                with OpShapes() as seen:
                    out = _first(pm(**inputs))
            results[(plan, name)] = {"err": (out - ref).abs().max().item(), "ref_max": ref.abs().max().item(),
                                     "ops": seen.ops, "kernels": seen.kernels}
    return results


@pytest.fixture(scope="module")
def per_rank():
    return spawn_gloo(2, _runs)


@pytest.mark.parametrize("plan", PLANS)
def test_uneven_split_and_key_mask_build_no_dense_bias(per_rank, plan):
    total = FLUX_GRID[0] * FLUX_GRID[1] + FLUX_TEXT
    lo, hi = total // 2 - 2, total + 2
    for rank, res in enumerate(per_rank):
        for name in ("flux", "scratch_mmdit"):
            r = res[(plan, name)]
            tol = tolerance(xdit_fx.Plan.from_string(plan))
            assert r["err"] <= tol.atol + tol.rtol * r["ref_max"], (plan, name, rank, r["err"])
            assert any(op == "_scaled_dot_product_flash_attention_for_cpu" for op, _ in r["ops"]), (plan, name)
        dense = [(op, s) for op, s in res[(plan, "flux")]["ops"]
                 if len(s) >= 2 and lo <= s[-2] <= hi and lo <= s[-1] <= hi]
        assert not dense, f"{plan} rank {rank}: [Lq, Lk]-shaped tensors built: {dense[:5]}"
        # scratch_mmdit's key mask [B, 1, 1, 23] stays a key mask: nothing [.., Lq, Lk] with Lk in 20..29 (its
        # 23 tokens, padded 24; head dim 16, model dim 64 and MLP 128 are outside) and Lq > 1
        mm = [(op, s) for op, s in res[(plan, "scratch_mmdit")]["ops"]
              if len(s) == 4 and 20 <= s[-1] < 30 and s[-2] > 1]
        assert not mm, f"{plan} rank {rank}: scratch_mmdit built {mm[:5]}"


@pytest.mark.parametrize("plan", PLANS)
def test_grouped_query_kv_heads_are_not_repeated(per_rank, plan):
    """scratch_mmdit has 4 query and 2 K/V heads: no op repeats them, and the kernel gets K/V with their own
    heads (ulysses=2: 1 K/V head per rank against 2 query heads)."""
    for rank, res in enumerate(per_rank):
        r = res[(plan, "scratch_mmdit")]
        assert not [op for op, _ in r["ops"] if op == "repeat_interleave"], (plan, rank)
        assert r["kernels"] and all(q[1] == 2 * k[1] for q, k in r["kernels"]), (plan, rank, r["kernels"])


def test_layout_cuts_padded_keys_and_keeps_query_rows():
    """Two segments (7 text, 15 image tokens) over 2 ranks: rank 1's chunks end with one padded token each."""
    segs = ((7, True), (15, True))
    ring = layout(segs, segs, 2, 1, 2, 1)
    assert ring.padded_keys and ring.q_runs == ((0, 4, 3), (3, -1, 1), (4, 15, 7), (11, -1, 1))
    assert ring.k_runs == (((0, 0, 4), (4, 7, 8)), ((0, 4, 3), (4, 15, 7)))
    assert _parse_keep(list(ring.keep), 2, 12) == [(0, ((0, 4), (4, 8))), (12, ((0, 3), (4, 7)))]
    uly = layout(segs, segs, 2, 2, 1, 0)  # after the all-to-all: both ranks' chunks, one key chunk
    assert uly.k_runs == (((0, 0, 4), (4, 7, 8), (12, 4, 3), (16, 15, 7)),)
    even = layout(((8, True),), ((8, True),), 2, 2, 1, 1)
    assert not even.padded_keys and even.keep == ()
    assert runs_of((3, 4, -1, -1, 9)) == ((0, 3, 2), (2, -1, 2), (4, 9, 1))
