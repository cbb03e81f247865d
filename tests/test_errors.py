"""Bad input fails clearly, on every rank, and a rank that dies does not leave the others hanging."""

from __future__ import annotations

import time

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


def rank1_dies(rank: int, world: int) -> None:
    if rank == 1:
        raise RuntimeError("rank 1 failed on purpose")
    dist.barrier()  # rank 0 waits for a peer that will never come


def test_a_dead_rank_does_not_hang_the_others():
    t0 = time.monotonic()
    with pytest.raises(Exception, match="rank 1 failed on purpose|terminated"):
        spawn_gloo(2, rank1_dies)
    assert time.monotonic() - t0 < 60, "the surviving rank should be stopped, not wait for the timeout"


def _die_in_launcher() -> None:
    xdit_fx.init_distributed()
    rank1_dies(dist.get_rank(), dist.get_world_size())


def test_launcher_stops_peers_of_a_failed_rank():
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from xdit_fx.runtime.launch import launch

    t0 = time.monotonic()
    with pytest.raises(ChildFailedError):
        launch(_die_in_launcher, 2)
    assert time.monotonic() - t0 < 60


def test_world_size_mismatch_is_reported_before_any_process_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(xdit_fx.PlanError, match=r"ring\(2\) \* ulysses\(2\) = 4 != world_size\(2\)"):
        xdit_fx.parallelize(torch.nn.Linear(2, 2), xdit_fx.Plan(ulysses_degree=2, ring_degree=2))
    assert not dist.is_initialized()
