"""The plan cost model and search (xdit_fx/compiler/plan_cost.py, plan_search.py), `auto_plan`, `xdit-fx plan`.

The search must honour every constraint, return the trivial plan on one rank, shard the weights (PipeFusion)
when they do not fit one device or say clearly that nothing fits; the bytes the cost model charges must equal
the analytic counts `tests/test_comm.py` checks against the collectives' counters.
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch

import xdit_fx
from xdit_fx.compiler.hardware import PROFILES, HardwareProfile, Link, load_profile
from xdit_fx.compiler.plan_cost import Workload, axis_links, predict
from xdit_fx.compiler.plan_facts import ATTN, GEMM, MEM, ModelFacts, NodeWork, model_facts
from xdit_fx.compiler.plan_search import candidate_plans, choose_plan, explain, factorizations, rank_plans
from xdit_fx.errors import PlanError
from xdit_fx.plan import Plan

F32 = 4


def toy_facts(heads: int = 6, blocks: int = 4, segments=(64, 1024), batch: int = 1, block_param_bytes: int = 10**6,
              width: int = 384) -> ModelFacts:
    """A synthetic DiT: per block a qkv linear, joint attention over all segments, an MLP; a head outside."""
    tokens = sum(segments)
    d = width // heads
    site = (batch, heads, heads, tokens, tokens, d, "joint")
    act = batch * tokens * width * F32
    nodes = [NodeWork(GEMM, 2.0 * batch * tokens * 64 * width, act, "pre", None, True, True)]
    for b in range(blocks):
        nodes += [NodeWork(GEMM, 6.0 * batch * tokens * width * width, 4 * act, "stack", b, True, True),
                  NodeWork(ATTN, 4.0 * batch * heads * tokens * tokens * d, 4 * act, "stack", b, True, True, site),
                  NodeWork(MEM, 0.0, 2 * act, "stack", b, True, True),
                  NodeWork(GEMM, 16.0 * batch * tokens * width * width, 5 * act, "stack", b, True, True)]
    nodes.append(NodeWork(GEMM, 2.0 * batch * tokens * width * 64, act, "post", None, True, True))
    return ModelFacts(nodes, blocks, [block_param_bytes] * blocks, 10**5, [site] * blocks, tuple(segments), batch,
                      batch * tokens * 64 * F32, [act] * (blocks - 1), F32, "toy")


def _allowed(plan: Plan, facts: ModelFacts, work: Workload) -> list[str]:
    """Every constraint of the search, checked independently of its code; returns the broken ones."""
    broken = []
    if plan.cfg_degree > 1 and work.guidance == "none":
        broken.append("cfg without guidance")
    images = facts.batch // (2 if work.guidance == "batched" else 1)
    if images % plan.dp_degree:
        broken.append("dp does not divide the images")
    if any(h % plan.ulysses_degree for h in facts.sp_heads()):
        broken.append("heads not divisible by ulysses")
    if plan.pipefusion_degree > facts.blocks:
        broken.append("more stages than blocks")
    if plan.pipefusion_degree > 1 and max(facts.segments) % (plan.patches * plan.sequence_parallel_degree):
        broken.append("segment not divisible by patches x sp")
    return broken


def test_factorizations_are_every_product_of_the_world_size():
    for world in (1, 2, 3, 4, 6, 8, 12, 16):
        expected = {t for t in itertools.product(range(1, world + 1), (1, 2), *[range(1, world + 1)] * 3)
                    if t[0] * t[1] * t[2] * t[3] * t[4] == world}
        assert set(factorizations(world)) == expected


@pytest.mark.parametrize("world", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("guidance,batch", [("none", 1), ("batched", 4), ("two-call", 2)])
def test_search_honours_every_constraint(world, guidance, batch):
    facts = toy_facts(heads=6, batch=batch)
    work = Workload(guidance=guidance)
    plans, rejected = candidate_plans(facts, world, work)
    for p in plans:
        assert p.world_size == world
        assert not _allowed(p, facts, work), (p.to_string(), _allowed(p, facts, work))
    # nothing allowed is left out: every allowed factorization (with some patch count) is a candidate
    listed = {(p.dp_degree, p.cfg_degree, p.pipefusion_degree, p.ring_degree, p.ulysses_degree) for p in plans}
    for dp, cfg, pf, ring, uly in factorizations(world):
        base = Plan(dp_degree=dp, cfg_degree=cfg, pipefusion_degree=pf, ring_degree=ring, ulysses_degree=uly,
                    pipefusion_patches=pf)
        if not _allowed(base, facts, work):
            assert (dp, cfg, pf, ring, uly) in listed, base.to_string()
    assert all(r.reason for r in rejected)


def test_search_refuses_by_name():
    facts = toy_facts(heads=6, segments=(64, 1000))
    plans, rejected = candidate_plans(facts, 4, Workload())
    reasons = {r.plan: r.reason for r in rejected}
    assert "heads [6] not divisible by ulysses=4" in reasons["ulysses=4"]
    assert "needs classifier-free guidance" in reasons["cfg=2,ulysses=2"]
    assert "does not divide" in reasons["dp=2,ulysses=2"]
    assert "not divisible by patches" in reasons["pipefusion=4,patches=16"]  # 1000 % 16
    assert "pipefusion=4,patches=4" in {p.to_string() for p in plans}


def test_one_rank_is_the_trivial_plan():
    facts = toy_facts()
    assert choose_plan(facts, 1, load_profile("h100-nvlink")).plan == Plan()
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    pred = xdit_fx.auto_plan(model, 1, "h100-nvlink", inputs={"input": torch.zeros(2, 8)})
    assert pred.plan == Plan() and pred.step_s > 0
    pm = xdit_fx.parallelize(model, "auto")  # WORLD_SIZE unset: one rank
    assert pm.plan == Plan()


def test_weights_that_do_not_fit_one_device_get_pipefusion_or_a_clear_error():
    gib = 2 ** 30
    facts = toy_facts(blocks=8, block_param_bytes=2 * gib)  # 16 GiB of blocks
    small = dataclasses.replace(PROFILES["h100-nvlink"], memory=10 * gib)
    best = choose_plan(facts, 2, small)
    assert best.plan.pipefusion_degree == 2 and best.fits
    assert best.memory["weights"] <= 10 * gib < facts.param_bytes
    preds, _ = rank_plans(facts, 2, small)
    assert {p.plan.to_string() for p in preds if not p.fits} >= {"ulysses=2", "ring=2"}
    tiny = dataclasses.replace(small, memory=4 * gib)
    with pytest.raises(PlanError, match=r"no plan of 2 ranks fits in 4\.0 GiB .*PipeFusion shards"):
        choose_plan(facts, 2, tiny)
    # with 4 ranks, 4 stages of 4 GiB of blocks each fit
    assert choose_plan(facts, 4, dataclasses.replace(small, memory=6 * gib)).plan.pipefusion_degree == 4


def _flux_analytic(plan: Plan, model, inputs) -> dict[str, int]:
    """Bytes per rank per call as tests/test_comm.py's `analytic` counts them."""
    c = model.config
    length = inputs["hidden_states"].shape[1] + inputs["encoder_hidden_states"].shape[1]
    n, u, r = plan.sequence_parallel_degree, plan.ulysses_degree, plan.ring_degree
    out_bytes = inputs["hidden_states"].numel() * F32
    expected = {"sp": (n - 1) * out_bytes // n}
    for _ in range(c.num_layers + c.num_single_layers):
        local = c.num_attention_heads * (length // n) * c.attention_head_dim * F32
        if u > 1:
            expected["ulysses"] = expected.get("ulysses", 0) + (u - 1) * 4 * local // u
        if r > 1:
            expected["ring"] = expected.get("ring", 0) + (r - 1) * 2 * local
    return expected


@pytest.fixture(scope="module")
def flux_meta():
    """A tiny Flux on the meta device, its inputs and its ModelFacts (one capture for the tests below)."""
    from xdit_fx.zoo import build_flux, flux_inputs

    with torch.device("meta"):
        model = build_flux(num_layers=1, num_single_layers=2, heads=4, head_dim=16)
    inputs = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in flux_inputs(4, 8, 8).items()}
    return model, inputs, model_facts(model, inputs)


@pytest.mark.parametrize("plan_text", ["ulysses=2", "ring=2", "ulysses=2,ring=2", "ulysses=4"])
def test_cost_model_bytes_equal_the_analytic_count(plan_text, flux_meta):
    model, inputs, facts = flux_meta
    plan = Plan.from_string(plan_text)
    pred = predict(facts, plan, load_profile("h100-nvlink"))
    got = {k: round(v) for k, v in pred.bytes.items()}
    assert got == _flux_analytic(plan, model, inputs)


def test_pipefusion_bytes_and_memory_follow_the_stage_cut():
    facts = toy_facts(blocks=4, block_param_bytes=1000)
    pred = predict(facts, Plan(pipefusion_degree=2, pipefusion_patches=4), load_profile("h100-nvlink"))
    # stage 1 receives the one crossing stream once per call (4 patches x 1/4), then the output broadcast
    assert pred.bytes["pipefusion"] == pytest.approx(facts.cut_bytes[1] + facts.out_bytes)
    assert pred.memory["weights"] == facts.other_params + 2 * 1000
    assert pred.parts["pipeline"] > 0  # the bubble


def test_axes_crossing_nodes_use_the_inter_node_link():
    hw = load_profile("h100-nvlink").with_nodes(2, 16)
    assert hw.gpus_per_node == 8
    plan = Plan(pipefusion_degree=2, ulysses_degree=8)
    assert axis_links(plan, hw) == {"ulysses": "intra", "pipefusion": "inter"}
    assert axis_links(Plan(ulysses_degree=16), hw) == {"ulysses": "inter"}
    # the same plan is slower when its Ulysses group spans the slow link
    facts = toy_facts(heads=16, segments=(256, 4096), width=2048)
    fast = predict(facts, Plan(ulysses_degree=16), load_profile("h100-nvlink").with_nodes(1, 16))
    slow = predict(facts, Plan(ulysses_degree=16), hw)
    intra, inter = hw.intra, hw.inter
    extra = slow.bytes["ulysses"] * (1 / inter.bandwidth - 1 / intra.bandwidth) + 4 * facts.blocks * (
        inter.latency - intra.latency)  # 4 all-to-alls per site, one site per block
    assert slow.parts["ulysses"] - fast.parts["ulysses"] == pytest.approx(extra, rel=1e-9)
    assert slow.bytes == fast.bytes


def test_ranking_follows_the_link():
    """Fast links favour splitting the sequence; a slow link with a high latency favours CFG parallel, which
    moves only the output."""
    facts = toy_facts(heads=8, batch=2, segments=(64, 1024))
    work = Workload(guidance="batched")
    nvlink = choose_plan(facts, 2, load_profile("h100-nvlink"), work)
    slow = HardwareProfile("slow", 1e14, 1e14, 1e12, 5e-6, 1e-6, 1e11, Link(1e8, 1e-3), Link(1e8, 1e-3), 8, 0.0)
    assert choose_plan(facts, 2, slow, work).plan == Plan(cfg_degree=2)
    assert nvlink.per_step_s > 0
    assert "wins" in explain(rank_plans(facts, 2, slow, work)[0])


def test_profiles_load_and_carry_sources(tmp_path):
    for name in ("cpu-gloo", "h100-nvlink", "h100-pcie", "h200", "l40", "b200"):
        hw = load_profile(name)
        assert hw.gemm_rate > 0 and hw.intra.time(1e6) > 0
        assert {"gemm_rate", "attn_rate", "intra", "inter", "memory"} <= set(hw.sources)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(load_profile("h200").to_dict()))
    assert load_profile(str(path)) == load_profile("h200")
    with pytest.raises(xdit_fx.XditFxError, match="not a profile name"):
        load_profile("no-such-gpu")


def test_plan_command_on_a_folder_without_weights(tmp_path, capsys):
    from xdit_fx.cli import main

    cfg = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 16, "num_layers": 1,
           "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 6, "joint_attention_dim": 32,
           "pooled_projection_dim": 16, "guidance_embeds": False, "axes_dims_rope": [4, 6, 6]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out_json = tmp_path / "preds.json"
    code = main(["plan", str(tmp_path), "--world-size", "4", "--hardware", "h100-nvlink", "--height", "256",
                 "--width", "256", "--text-len", "16", "--json", str(out_json)])
    text = capsys.readouterr().out
    assert code == 0
    assert "| 1 |" in text and " wins (" in text
    assert "refused ulysses=4: heads [6] not divisible by ulysses=4" in text
    preds = json.loads(out_json.read_text())
    assert [p["per_step_s"] for p in preds] == sorted(p["per_step_s"] for p in preds)
    assert all(p["plan"] != "ulysses=4" for p in preds)


def test_generate_plan_auto_sets_the_degrees_before_launch(capsys):
    """`xdit-fx generate --plan auto --nproc 2` on the digits model (batched CFG): the flags the workers
    rebuild the plan from are set to the cost model's choice, and the reason is printed."""
    import argparse

    from xdit_fx.cli.generate import add_arguments, plan_from_args, preflight

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--plan", "auto", "--nproc", "2", "--prompt", "0", "1"])
    plan, nproc, _ = preflight(args)
    out = capsys.readouterr().out
    assert nproc == 2 and plan.world_size == 2
    assert f"--plan auto: {plan.to_string()} on 2 ranks" in out and " wins (" in out
    assert plan_from_args(args) == plan  # what each worker rebuilds


def test_dump_plan_auto_writes_the_choice(tmp_path, capsys):
    from xdit_fx.cli import main

    out = tmp_path / "d"
    assert main(["dump", "scratch_dit", "--plan", "auto", "--world-size", "2", "--hardware", "h100-nvlink",
                 "--out", str(out)]) == 0
    text = (out / "plan_choice.md").read_text()
    chosen = text.splitlines()[0].removeprefix("# Plan choice: ")
    assert " wins (" in text and "| 1 | " + chosen + " |" in text
    assert json.loads((out / "plan.json").read_text())  # the dump itself is of the chosen plan
    assert f"chose {chosen}" in capsys.readouterr().out


def test_serve_plan_auto_resolves_before_launch(capsys):
    import argparse

    pytest.importorskip("fastapi")
    from xdit_fx.serve.cli import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    config = config_from_args(p.parse_args(["--plan", "auto", "--nproc", "2", "--port", "0"]))
    assert Plan.from_string(config["plan"]).world_size == 2 and config["nproc"] == 2
    assert f"--plan auto: {config['plan']} on 2 ranks" in capsys.readouterr().out
    with pytest.raises(PlanError, match="--plan auto needs --nproc"):
        config_from_args(p.parse_args(["--plan", "auto"]))


# ---- host time: per executed node, per runtime op, per patch ------------------------------------------------

def _cpu_like(node_s: float = 5e-6, runtime_s: float = 20e-6, **kw) -> HardwareProfile:
    """A serial (CPU-like) profile without curves: host time adds to compute."""
    return HardwareProfile("cpu-like", 1e11, 1e11, 1e10, 1e-6, 1e-6, 1e11, Link(1e9, 5e-5), Link(1e9, 5e-5), 2,
                           0.3, node_overhead=node_s, runtime_op_overhead=runtime_s, **kw)


@pytest.mark.parametrize("patches", [2, 4, 8])
def test_every_patch_runs_its_stage_nodes_and_runtime_ops_on_the_host(patches):
    facts = toy_facts(blocks=4, segments=(64, 1024))
    hw = _cpu_like()
    pred = predict(facts, Plan(pipefusion_degree=2, pipefusion_patches=patches), hw)
    # per stage: 2 blocks x 4 nodes, 2 pf_attention sites and the patch loop, once per patch; the head and
    # the tail (2 nodes) once per call
    per_patch = 8 * hw.node_overhead + 3 * hw.runtime_op_overhead
    assert pred.parts["host"] == pytest.approx(2 * hw.node_overhead + patches * per_patch)


def test_more_patches_cost_more_host_time_and_can_lose():
    facts = toy_facts(blocks=4, segments=(16, 64), width=64, heads=4)
    hw = _cpu_like(node_s=50e-6, runtime_s=100e-6)
    preds = {m: predict(facts, Plan(pipefusion_degree=2, pipefusion_patches=m), hw) for m in (2, 4, 8, 16)}
    hosts = [preds[m].parts["host"] for m in (2, 4, 8, 16)]
    assert hosts == sorted(hosts) and hosts[0] < hosts[-1]
    # where the host dominates, the smaller patches' shorter bubble does not pay for their host time
    assert preds[16].step_s > preds[2].step_s
    free = dataclasses.replace(hw, node_overhead=0.0, runtime_op_overhead=0.0)
    assert predict(facts, Plan(pipefusion_degree=2, pipefusion_patches=16), free).parts.get("host", 0.0) == 0.0


def test_a_tiny_model_is_dominated_by_host_time_a_large_one_by_compute():
    hw = _cpu_like(node_s=20e-6)
    tiny = predict(toy_facts(segments=(8, 56), width=32, heads=4), Plan(), hw)
    assert tiny.bottleneck == "host" and tiny.parts["host"] > 0.5 * tiny.step_s
    large = predict(toy_facts(segments=(256, 4096), width=1024, heads=8), Plan(), hw)
    assert large.bottleneck == "compute" and large.parts["host"] < 0.05 * large.step_s


def test_runtime_ops_of_sequence_parallelism_are_charged():
    facts = toy_facts(blocks=4)
    hw = _cpu_like(node_s=0.0)
    # Ulysses: 4 all-to-alls per site, plus the exit gather; ring: one ring attention op per site
    uly = predict(facts, Plan(ulysses_degree=2), hw)
    ring = predict(facts, Plan(ring_degree=2), hw)
    free = dataclasses.replace(hw, runtime_op_overhead=0.0)
    assert uly.step_s - predict(facts, Plan(ulysses_degree=2), free).step_s == pytest.approx(
        (4 * 4 + 1) * hw.runtime_op_overhead)
    assert ring.step_s - predict(facts, Plan(ring_degree=2), free).step_s == pytest.approx(
        (4 + 1) * hw.runtime_op_overhead)


def test_host_time_hides_behind_the_device_where_the_host_runs_ahead():
    gpu = load_profile("h100-nvlink")
    assert gpu.host_async and gpu.node_overhead > 0 and "node_overhead" in gpu.sources
    large = predict(toy_facts(segments=(512, 8192), width=3072, heads=24), Plan(ulysses_degree=2), gpu)
    assert large.parts.get("host", 0.0) == 0.0
    tiny = predict(toy_facts(segments=(8, 56), width=32, heads=4), Plan(), gpu)
    assert tiny.parts["host"] > 0
    serial = predict(toy_facts(segments=(8, 56), width=32, heads=4), Plan(),
                     dataclasses.replace(gpu, host_async=False))
    assert serial.step_s > tiny.step_s  # hidden in part behind the device: never more than serial


def test_activation_ops_use_their_own_curve_where_measured():
    from xdit_fx.compiler.plan_cost import node_time
    from xdit_fx.compiler.plan_facts import ACT

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 16)

        def forward(self, x):
            return torch.nn.functional.layer_norm(torch.nn.functional.gelu(self.lin(x)) + x, (16,))

    facts = model_facts(Block(), {"x": torch.randn(2, 8, 16)})
    kinds = [n.kind for n in facts.nodes]
    assert kinds.count(ACT) == 2 and kinds.count(MEM) == 1  # gelu, layer_norm; the add
    act = next(n for n in facts.nodes if n.kind == ACT)
    mem = {"mem": [[1.0, 1e-6], [1e9, 1e-1]]}
    hw = dataclasses.replace(_cpu_like(), curves=mem)
    assert node_time(act, hw, 1.0, 1.0) == pytest.approx(hw.op_time("mem", act.bytes, hw.mem_bw, 0.0))
    slow = dataclasses.replace(hw, curves={**mem, "act": [[1.0, 1e-5], [1e9, 1.0]]})
    assert node_time(act, slow, 1.0, 1.0) > 5 * node_time(act, hw, 1.0, 1.0)


def test_calibration_graph_and_loop_run_the_same_ops():
    from xdit_fx.cli.calibrate_hardware import _tiny_graph

    gm, ops = _tiny_graph(24)
    x, w = torch.randn(4, 4), torch.randn(4, 4)
    y = x
    for f in ops:
        y = f(y, w)
    torch.testing.assert_close(gm(x, w), y)
    assert sum(n.op in ("call_function", "call_method") for n in gm.graph.nodes) == len(ops) == 24
