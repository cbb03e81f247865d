"""First-Block-Cache and TeaCache: the plan, the insert_cache pass, the runtime decisions, and parallel runs.

The quality/speed curve is measured by benchmarks/cache_quality.py; here: exactness at threshold 0, the
skip pattern at the extremes, reset between generations, residual reuse on models of different shapes, the
errors, and that every rank takes the single process's decisions under ulysses=2 and cfg=2.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import xdit_fx
from xdit_fx import Plan, PlanError, UnsupportedGraph
from xdit_fx.cache_config import FirstBlockCache, TeaCache, cache_from_string
from xdit_fx.ops.regions import CachedRegion
from xdit_fx.cli.coverage import _compare, _flat

from dist_utils import spawn_gloo
import parallel_checks

#: a skipped call returns live_in + (out - live_in) of the cached call: one rounding of an add and a subtract
REUSE_ATOL = 1e-6
#: ulysses / batch split change summation orders; decisions must still be the serial ones
PARALLEL_ATOL = 5e-6  # measured on the digits CASES: 0 under ulysses/cfg/dp, 6e-7 under ring=2
STEPS = 8


def _digits():
    from xdit_fx.digits import load_pipeline
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, labels=(0, 1, 2, 3), mode="batched"):
    with torch.no_grad():
        out = pipe(list(labels), num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                   cfg_mode=mode)
    return out.images


# ---- plan ------------------------------------------------------------------------------------------------

def test_plan_cache_round_trips_and_rejects_bad_settings():
    plan = Plan.from_string("cfg=2,cache=teacache:0.3")
    assert plan.cache == TeaCache(threshold=0.3) and plan.to_string() == "cfg=2,cache=teacache:0.3"
    calibrated = Plan(cache=TeaCache(0.2, coefficients=(2.0, -0.1, 0.01)))
    assert Plan.from_dict(json.loads(calibrated.to_json())) == calibrated
    assert cache_from_string("fbc") == FirstBlockCache()
    with pytest.raises(PlanError, match="threshold must be a finite number"):
        FirstBlockCache(threshold=-1)
    with pytest.raises(PlanError, match="warmup_steps"):
        TeaCache(warmup_steps=0)
    with pytest.raises(PlanError, match="cache=fbc:THRESHOLD"):
        Plan.from_string("cache=deepcache:0.1")
    with pytest.raises(PlanError, match="pipefusion"):
        Plan(pipefusion_degree=2, cache=FirstBlockCache())


def test_teacache_rescale_is_the_polynomial_clamped_at_zero():
    tc = TeaCache(coefficients=(2.0, -1.0, 0.5))  # 2x^2 - x + 0.5
    assert tc.rescale(1.0) == pytest.approx(1.5)
    assert TeaCache(coefficients=(1.0, -1.0)).rescale(0.2) == 0.0  # negative estimates count as 0
    assert TeaCache().rescale(0.25) == 0.25  # uncalibrated: the raw change


# ---- the pass --------------------------------------------------------------------------------------------

def test_insert_cache_cuts_the_stack_after_the_first_block_and_shows_the_body_in_the_dump():
    from xdit_fx.compiler.capture import capture_graphs
    from xdit_fx.debug.dump import render_graph
    from xdit_fx.compiler.passes import Mesh, PassContext, build_pipeline, run_pipeline
    from xdit_fx.ops.regions import CachedRegion

    tr = _digits().transformer
    x = torch.randn(2, tr.config.in_channels, 16, 16)
    gm = capture_graphs(tr, x, timestep=torch.tensor([500.0, 500.0]), class_labels=torch.tensor([1, 10]))[0]
    for config, skipped in [(FirstBlockCache(0.1), 3), (TeaCache(0.1), 4)]:
        plan = Plan(cache=config)
        out = run_pipeline(gm, build_pipeline(plan), PassContext(plan=plan, mesh=Mesh()))
        region = out.get_submodule("xfx_cache")
        assert isinstance(region, CachedRegion)
        assert region.spec.blocks_skipped == skipped and region.spec.blocks_total == 4
        body_blocks = {n.meta.get("xfx.block") for n in region.body.graph.nodes if n.op != "placeholder"}
        outer_blocks = {n.meta.get("xfx.block") for n in out.graph.nodes if n.op not in ("placeholder", "output")}
        if config.kind == "fbc":
            assert "transformer_blocks.0" not in body_blocks and "transformer_blocks.0" in outer_blocks
        else:  # the first block's start (norm + modulation) stays outside: it is the probe
            assert "transformer_blocks.0" in body_blocks and "transformer_blocks.0" in outer_blocks
        assert "transformer_blocks.3" in body_blocks and "transformer_blocks.3" not in outer_blocks
        text = render_graph(out)
        assert "%xfx_cache = module xfx_cache(" in text
        assert any(line.startswith("%xfx_cache.") and " = linear(" in line for line in text.splitlines())
        with pytest.raises(xdit_fx.XditFxError, match="not bound"):  # a dumped graph cannot run the cache
            region(*([torch.zeros(1)] * 3))
        gm = capture_graphs(tr, x, timestep=torch.tensor([500.0, 500.0]), class_labels=torch.tensor([1, 10]))[0]


# ---- serial runs on the digits model --------------------------------------------------------------------

@pytest.mark.parametrize("config", [FirstBlockCache, TeaCache])
def test_threshold_zero_is_bit_identical_and_huge_threshold_runs_only_warmup(config):
    pipe = _digits()
    ref = _generate(pipe)
    ppipe = xdit_fx.parallelize(pipe, Plan(cache=config(threshold=0.0)))
    assert torch.equal(_generate(ppipe), ref)
    stats = ppipe.cache_stats
    assert stats.full_steps() == list(range(STEPS)) and stats.skipped_fraction == 0.0
    ppipe.unwrap()

    for warmup in (1, 3):
        ppipe = xdit_fx.parallelize(pipe, Plan(cache=config(threshold=1e9, warmup_steps=warmup)))
        images = _generate(ppipe)
        stats = ppipe.cache_stats
        assert stats.full_steps() == list(range(warmup)), stats.summary()
        per_step_skipped = 3 if config is FirstBlockCache else 4  # FBC always runs the first of 4 blocks
        assert stats.blocks_total - stats.blocks_run == (STEPS - warmup) * per_step_skipped
        assert (images - ref).abs().max() > 1e-3  # skipping really changed the images
        again = _generate(ppipe)  # the state resets between generations: same decisions, same images
        assert ppipe.cache_stats.full_steps() == list(range(warmup)) and torch.equal(again, images)
        ppipe.unwrap()


def test_two_call_cfg_keeps_one_cache_state_per_branch():
    pipe = _digits()
    batched = xdit_fx.parallelize(pipe, Plan(cache=FirstBlockCache(0.2)))
    a = _generate(batched)
    decisions = batched.cache_stats.full_steps()
    batched.unwrap()
    two = xdit_fx.parallelize(pipe, Plan(cache=FirstBlockCache(0.2)))
    b = _generate(two, mode="two_call")
    stats = two.cache_stats
    two.unwrap()
    assert {r.slot for r in stats.records} == {0, 1} and len(stats.records) == 2 * STEPS
    assert 0 < len(decisions) < STEPS  # a threshold that skips some steps
    # each branch decides on its own residual history; here both take the batched decisions, so the images
    # differ only by the batched-vs-two-call rounding (measured 0 with this cache, 3e-7 without)
    assert (a - b).abs().max() < 3e-6


# ---- residual reuse on models of other shapes (MMDiT, U-ViT skips, nn.MultiheadAttention) --------------

@pytest.mark.parametrize("name", ["flux", "scratch_mha_uvit"])
@pytest.mark.parametrize("kind", ["fbc", "teacache"])
def test_a_repeated_call_is_skipped_and_reuses_the_residuals(name, kind):
    from xdit_fx.zoo import get

    entry = get(name)
    model = entry.build()
    torch._dynamo.reset()
    with torch.no_grad():
        plain = _flat(xdit_fx.parallelize(model, "serial")(**entry.inputs()))
        pm = xdit_fx.parallelize(model, f"cache={kind}:1e9")
        first, second = _flat(pm(**entry.inputs())), _flat(pm(**entry.inputs()))
    assert pm.cache_stats.full_steps() == [0] and pm.cache_stats.skipped_steps() == [1]
    assert _compare(first, plain)[0] == 0.0
    assert _compare(second, first)[0] <= REUSE_ATOL


def test_compile_runs_the_region_through_inductor_and_still_skips():
    """compile=True: the cached region is compiled by Inductor on its first run (the graph around it too);
    the first call matches the uncompiled one and the repeated call is skipped."""
    from xdit_fx.zoo import get

    entry = get("scratch_mha_uvit")
    model = entry.build()
    torch._dynamo.reset()
    with torch.no_grad():
        plain = _flat(xdit_fx.parallelize(model, "serial")(**entry.inputs()))
        pm = xdit_fx.parallelize(model, "cache=fbc:1e9,compile=1")
        first, second = _flat(pm(**entry.inputs())), _flat(pm(**entry.inputs()))
    regions = [m for g in pm.graphs for m in g.modules() if isinstance(m, CachedRegion)]
    assert regions and all(r.compiled is not None and r.compiled.compiled is not None for r in regions)
    assert pm.cache_stats.full_steps() == [0] and pm.cache_stats.skipped_steps() == [1]
    assert _compare(first, plain)[0] <= PARALLEL_ATOL, _compare(first, plain)  # Inductor reorders sums (seen: 4.8e-7)
    assert _compare(second, first)[0] <= REUSE_ATOL


class _BreakingBlock(torch.nn.Module):
    def __init__(self, dim: int = 16, graph_break: bool = False) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.graph_break = graph_break

    def forward(self, x):
        if self.graph_break:
            torch._dynamo.graph_break()
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        return x + torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class _BrokenStack(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([_BreakingBlock(), _BreakingBlock(), _BreakingBlock(graph_break=True),
                                           _BreakingBlock()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class _MLPBlock(_BreakingBlock):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(16, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 16))

    def forward(self, x):
        x = super().forward(x)
        return x + self.mlp(x)


class _SplitStack(torch.nn.Module):
    """Four blocks, a graph break between the second and the third; the last two are wider (costlier)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([_MLPBlock(32), _MLPBlock(32), _MLPBlock(128), _MLPBlock(128)])

    def forward(self, x):
        x = self.blocks[1](self.blocks[0](x))
        torch._dynamo.graph_break()  # (outside a loop: inside one, dynamo would run the loop eagerly)
        return self.blocks[3](self.blocks[2](x))


def test_a_stack_split_over_several_graphs_caches_the_costliest_region_and_runs_the_others():
    torch._dynamo.reset()
    model = _SplitStack().eval()
    x = torch.randn(1, 8, 16)
    with torch.no_grad():
        ref = model(x)
        pm = xdit_fx.parallelize(model, "cache=fbc:1e9")
        first, again = pm(x), pm(x)
    torch.testing.assert_close(first, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(again, ref, rtol=0, atol=1e-6)  # same input: the cached residual is exact
    regions = [m for g in pm.graphs for m in g.modules() if isinstance(m, CachedRegion)]
    assert len(regions) == 2  # one region per graph holding blocks
    # the wider second half is the main stack: its region skips, the first graph's always runs
    assert [id(r) in pm.cache.active for r in regions] == [False, True]
    assert "blocks.3" in regions[1].spec.description
    # the second call skipped one block of the chosen region; the other graph's two blocks ran
    assert [(r.full, r.blocks_run, r.blocks_total) for r in pm.cache_stats.records] == [(True, 4, 4), (False, 3, 4)]


def test_no_region_anywhere_is_refused_with_each_graphs_reason():
    class OneBlock(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([_BreakingBlock()])

        def forward(self, x):
            return self.blocks[0](x)

    torch._dynamo.reset()
    pm = xdit_fx.parallelize(OneBlock(), "cache=fbc:0.1")  # one block: nothing after the first to skip
    with pytest.raises(UnsupportedGraph, match="(?s)no captured graph.*needs a block after the first one"):
        pm(torch.randn(1, 8, 16))


# ---- parallel: the same decisions on every rank, the single process's images ------------------------------

CASES = [("ulysses=2", "batched", (0, 1, 2, 3), FirstBlockCache(0.2)),
         ("cfg=2", "batched", (0, 1, 2, 3), TeaCache(0.3)),
         ("cfg=2", "two_call", (7,), FirstBlockCache(0.2)),
         # ring: the metric's sums all-reduced over the ring ranks; dp: over the ranks sharing the batch.
         # Image error vs the single process with the same cache, measured 2026-12-06: ring 6.0e-7, the
         # others 0.0 (the same decisions, so the same steps run)
         ("ring=2", "batched", (0, 1, 2, 3), TeaCache(0.3)),
         ("dp=2", "batched", (0, 1, 2, 3), FirstBlockCache(0.2))]


def _parallel_worker(rank: int, world: int) -> list[dict]:
    pipe = _digits()
    results = []
    for plan_text, mode, labels, config in CASES:
        torch._dynamo.reset()
        ppipe = xdit_fx.parallelize(pipe, dataclasses.replace(Plan.from_string(plan_text), cache=config))
        work = parallel_checks.instrument(ppipe.denoisers["transformer"])
        out = _generate(ppipe, labels, mode)
        results.append({"images": out, "records": [(r.step, r.slot, r.full) for r in ppipe.cache_stats.records],
                        "paired": ppipe.pair_state.paired, "work": parallel_checks.finish(work)})
        ppipe.unwrap()
    return results


def test_parallel_ranks_take_the_single_process_decisions():
    pipe = _digits()
    serial = []
    for _, mode, labels, config in CASES:
        ppipe = xdit_fx.parallelize(pipe, Plan(cache=config))
        serial.append((_generate(ppipe, labels, mode), [(r.step, r.slot, r.full) for r in ppipe.cache_stats.records]))
        ppipe.unwrap()
    per_rank = spawn_gloo(2, _parallel_worker)
    for i, (plan_text, mode, labels, config) in enumerate(CASES):
        r0, r1 = per_rank[0][i], per_rank[1][i]
        for r in (r0, r1):  # the plan ran in parallel (sharded attention / half the rows per rank)
            parallel_checks.check(r["work"], plan_text)
        ref_images, ref = serial[i]
        assert torch.equal(r1["images"], r0["images"])  # every rank returns the same images
        err = (r0["images"] - ref_images).abs().max().item()
        print(f"{plan_text} {mode} {config}: max abs err {err:.2e}")
        assert err <= PARALLEL_ATOL, (CASES[i], err)
        assert 0 < sum(full for _, _, full in ref) < len(ref), ref  # the threshold skips some steps, not all
        if mode == "two_call":
            # paired CFG: both ranks run step 0 whole, then cfg rank r runs branch r with that branch's
            # serial decisions (its own residual history)
            assert r0["paired"] and r1["paired"]
            for rank, r in enumerate((r0, r1)):
                assert r["records"] == [x for x in ref if x[0] == 0 or x[1] == rank], (rank, r)
        else:
            assert r0["records"] == ref and r1["records"] == ref, (CASES[i], r0["records"], r1["records"], ref)


class _WriteAfterStack(torch.nn.Module):
    """A buffer written in place after the stack and read again later: the read must stay after the write."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([_BreakingBlock() for _ in range(3)])

    def forward(self, x):
        buf = torch.zeros_like(x)
        h = self.blocks[2](self.blocks[1](self.blocks[0](x)))
        buf.add_(h)
        doubled = buf * 2  # depends on no block through data, only through the write
        return h + doubled


def test_a_cut_that_would_move_a_read_across_an_in_place_write_is_refused_by_name():
    torch._dynamo.reset()
    pm = xdit_fx.parallelize(_WriteAfterStack(), "cache=fbc:0.1")
    with pytest.raises(UnsupportedGraph, match=r"(?s)node 'add_'.*writes a tensor in place.*would move 'doubled'"):
        pm(torch.randn(1, 8, 16))


# ---- against an independent reference: First-Block-Cache written with forward hooks on the plain model ----

def _fbc_model_and_calls():
    """A 4-block DiT and 8 calls whose input moves by large and small steps, so that some calls skip."""
    from xdit_fx.zoo import ScratchDiT, get
    torch.manual_seed(0)
    model = ScratchDiT(depth=4).eval()
    base = get("scratch_dit").inputs()
    g = torch.Generator().manual_seed(1)
    calls, x = [], base["x"]
    for noise in (0.3, 0.01, 0.01, 0.3, 0.01, 0.02, 0.5, 0.01):
        x = x + noise * torch.randn(x.shape, generator=g)
        calls.append(dict(base, x=x))
    return model, calls


#: the reference's threshold falls between its metrics (0.006-0.016 on small moves, 0.26-0.34 on large ones)
FBC_THRESHOLD = 0.05
#: ulysses/ring split the metric's sums over ranks (float64) and round the blocks differently (measured: metric
#: relative difference 2e-7, outputs 4.8e-7 under ulysses=2 and ring=2)
FBC_METRIC_RTOL, FBC_PARALLEL_ATOL = 1e-5, 2e-6


def _fbc_run(model, calls, plan_text: str) -> dict:
    pm = xdit_fx.parallelize(model, dataclasses.replace(Plan.from_string(plan_text), cache=FirstBlockCache(FBC_THRESHOLD)))
    with torch.no_grad():
        outs = [pm(**c) for c in calls]
    return {"outs": outs, "full": [r.full for r in pm.cache.stats.records],
            "metrics": [r.metric for r in pm.cache.stats.records], "comm": pm.last_comm}


def _fbc_parallel_worker(rank: int, world: int) -> dict:
    model, calls = _fbc_model_and_calls()
    out = {}
    for plan_text in ("ulysses=2", "ring=2"):
        torch._dynamo.reset()
        out[plan_text] = _fbc_run(model, calls, plan_text)
    return out


def _check_against_reference(run: dict, ref: tuple, atol: float, where: str) -> None:
    ref_outs, ref_full, ref_metrics = ref
    assert run["full"] == ref_full, (where, run["full"], ref_full)
    for t, (m, rm) in enumerate(zip(run["metrics"], ref_metrics)):
        assert (m is None) == (rm is None) and (m is None or abs(m - rm) <= FBC_METRIC_RTOL * rm), (where, t, m, rm)
    for t, (o, r) in enumerate(zip(run["outs"], ref_outs)):
        err = (o - r).abs().max().item()
        assert err <= atol, f"{where} call {t} ({'full' if ref_full[t] else 'skipped'}): {err:.3g}"


def test_first_block_cache_equals_the_reference_built_from_hooks():
    """Decisions, metrics and outputs (skipped calls: the cached residual of the stack added to this call's
    stack input) equal a First-Block-Cache written with forward hooks on the plain model (exact: measured 0)."""
    from references import fbc_reference
    model, calls = _fbc_model_and_calls()
    ref = fbc_reference(model, model.blocks, calls, FBC_THRESHOLD)
    assert 0 < sum(ref[1]) < len(calls), ref[1]  # some calls skip, some run the stack
    _check_against_reference(_fbc_run(model, calls, ""), ref, REUSE_ATOL, "single process")


def test_first_block_cache_under_ulysses_and_ring_equals_the_reference():
    """Every rank records the single process's metric (the sums are all-reduced, not taken on its shard) and
    returns the reference's outputs."""
    from references import fbc_reference
    model, calls = _fbc_model_and_calls()
    ref = fbc_reference(model, model.blocks, calls, FBC_THRESHOLD)
    per_rank = spawn_gloo(2, _fbc_parallel_worker)
    for rank, res in enumerate(per_rank):
        for plan_text, run in res.items():
            axis = plan_text.split("=")[0]
            assert run["comm"][axis], f"{plan_text} rank {rank}: nothing moved on the {axis} axis"
            _check_against_reference(run, ref, FBC_PARALLEL_ATOL, f"{plan_text} rank {rank}")
