"""Communication is checked by counting the bytes the collectives actually moved, per mesh axis.

Analytic counts (per rank, per forward, fp32), with L = the local length of a site's sequence:
  ulysses: 4 all-to-alls (q, k, v, out) per site, each moving (N-1)/N of the local [B, H, L, D] tensor;
  ring:    N-1 steps per site, each receiving the K and V chunks of one peer;
  exit:    one all_gather of the output tokens on the "sp" axis: (N-1)/N of the output.
The expected sites come from each model's config and input shapes, not from the rewritten graph; and every
spawned worker also counts the bytes at the torch.distributed primitives (tests/dist_bytes.py), which must
equal the counts checked here, so a collective the wrappers do not report fails the test too."""

from __future__ import annotations

import pytest
import torch

import xdit_fx
from xdit_fx import zoo
from dist_utils import spawn_gloo

F32 = 4


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def steady_state(pm, name: str, model, inputs) -> dict:
    """What a parallelized model `pm`, which has run one forward on `inputs`, moves in a second, steady-state
    forward (the one counted), with the sites expected from the model's config and the inputs' shapes."""
    with torch.no_grad():
        out = _first(pm(**inputs))
    return {"comm": pm.last_comm, "sites": SITES[name](model, inputs), "out_bytes": out.numel() * F32,
            "batch": out.shape[0], "sp_sites": pm.histories[0].counts().get("sp_attention_sites", 0)}


def _flux_sites(model, inputs) -> list[tuple[int, int, int, int]]:
    """Joint text+image self-attention in every double and single block."""
    c = model.config
    length = inputs["hidden_states"].shape[1] + inputs["encoder_hidden_states"].shape[1]
    return [(c.num_attention_heads, c.attention_head_dim, length, length)] * (c.num_layers + c.num_single_layers)


def _scratch_dit_sites(model, inputs) -> list[tuple[int, int, int, int]]:
    """Self-attention over the patch tokens in every block."""
    _, _, height, width = inputs["x"].shape
    length = (height // model.patch) * (width // model.patch)
    return [(model.heads, model.x_embed.out_channels // model.heads, length, length)] * len(model.blocks)


#: per model: (heads, head_dim, query tokens, key tokens) of every attention, from its config and inputs
SITES = {"flux": _flux_sites, "scratch_dit": _scratch_dit_sites}


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


# ulysses=4 and ring=4 are counted in tests/test_four_ranks.py, in its one 4-process spawn. The models run in
# tests/test_equivalence.py's spawn of the plan's world size (`zoo_runs`, `steady_state`): one capture per model
@pytest.mark.parametrize("plan_text", ["ulysses=2", "ring=2", "ulysses=2,ring=2"])
def test_bytes_moved_equal_analytic_count(plan_text):
    from test_equivalence import zoo_runs

    plan = xdit_fx.Plan.from_string(plan_text)
    per_rank = [runs[plan_text] for runs in zoo_runs(plan.world_size)]
    for rank, name in ((r, m) for r in range(plan.world_size) for m in MODELS):
        res = per_rank[rank][("steady", name)]
        assert res["sp_sites"] == len(res["sites"]), f"{name}: {res['sp_sites']} of {len(res['sites'])} sites sharded"
        expected = analytic(plan, res["sites"], res["out_bytes"], res["batch"])
        assert res["comm"] == expected, f"{name} rank {rank}: measured {res['comm']} != analytic {expected}"


def two_models(rank: int, world: int) -> dict:
    """Two parallelized models in one process, with different plans, run one after the other and inside an
    outer counter."""
    torch._dynamo.reset()
    entry = zoo.get("scratch_dit")
    inputs = entry.inputs(uneven=False)
    a = xdit_fx.parallelize(entry.build(), "ulysses=2")
    b = xdit_fx.parallelize(entry.build(), "ring=2")
    with torch.no_grad():
        a(**inputs)
        b(**inputs)  # the first calls capture
        a(**inputs)
        a_alone = a.last_comm
        with xdit_fx.counting() as outer:
            out = _first(b(**inputs))
            b_counts = b.last_comm
            a(**inputs)
    return {"a_alone": a_alone, "a": a.last_comm, "b": b_counts, "outer_total": outer.total(),
            "sites": SITES["scratch_dit"](a.model, inputs), "out_bytes": out.numel() * F32, "batch": out.shape[0]}


def test_two_models_in_one_process_count_only_their_own_bytes():
    """Byte counts belong to a ParallelModule's own forward (no process-wide counter): each model's
    `last_comm` is its plan's analytic count, whatever ran before or around it, and a caller's counter sees
    the sum."""
    for res in spawn_gloo(2, two_models):
        sites, out_bytes, batch = res["sites"], res["out_bytes"], res["batch"]
        ulysses = analytic(xdit_fx.Plan(ulysses_degree=2), sites, out_bytes, batch)
        ring = analytic(xdit_fx.Plan(ring_degree=2), sites, out_bytes, batch)
        assert res["a_alone"] == ulysses and res["a"] == ulysses, res
        assert res["b"] == ring, res
        total = sum(v for ops in (*ulysses.values(), *ring.values()) for v in ops.values())
        assert res["outer_total"] == total
