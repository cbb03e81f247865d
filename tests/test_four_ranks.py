"""Four ranks, where two cannot tell: a ring of 4 (the next and the previous rank differ, and a chunk travels
through a rank that does not own it), Ulysses over 4 (a quarter of the heads per rank), PipeFusion with
4 stages (the middle stages both receive and send), and PipeFusion=2 with Ulysses or ring inside each
stage. One 4-process spawn runs them all; every output is
compared with the single process (ring, Ulysses) or with the independent stale-K/V reference (PipeFusion),
and the bytes of the even runs with tests/test_comm.py's formulas.

Measured on this machine's CPU (2 cores, torch 2.13): worst max abs error ring=4 4.8e-7, ulysses=4 3.6e-7
(even and uneven token counts, with and without a key mask); PipeFusion against the reference 2.4e-7.
A wrong ring chunk owner moves ring=4 outputs by 0.015-0.046; never-refreshed K/V buffers move PipeFusion by
1e-3 and more."""

from __future__ import annotations

import torch

import xdit_fx
from xdit_fx import zoo
from dist_utils import spawn_gloo
from references import pipefusion_reference
from test_comm import SITES, analytic
from test_equivalence import run_zoo
from tolerances import TOLERANCES

PARITY_PLANS = ["ring=4", "ulysses=4"]
PARITY_MODELS = ["flux", "scratch_mmdit"]  # joint text+image; key mask, GQA and a register token
#: PipeFusion=4 runs a Flux of 2 double + 2 single blocks (one per stage) over 4 patches
PF_PLAN, PF_PATCHES, PF_CALLS = "pipefusion=4,patches=4,warmup=1", 4, 3
PF_SEGMENTS = (8, 16)  # text, image tokens of flux_inputs(4, 4, 8)
#: and PipeFusion=2 with USP inside each stage, over 2 patches: the same stale semantics
PF_HYBRIDS = ["pipefusion=2,ulysses=2,patches=2,warmup=1", "pipefusion=2,ring=2,patches=2,warmup=1"]
#: PipeFusion against the reference: the same ops on the same values, patch by patch (2.4e-7 measured)
PF_ATOL = 2e-6


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _pf_model_and_calls():
    torch.manual_seed(0)
    model = zoo.build_flux(num_layers=2, num_single_layers=2).eval()
    base = zoo.flux_inputs(4, 4, 8)
    g = torch.Generator().manual_seed(1)
    calls = [{k: v + 0.05 * t * torch.randn(v.shape, generator=g) if torch.is_tensor(v) and v.is_floating_point() and v.dim() == 3 else v
              for k, v in base.items()} for t in range(PF_CALLS)]
    return model, calls


def _runs(rank: int, world: int) -> dict:
    results = {}
    for plan_text in PARITY_PLANS:
        for (name, uneven), r in run_zoo(rank, world, plan_text, PARITY_MODELS).items():
            results[(plan_text, name, uneven)] = r
    for plan_text in [PF_PLAN, *PF_HYBRIDS]:
        torch._dynamo.reset()
        model, calls = _pf_model_and_calls()  # a fresh model: PipeFusion frees the other stages' parameters
        pm = xdit_fx.parallelize(model, plan_text)
        with torch.no_grad():
            outs = [_first(pm(**c)) for c in calls]
        results[plan_text] = {"outs": outs, "warm": [r.warm for r in pm.pipefusion.records],
                              "comm": pm.last_comm, "stage": pm.pipefusion.stage}
    return results


def test_ring_and_ulysses_over_four_ranks_and_pipefusion_with_four_stages_or_usp_stages():
    per_rank = spawn_gloo(4, _runs)
    for plan_text in PARITY_PLANS:
        plan = xdit_fx.Plan.from_string(plan_text)
        tol = TOLERANCES[plan_text.split("=")[0]]
        axis, op = ("ring", "ring_p2p") if plan_text.startswith("ring") else ("ulysses", "all_to_all")
        for name in PARITY_MODELS:
            entry = zoo.get(name)
            sites = SITES[name](entry.build(), entry.inputs()) if name in SITES else None
            for uneven in (False, True):
                for rank, res in enumerate(per_rank):
                    r = res[(plan_text, name, uneven)]
                    where = f"{plan_text} {name} uneven={uneven} rank {rank}"
                    assert r["shape_ok"] and r["graphs"] == 1, f"{where}: {r}"
                    assert r["sites"] > 0 and r["fallback_gathers"] == 0, f"{where}: {r}"
                    assert r["comm"][axis][op] > 0, f"{where}: nothing moved on the {axis} axis"
                    if sites is not None and not uneven:  # bytes from the config, input shapes and plan
                        expected = analytic(plan, sites, r["out_bytes"], r["batch"])
                        assert r["comm"] == expected, f"{where}: moved {r['comm']} != analytic {expected}"
                    assert r["max_abs"] <= tol.atol, f"{where}: max abs error {r['max_abs']:.3g} > {tol.atol} ({tol.why})"

    model, calls = _pf_model_and_calls()
    with torch.no_grad():
        plain = [_first(model(**c)) for c in calls]
    for plan_text in [PF_PLAN, *PF_HYBRIDS]:
        plan = xdit_fx.Plan.from_string(plan_text)
        ref = [_first(o) for o in pipefusion_reference(model, calls, PF_SEGMENTS, plan.patches)]
        stages = sorted(res[plan_text]["stage"] for res in per_rank)
        assert stages == sorted(list(range(plan.pipefusion_degree)) * (4 // plan.pipefusion_degree)), stages
        for rank, res in enumerate(per_rank):
            pf = res[plan_text]
            assert pf["warm"] == [True] + [False] * (PF_CALLS - 1)
            for t, (o, r, p) in enumerate(zip(pf["outs"], ref, plain)):
                err = (o - r).abs().max().item()
                assert err <= PF_ATOL, f"{plan_text} rank {rank} call {t}: {err:.3g} from the stale-K/V reference"
                if t:  # stale calls really used stale keys: they differ from the whole-sequence output
                    assert (o - p).abs().max().item() > 100 * PF_ATOL
            received = pf["comm"].get("pipefusion", {}).get("pipefusion_p2p", 0)
            # every stage but the first receives the crossing values of every patch (a middle stage receives
            # and sends); the first receives nothing
            assert (received > 0) == (pf["stage"] > 0), (plan_text, rank, pf["stage"], pf["comm"])
