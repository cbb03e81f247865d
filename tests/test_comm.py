"""Communication is checked by counting the bytes the collectives actually moved, per mesh axis.

Analytic counts (per rank, per forward, fp32), with L = the local length of a site's sequence:
  ulysses: 4 all-to-alls (q, k, v, out) per site, each moving (N-1)/N of the local [B, H, L, D] tensor;
  ring:    N-1 steps per site, each receiving the K and V chunks of one peer;
  exit:    one all_gather of the output tokens on the "sp" axis: (N-1)/N of the output.
Anything more would be a hidden gather."""

from __future__ import annotations

import pytest
import torch

import xdit_fx
from xdit_fx import zoo
from xdit_fx.fx_utils import META_ATTENTION, META_SP_ATTENTION
from dist_utils import spawn_gloo

F32 = 4


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def measure(rank: int, world: int, plan_text: str, names: list[str]) -> dict:
    return {name: measure_one(plan_text, name) for name in names}


def measure_one(plan_text: str, name: str) -> dict:
    torch._dynamo.reset()
    plan = xdit_fx.Plan.from_string(plan_text)
    entry = zoo.get(name)
    model = entry.build()
    inputs = entry.inputs(uneven=False)
    with torch.no_grad():
        pm = xdit_fx.parallelize(model, plan)
        out = _first(pm(**inputs))
        out = _first(pm(**inputs))  # a second, steady-state forward is the one counted
    sites = []
    for node in pm.graphs[0].graph.nodes:
        spec = node.meta.get(META_SP_ATTENTION)
        if spec is not None and spec["kv_segments"] is not None:
            s = node.meta[META_ATTENTION]
            sites.append((s.heads, s.head_dim, s.q_len, s.kv_len))
    return {"comm": pm.last_comm, "sites": sites, "out_bytes": out.numel() * F32, "batch": out.shape[0]}


def analytic(plan: xdit_fx.Plan, sites, out_bytes: int, batch: int) -> dict[str, dict[str, int]]:
    n, u, r = plan.sequence_parallel_degree, plan.ulysses_degree, plan.ring_degree
    expected: dict[str, dict[str, int]] = {"sp": {"all_gather": (n - 1) * out_bytes // n}}
    for heads, head_dim, q_len, kv_len in sites:
        local_q = batch * heads * (q_len // n) * head_dim * F32
        local_kv = batch * heads * (kv_len // n) * head_dim * F32
        if u > 1:
            a2a = expected.setdefault("ulysses", {}).setdefault("all_to_all", 0)
            expected["ulysses"]["all_to_all"] = a2a + (u - 1) * (2 * local_q + 2 * local_kv) // u
        if r > 1:
            kv_after_a2a = 2 * local_kv  # K and V after the all-to-all: H/U heads x U*L tokens
            p2p = expected.setdefault("ring", {}).setdefault("ring_p2p", 0)
            expected["ring"]["ring_p2p"] = p2p + (r - 1) * kv_after_a2a
    return expected


MODELS = ["scratch_dit", "flux"]  # self-attention, and joint text+image attention


@pytest.mark.parametrize("plan_text", ["ulysses=2", "ring=2", "ulysses=4", "ulysses=2,ring=2"])
def test_bytes_moved_equal_analytic_count(plan_text):
    plan = xdit_fx.Plan.from_string(plan_text)
    per_rank = spawn_gloo(plan.world_size, measure, plan_text, MODELS)
    for rank, name in ((r, m) for r in range(plan.world_size) for m in MODELS):
        res = per_rank[rank][name]
        assert res["sites"], "no sequence-parallel attention site"
        expected = analytic(plan, res["sites"], res["out_bytes"], res["batch"])
        assert res["comm"] == expected, f"{name} rank {rank}: measured {res['comm']} != analytic {expected}"
