"""Multi-process (gloo, CPU) equivalence: parallel output == single-process output of the same model.

One spawn per plan runs every zoo model, with token counts divisible by the degree and not (uneven),
so the process start-up and imports are paid once per plan."""

from __future__ import annotations

import pytest
import torch

import xdit_fx
from xdit_fx import zoo
from dist_utils import spawn_gloo
from tolerances import tolerance

MODELS = ["flux", "sd3", "pixart", "wan", "hunyuan_video", "scratch_dit", "scratch_mmdit",
          "cogvideox",  # in-place write of a positional table through .data (uneven size)
          "cogview4",   # RoPE written in place into the image segment of q and k
          "scratch_mha_uvit",  # nn.MultiheadAttention, U-ViT long skips (normalize_attention)
          "scratch_manual_video"]  # hand-written softmax(q k^T) v, bmm/baddbmm, Conv3d patching
PLANS = ["ulysses=2", "ring=2", "ulysses=2,ring=2"]
#: token counts per plan (uneven: not divisible by the degree): the 4-process USP run takes the uneven ones only,
#: the layout only it has (padded chunks behind an all-to-all); even counts are the 2-process plans' case
COUNTS = {xdit_fx.Plan.from_string("ulysses=2,ring=2"): (True,)}


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def run_zoo(rank: int, world: int, plan_text: str, names: list[str], token_counts=(False, True)) -> dict:
    """Every model of `names` with even and/or uneven token counts (`token_counts`: the values of `uneven`)."""
    plan = xdit_fx.Plan.from_string(plan_text)
    results = {}
    for name in names:
        for uneven in token_counts:
            torch._dynamo.reset()
            entry = zoo.get(name)
            model = entry.build()
            inputs = entry.inputs(uneven=uneven)
            with torch.no_grad():
                ref = _first(model(**inputs))
                pm = xdit_fx.parallelize(model, plan)
                out = _first(pm(**inputs))
            counts = pm.histories[0].counts()
            results[(name, uneven)] = {
                "shape_ok": out.shape == ref.shape,
                "max_abs": (out - ref).abs().max().item(),
                "ref_max": ref.abs().max().item(),
                "fallback_gathers": counts.get("fallback_gathers", 0),
                "sites": counts.get("sp_attention_sites", 0),
                "graphs": len(pm.histories),
                "comm": pm.last_comm,
                "out_bytes": out.numel() * out.element_size(),
                "batch": out.shape[0],
            }
    return results


@pytest.fixture(scope="module", params=PLANS)
def plan_results(request):
    plan = xdit_fx.Plan.from_string(request.param)
    per_rank = spawn_gloo(plan.world_size, run_zoo, request.param, MODELS, COUNTS.get(plan, (False, True)))
    return plan, per_rank


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("uneven", [False, True], ids=["even", "uneven"])
def test_parallel_matches_single_process(plan_results, name, uneven):
    plan, per_rank = plan_results
    if uneven not in COUNTS.get(plan, (False, True)):
        pytest.skip(f"{plan.to_string()} runs {'uneven' if uneven else 'even'} token counts only (COUNTS)")
    tol = tolerance(plan)
    for rank, results in enumerate(per_rank):
        r = results[(name, uneven)]
        assert r["shape_ok"], f"rank {rank}: output shape differs"
        assert r["graphs"] == 1, f"rank {rank}: expected one captured graph, got {r['graphs']}"
        assert r["sites"] > 0, f"rank {rank}: no attention site was parallelized"
        assert r["fallback_gathers"] == 0, f"rank {rank}: {r['fallback_gathers']} fallback gathers in the blocks"
        assert r["max_abs"] <= tol.atol + tol.rtol * r["ref_max"], (
            f"{name} {plan.to_string()} uneven={uneven} rank {rank}: max abs error {r['max_abs']:.3g} "
            f"> {tol.atol} ({tol.why})")
