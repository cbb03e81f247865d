"""The embedded digits model end to end under cfg=2 (batched and two-call CFG), ulysses=2 and ring=2; and
dp=2,ulysses=2 on 4 processes (XDIT_FX_SLOW_TESTS=1).

The parallel images must equal the serial ones (tolerances below) and keep the shipped digit accuracy.
"""

from __future__ import annotations

import os

import pytest
import torch

from dist_utils import spawn_gloo
import parallel_checks

#: batch split / pairing: the same arithmetic on smaller batches (CPU kernels may block differently); measured 0
#: here, and 3e-7 between a batched and a two-call generation of this model (tests/test_digits.py)
CFG_ATOL = 3e-6
#: ulysses: summation order inside attention changes, carried through 20 sampler steps; measured 0 (2026-12-06),
#: the ring bound below for the same model
ULYSSES_ATOL = 3e-6
#: ring: the log-sum-exp merge of key chunks rounds differently from one softmax, carried through 20 steps;
#: measured 3.3e-7 (2026-12-06)
RING_ATOL = 3e-6
LABELS = list(range(10)) * 2


CASES_2 = [("cfg=2", "batched"), ("cfg=2", "two_call"), ("ulysses=2", "batched"), ("ring=2", "batched")]


def _worker(rank: int, world: int, cases=tuple(CASES_2)) -> dict:
    import xdit_fx
    from xdit_fx.digits import digit_accuracy, load_pipeline

    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    results = {}
    with torch.no_grad():
        def generate(p, mode, labels=LABELS):
            return p(labels, generator=torch.Generator().manual_seed(0), cfg_mode=mode)
        ref = generate(pipe, "batched").images
        ref_one = generate(pipe, "two_call", [7]).images
        results["serial_accuracy"] = digit_accuracy(ref, LABELS)
        for plan, mode in cases:
            torch._dynamo.reset()
            ppipe = xdit_fx.parallelize(pipe, plan)
            work = parallel_checks.instrument(ppipe.denoisers["transformer"])
            out = generate(ppipe, mode)
            results[f"{plan}/{mode}/work"] = parallel_checks.finish(work)
            paired = ppipe.pair_state.paired
            one = generate(ppipe, "two_call", [7]) if mode == "two_call" else None  # batch 1: calls are paired
            results[f"{plan}/{mode}/images"] = out.images  # every rank returns the images
            if rank == 0:
                results[f"{plan}/{mode}"] = {"err": (out.images - ref).abs().max().item(),
                                             "accuracy": digit_accuracy(out.images, LABELS), "paired": paired}
                if one is not None:
                    results["cfg=2/two_call/one"] = {"err": (one.images - ref_one).abs().max().item(),
                                                     "paired": ppipe.pair_state.paired}
            ppipe.unwrap()
    return results


def test_digits_model_in_parallel_matches_serial_and_keeps_accuracy():
    per_rank = spawn_gloo(2, _worker)
    results = per_rank[0]
    for rank in per_rank:  # each rank ran its share (cfg: half the rows; ulysses/ring: sharded attention)
        for plan, mode in CASES_2:
            parallel_checks.check(rank[f"{plan}/{mode}/work"], plan)
    for key in [k for k in results if k.endswith("/images")]:
        assert torch.equal(per_rank[1][key], results[key]), f"{key}: rank 1's images differ from rank 0's"
    assert results["serial_accuracy"] >= 0.9
    for key, tol in [("cfg=2/batched", CFG_ATOL), ("cfg=2/two_call", CFG_ATOL), ("ulysses=2/batched", ULYSSES_ATOL),
                     ("ring=2/batched", RING_ATOL)]:
        r = results[key]
        assert r["err"] <= tol, (key, r)
        assert r["accuracy"] >= 0.9, (key, r)
    # 20 images per call split over the cfg ranks; a single image's two calls per step are paired instead
    assert not results["cfg=2/two_call"]["paired"] and not results["cfg=2/batched"]["paired"]
    one = results["cfg=2/two_call/one"]
    assert one["paired"] and one["err"] <= CFG_ATOL, one


#: dp=2,ulysses=2: the batch split (no arithmetic change) and Ulysses' exact all-to-alls; measured 0.0
#: (2026-12-06, 4 processes); the bound is the ulysses=2 one
DP_ULYSSES_ATOL = ULYSSES_ATOL


@pytest.mark.skipif(os.environ.get("XDIT_FX_SLOW_TESTS") != "1", reason="4 processes: XDIT_FX_SLOW_TESTS=1")
def test_digits_model_under_dp_and_ulysses_on_4_processes():
    """dp=2,ulysses=2: each dp replica takes half the images, each pair of ulysses ranks shards their tokens.
    Last run by hand: 2026-12-06, passed in 86 s on a loaded 2-core machine (max abs err 0.0, accuracy 100%)."""
    per_rank = spawn_gloo(4, _worker, (("dp=2,ulysses=2", "batched"),))
    r = per_rank[0]["dp=2,ulysses=2/batched"]
    print(r)
    assert r["err"] <= DP_ULYSSES_ATOL and r["accuracy"] >= 0.9, r
    for rank in per_rank:
        parallel_checks.check(rank["dp=2,ulysses=2/batched/work"], "dp=2,ulysses=2")
