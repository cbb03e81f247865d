"""Bad input fails clearly, on every rank, and a rank that dies does not leave the others hanging."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import xdit_fx
from xdit_fx.zoo import ScratchDiT, get
from dist_utils import spawn_gloo
from tolerances import TOLERANCES


def heads_not_divisible(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = ScratchDiT(dim=48, heads=3, depth=1).eval()  # 3 heads: Ulysses over 2 ranks cannot split them
    inputs = get("scratch_dit").inputs()
    result = {}
    with torch.no_grad():
        ref = model(**inputs)
        try:
            xdit_fx.parallelize(model, xdit_fx.Plan(ulysses_degree=2))(**inputs)
            result["ulysses_error"] = None
        except xdit_fx.UnsupportedGraph as e:
            result["ulysses_error"] = str(e)
        torch._dynamo.reset()
        out = xdit_fx.parallelize(model, xdit_fx.Plan(ring_degree=2))(**inputs)  # ring has no head constraint
        result["ring_err"] = (out - ref).abs().max().item()
    return result


def test_heads_not_divisible_names_the_site_and_proposes_degrees():
    for rank, res in enumerate(spawn_gloo(2, heads_not_divisible)):
        msg = res["ulysses_error"]
        assert msg is not None, f"rank {rank}: no error for 3 heads under ulysses=2"
        assert "3 heads" in msg and "not divisible by ulysses_degree=2" in msg
        assert "blocks.0" in msg, "the message names the attention's module path"
        assert "ring" in msg, "the message proposes moving the factor to ring_degree"
        assert res["ring_err"] <= TOLERANCES["ring"].atol


def rank1_dies(rank: int, world: int, marker_dir: str) -> None:
    """Rank 1 raises; rank 0 waits in a barrier for it. Rank 0 must be stopped (terminated by the launcher,
    or its barrier failing at once because the dead peer closed its connection), not wait for the collective
    timeout. Its error, if it gets one, is written to a file: the test reads what happened, not the clock,
    so a slow machine cannot fail it and a survivor left to time out cannot pass it."""
    if rank == 1:
        raise RuntimeError("rank 1 failed on purpose")
    try:
        dist.barrier()  # rank 0 waits for a peer that will never come
    except BaseException as e:
        with open(os.path.join(marker_dir, "rank0_error"), "w") as f:
            f.write(str(e))
        raise


def _not_a_timeout(text: str) -> bool:
    # gloo's error for a peer that never answers: "Timed out waiting ...ms for recv operation to complete"
    return "timed out" not in text.lower() and "timeout" not in text.lower()


def _check_survivor(marker_dir) -> None:
    """Rank 0 either got no error of its own (terminated) or saw the peer go away ("Connection closed by
    peer", "Connection reset by peer", ... depending on the moment), never a timeout."""
    marker = marker_dir / "rank0_error"
    if marker.exists():
        assert _not_a_timeout(marker.read_text()), marker.read_text()


def test_a_dead_rank_does_not_hang_the_others(tmp_path):
    # mp.spawn re-raises the first failure it sees: rank 1's own error, or rank 0's barrier that failed
    # because rank 1's process went away (the two race); never a timeout
    with pytest.raises(Exception) as info:
        spawn_gloo(2, rank1_dies, str(tmp_path))
    msg = str(info.value)
    assert "rank 1 failed on purpose" in msg or ("Process 0 terminated" in msg and _not_a_timeout(msg)), msg
    _check_survivor(tmp_path)


def _die_in_launcher(marker_dir: str) -> None:
    xdit_fx.init_distributed()
    rank1_dies(dist.get_rank(), dist.get_world_size(), marker_dir)


def test_launcher_stops_peers_of_a_failed_rank(tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from xdit_fx.runtime.launch import launch

    with pytest.raises(ChildFailedError) as info:
        launch(_die_in_launcher, 2, (str(tmp_path),))
    # the agent reports the first rank(s) to fail: rank 1's error, or rank 0's barrier that failed at once
    failures = {r: str(f.message) for r, f in info.value.failures.items()}
    assert "rank 1 failed on purpose" in failures.get(1, "") or (0 in failures and _not_a_timeout(failures[0])), failures
    _check_survivor(tmp_path)


def test_world_size_mismatch_is_reported_before_any_process_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(xdit_fx.PlanError, match=r"ring\(2\) \* ulysses\(2\) = 4 != world_size\(2\)"):
        xdit_fx.parallelize(torch.nn.Linear(2, 2), xdit_fx.Plan(ulysses_degree=2, ring_degree=2))
    assert not dist.is_initialized()
