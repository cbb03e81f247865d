"""Plan: validation, error messages, serialisation, and the checks `parallelize` makes before any process group."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.distributed as dist
from torch import nn

import xdit_fx
from xdit_fx import FirstBlockCache, Plan, PlanError, TeaCache
from xdit_fx.plan import AXES

DEGREE_FIELDS = ["ulysses_degree", "ring_degree", "cfg_degree", "pipefusion_degree", "dp_degree"]
#: combinations refused before any process group: (plan string, what the message says)
UNSUPPORTED = [("pipefusion=2,ulysses=2,cache=fbc:0.1", "Use cache with ulysses/ring/cfg/dp, or PipeFusion without cache"),
               ("pipefusion=2,ring=2,cache=teacache:0.2", "each stage would have to agree on which steps skip")]


# ---- construction and validation ---------------------------------------------------------------

def test_defaults():
    plan = Plan()
    assert [plan.degree(a) for a in AXES] == [1, 1, 1, 1, 1]
    assert plan.compile is False and plan.debug_dump_dir is None
    assert plan.world_size == 1 and plan.sequence_parallel_degree == 1


def test_sizes():
    plan = Plan(ulysses_degree=2, ring_degree=3)
    assert plan.world_size == 6
    assert plan.sequence_parallel_degree == 6
    assert plan.degree("ulysses") == 2 and plan.degree("ring") == 3


@pytest.mark.parametrize("field", DEGREE_FIELDS)
@pytest.mark.parametrize("value", [0, -1, True, False, "2", 2.0, None], ids=repr)
def test_bad_degree_is_rejected_naming_the_field(field, value):
    with pytest.raises(PlanError, match=rf"Plan\.{field} must be an integer >= 1, got {value!r}"):
        Plan(**{field: value})


@pytest.mark.parametrize("text, fragment", UNSUPPORTED)
def test_unsupported_combinations_are_refused(text, fragment):
    with pytest.raises(PlanError) as info:
        Plan.from_string(text)
    assert fragment in str(info.value)


def test_batch_axes():
    plan = Plan.from_string("dp=2,cfg=2,ulysses=2")
    assert plan.world_size == 8 and plan.batch_degree == 4 and plan.sequence_parallel_degree == 2
    assert Plan.from_string(plan.to_string()) == plan
    assert Plan.from_string("cfg=2,parallel_vae=0").to_string() == "cfg=2,parallel_vae=0"


def test_plan_error_is_a_value_error_and_an_xdit_fx_error():
    with pytest.raises(ValueError):
        Plan(ulysses_degree=0)
    with pytest.raises(xdit_fx.XditFxError):
        Plan(ulysses_degree=0)


def test_plan_is_frozen():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        Plan().ulysses_degree = 2  # type: ignore[misc]


def test_compile_must_be_a_bool():
    with pytest.raises(PlanError, match="compile"):
        Plan(compile="false")  # type: ignore[arg-type]


# ---- world size --------------------------------------------------------------------------------

def test_check_world_size_shows_the_arithmetic():
    plan = Plan(ulysses_degree=2, ring_degree=2)
    plan.check_world_size(4)  # fits: no error
    with pytest.raises(PlanError) as info:
        plan.check_world_size(2)
    msg = str(info.value)
    assert "dp(1) * cfg(1) * pipefusion(1) * ring(2) * ulysses(2) = 4 != world_size(2)" in msg
    assert "--nproc 4" in msg  # says how to launch


# ---- strings -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("ulysses=2,ring=2", Plan(ulysses_degree=2, ring_degree=2)),
    ("ring=2", Plan(ring_degree=2)),
    ("", Plan()),
    ("compile=1", Plan(compile=True)),
    ("compile=false", Plan()),
    ("ulysses_degree=2", Plan(ulysses_degree=2)),
    ("ring_degree=2, ulysses_degree=4", Plan(ring_degree=2, ulysses_degree=4)),
    (" ulysses = 2 , ", Plan(ulysses_degree=2)),
])
def test_from_string(text, expected):
    assert Plan.from_string(text) == expected


@pytest.mark.parametrize("plan", [
    Plan(ulysses_degree=2, ring_degree=2), Plan(ring_degree=2), Plan(ulysses_degree=4, compile=True),
    Plan(compile=True),
], ids=str)
def test_string_round_trip(plan):
    text = plan.to_string()
    assert Plan.from_string(text) == plan


def test_to_string_orders_axes_outer_to_inner():
    assert Plan(ulysses_degree=2, ring_degree=2).to_string() == "ring=2,ulysses=2"
    assert Plan(ulysses_degree=2, compile=True).to_string() == "ulysses=2,compile=1"


def test_serial_plan_string_round_trip():
    assert Plan.from_string(Plan().to_string()) == Plan()


@pytest.mark.parametrize("text, fragment", [
    ("ulysses", "is not of the form key=value"),
    ("ulysses=", "is not of the form key=value"),
    ("ulysses=x", "a degree must be an integer"),
    ("ring=1.5", "a degree must be an integer"),
    ("foo=2", "Unknown plan key 'foo'"),
    ("compile=yes", "use compile=1 or compile=0"),
    ("ulysses=0", "must be an integer >= 1"),
    ("pipefusion=2,patches=x", "must be an integer"),
    ("cfg=3", "cfg_degree is 1 or 2"),
    ("parallel_vae=maybe", "use parallel_vae=1 or parallel_vae=0"),
])
def test_bad_strings(text, fragment):
    with pytest.raises(PlanError, match=fragment) as info:
        Plan.from_string(text)
    if "Unknown" in fragment:  # lists what is accepted
        assert "ulysses" in str(info.value) and "ring" in str(info.value)
    if "key=value" in fragment:
        assert "e.g. 'ulysses=2'" in str(info.value)


# ---- dicts and JSON ----------------------------------------------------------------------------

@pytest.mark.parametrize("plan", [Plan(), Plan(ulysses_degree=2, ring_degree=2, compile=True, debug_dump_dir="/tmp/d"),
                                  Plan(ulysses_degree=2, cache=FirstBlockCache(threshold=0.1)),
                                  Plan(cfg_degree=2, cache=TeaCache(threshold=0.3, coefficients=[2.0, -1.0, 0.5]))])
def test_dict_and_json_round_trip(plan):
    d = plan.to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(Plan)}  # every field, nothing else
    assert Plan.from_dict(d) == plan
    assert Plan.from_dict(json.loads(plan.to_json())) == plan


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(PlanError, match=r"Unknown Plan field\(s\) \['bogus', 'ulysses'\]") as info:
        Plan.from_dict({"ulysses": 2, "bogus": 1})
    assert "ulysses_degree" in str(info.value)  # lists the known fields


def test_from_dict_validates_values():
    with pytest.raises(PlanError, match="ring_degree"):
        Plan.from_dict({"ring_degree": 0})


# ---- parallelize() checks before any process group --------------------------------------------

class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)


@pytest.fixture
def single_process(monkeypatch):
    """No torch.distributed, no launcher environment, and fail loudly if a process group is created."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert not dist.is_initialized()

    def forbidden(*args, **kwargs):
        raise AssertionError("a process group was requested before the plan was checked")

    monkeypatch.setattr(xdit_fx.api, "init_distributed", forbidden)
    monkeypatch.setattr(xdit_fx.api, "build_groups", forbidden)
    monkeypatch.setattr(dist, "init_process_group", forbidden)
    yield monkeypatch


@pytest.mark.parametrize("plan", [Plan(ulysses_degree=2), "ulysses=2"], ids=["Plan", "str"])
def test_parallelize_without_launcher_raises_plan_error(single_process, plan):
    with pytest.raises(PlanError) as info:
        xdit_fx.parallelize(_Tiny(), plan)
    msg = str(info.value)
    assert "= 2 != world_size(1)" in msg
    assert not dist.is_initialized()


def test_parallelize_with_wrong_world_size(single_process):
    single_process.setenv("WORLD_SIZE", "2")
    with pytest.raises(PlanError, match=r"ring\(2\) \* ulysses\(2\) = 4 != world_size\(2\)"):
        xdit_fx.parallelize(_Tiny(), Plan(ulysses_degree=2, ring_degree=2))


def test_parallelize_serial_plan_needs_no_process_group(single_process):
    pm = xdit_fx.parallelize(_Tiny())
    assert pm.plan == Plan()
    assert isinstance(pm.lin, nn.Linear)  # attributes fall through to the wrapped model


def test_parallelize_twice_is_refused(single_process):
    pm = xdit_fx.parallelize(_Tiny(), Plan())
    with pytest.raises(PlanError, match="already been parallelized"):
        xdit_fx.parallelize(pm, Plan())


def test_parallelize_after_torch_compile_is_refused(single_process):
    compiled = torch.compile(_Tiny())
    with pytest.raises(PlanError, match="before torch.compile") as info:
        xdit_fx.parallelize(compiled, Plan())
    assert "Plan(compile=True)" in str(info.value)


def test_parallelize_takes_a_module(single_process):
    with pytest.raises(TypeError, match="nn.Module"):
        xdit_fx.parallelize(lambda x: x, Plan())  # type: ignore[arg-type]
