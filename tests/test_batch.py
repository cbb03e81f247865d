"""Unit tests of the cfg/dp batch machinery (runtime/batch.py) that need no process group."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from xdit_fx import XditFxError
from xdit_fx.runtime.batch import PairState, batch_size, chunk_sizes, map_tensors, take_chunk


@pytest.mark.parametrize("total, k", [(4, 2), (5, 2), (3, 4), (7, 3)])
def test_chunk_sizes_match_tensor_split(total, k):
    assert chunk_sizes(total, k) == [len(c) for c in torch.tensor_split(torch.arange(total), k)]


def test_batch_size_from_hidden_states_or_first_tensor():
    x = torch.zeros(3, 5)
    assert batch_size((), {"hidden_states": x, "timestep": torch.zeros(1)}) == 3
    assert batch_size((x,), {"encoder_hidden_states": torch.zeros(7, 2)}) == 3
    assert batch_size((), {"scale": 1.0}) is None


def test_take_chunk_splits_batched_tensors_only():
    b = 4
    kwargs = {"hidden_states": torch.arange(b * 2).reshape(b, 2), "timestep": torch.tensor([5.0]),
              "ids": torch.zeros(6, 3), "extra": [torch.arange(b)], "flag": True}
    part = take_chunk(kwargs, b, 2, 1)
    assert part["hidden_states"].tolist() == [[4, 5], [6, 7]]
    assert part["timestep"] is kwargs["timestep"] and part["ids"] is kwargs["ids"] and part["flag"] is True
    assert part["extra"][0].tolist() == [2, 3]


def test_map_tensors_keeps_output_classes():
    out = Transformer2DModelOutput(sample=torch.ones(2))
    mapped = map_tensors(out, lambda t: t * 3)
    assert type(mapped) is Transformer2DModelOutput and mapped.sample.tolist() == [3.0, 3.0]
    assert map_tensors((torch.ones(1), None), lambda t: t + 1)[0].item() == 2.0


def _first_step(state: PairState, calls: list[tuple[int, torch.Tensor]]) -> None:
    state.first_step_calls = list(calls)
    state.end_step(torch.zeros(1), cfg_degree=2, batch_degree=2)


def test_two_equal_calls_in_the_first_step_are_paired():
    state = PairState()
    _first_step(state, [(1, torch.zeros(1, 4)), (1, torch.zeros(1, 4))])
    assert state.paired and state.step == 1 and len(state.templates) == 2


@pytest.mark.parametrize("calls", [
    [(1, torch.zeros(1, 4))],                           # one call per step: no guidance
    [(1, torch.zeros(1, 4)), (1, torch.zeros(1, 5))],   # two calls of different shapes
    [(2, torch.zeros(2, 4)), (2, torch.zeros(2, 4))],   # batch already splits over the batch ranks
    [(1, torch.zeros(1, 4))] * 3,                       # three calls per step
])
def test_other_call_patterns_are_not_paired(calls):
    state = PairState()
    _first_step(state, calls)
    assert not state.paired


def test_nan_reaching_the_scheduler_in_paired_mode_is_an_error():
    state = PairState()
    _first_step(state, [(1, torch.zeros(1, 4)), (1, torch.zeros(1, 4))])
    with pytest.raises(XditFxError, match="used the first transformer output of a step before"):
        state.end_step(torch.full((1, 4), math.nan), cfg_degree=2, batch_degree=2)


@pytest.mark.parametrize("batch, dp_rank, rows, sizes, index", [(3, 1, [2], [2, 1], 1), (3, 0, [0, 1], [2, 1], 0),
                                                                (1, 1, [0], [1], 0)])
def test_a_batch_rank_runs_only_its_chunk(monkeypatch, batch, dp_rank, rows, sizes, index):
    """Each batch rank runs the model on its chunk alone (the rows of tensor_split), then the chunks are
    gathered; a batch smaller than the ranks leaves a rank duplicating chunk 0 (rank % k)."""
    from xdit_fx import Plan
    from xdit_fx.runtime import batch as batch_mod
    from xdit_fx.runtime.groups import ProcessGroups

    plan = Plan(dp_degree=2)
    groups = ProcessGroups(plan=plan, rank=dp_rank, coords={"dp": dp_rank, "cfg": 0}, names={"batch": "pg-batch"})
    splitter = batch_mod.BatchSplitter(plan, groups)
    gathered, ran = [], []
    monkeypatch.setattr(batch_mod, "gather_chunks",
                        lambda out, group, sizes, index: gathered.append((group, sizes, index)) or out)
    x = torch.arange(batch * 2, dtype=torch.float32).reshape(batch, 2)
    t = torch.tensor([7.0, 8.0])  # not batched (its first dimension is not the batch): passed whole

    def model(hidden_states, timestep):
        ran.append((hidden_states.clone(), timestep))
        return hidden_states * 2

    out = splitter(model, (), {"hidden_states": x, "timestep": t})
    assert len(ran) == 1 and torch.equal(ran[0][0], x[rows]) and ran[0][1] is t
    assert torch.equal(out, x[rows] * 2)
    assert gathered == [("pg-batch", sizes, index)]
