"""Multi-process (gloo, CPU) equivalence: parallel output == single-process output of the same model.

One spawn per world size runs every plan of that size on every zoo model, with token counts divisible by the
degree and not (uneven), so the process start-up and imports are paid once per world size. The same runs
also take tests/test_comm.py's steady-state byte counts (a second forward of its models on even token
counts), so those models are not captured and compiled a second time."""

from __future__ import annotations

import os

import pytest
import torch

import xdit_fx
from xdit_fx import zoo
from dist_utils import spawn_gloo
from test_comm import MODELS as COMM_MODELS, steady_state
from tolerances import tolerance

MODELS = ["flux", "sd3", "pixart", "wan", "hunyuan_video", "scratch_dit", "scratch_mmdit",
          "cogvideox",  # in-place write of a positional table through .data (uneven size)
          "cogview4",   # RoPE written in place into the image segment of q and k
          "scratch_mha_uvit",  # nn.MultiheadAttention, U-ViT long skips (normalize_attention)
          "scratch_manual_video"]  # hand-written softmax(q k^T) v, bmm/baddbmm, Conv3d patching
PLANS = ["ulysses=2", "ring=2", "ulysses=2,ring=2"]
#: token counts per plan (uneven: not divisible by the degree): the 4-process USP run takes the uneven ones only,
#: the layout only it has (padded chunks behind an all-to-all); even counts are the 2-process plans' case
#: (and even ones for tests/test_comm.py's models, whose bytes are counted on even token counts)
COUNTS = {xdit_fx.Plan.from_string("ulysses=2,ring=2"): (True,)}
#: the 4-process USP run's models by default (4 processes on 2 cores are slow): joint text+image attention, a
#: key mask with GQA and a register token, a text padding mask, video with cross-attention, and test_comm's
#: scratch_dit; every model of MODELS with XDIT_FX_SLOW_TESTS=1
USP = xdit_fx.Plan.from_string("ulysses=2,ring=2")
USP_MODELS = MODELS if os.environ.get("XDIT_FX_SLOW_TESTS") == "1" else ["flux", "scratch_dit", "scratch_mmdit", "hunyuan_video", "wan"]


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def run_zoo(rank: int, world: int, plan_text: str, names: list[str], token_counts=(False, True),
            steady: tuple[str, ...] = ()) -> dict:
    """Every model of `names` with even and/or uneven token counts (`token_counts`: the values of `uneven`).

    The models of `steady` also run with even token counts, and a second forward of those is measured as
    tests/test_comm.py does (`steady_state`), under the key ("steady", name)."""
    plan = xdit_fx.Plan.from_string(plan_text)
    results = {}
    for name in names:
        for uneven in sorted(set(token_counts) | ({False} if name in steady else set())):
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
            if name in steady and not uneven:
                results[("steady", name)] = steady_state(pm, name, model, inputs)
    return results


def run_plans(rank: int, world: int, plan_texts: list[str]) -> dict:
    """run_zoo for each plan, with its token counts (COUNTS) and test_comm's steady-state counts."""
    return {p: run_zoo(rank, world, p, USP_MODELS if xdit_fx.Plan.from_string(p) == USP else MODELS,
                       COUNTS.get(xdit_fx.Plan.from_string(p), (False, True)), steady=tuple(COMM_MODELS))
            for p in plan_texts}


_RUNS: dict[int, list[dict]] = {}


def zoo_runs(world_size: int) -> list[dict]:
    """Per rank, {plan: run_zoo results} for every plan of PLANS with this world size, from one spawn per world
    size and test session (read-only once made; tests/test_comm.py reads the same runs)."""
    if world_size not in _RUNS:
        plans = [p for p in PLANS if xdit_fx.Plan.from_string(p).world_size == world_size]
        _RUNS[world_size] = spawn_gloo(world_size, run_plans, plans)
    return _RUNS[world_size]


@pytest.fixture(scope="module", params=PLANS)
def plan_results(request):
    plan = xdit_fx.Plan.from_string(request.param)
    return plan, [runs[request.param] for runs in zoo_runs(plan.world_size)]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("uneven", [False, True], ids=["even", "uneven"])
def test_parallel_matches_single_process(plan_results, name, uneven):
    plan, per_rank = plan_results
    if (name, uneven) not in per_rank[0]:
        pytest.skip(f"{plan.to_string()} does not run {name} on {'uneven' if uneven else 'even'} token counts "
                    f"(COUNTS; even ones for test_comm's models only; USP_MODELS: the others with "
                    f"XDIT_FX_SLOW_TESTS=1)")
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
