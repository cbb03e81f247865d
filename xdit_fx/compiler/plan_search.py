"""Plan search: every plan the model allows on a world size, each predicted by the cost model, ranked.

Candidates are the factorizations ``dp * cfg * pipefusion * ring * ulysses = world_size`` (and, under
PipeFusion, M in {N, 2N, 4N, 8N} patches) that satisfy:

* cfg = 2 only when the pipeline uses guidance (``Workload.guidance`` is not ``none``);
* dp divides the images of a call (more replicas than images would only duplicate work);
* Ulysses: every self/joint attention site's heads and KV heads divisible by ulysses;
* sequence parallel and PipeFusion need a self/joint attention site; PipeFusion needs at least N blocks and
  the longest token segment divisible by M * ring * ulysses (shorter segments that do not split are computed
  whole by every patch, as the pass does);
* the plan fits in the device's memory (`Prediction.memory['total'] <= hardware.memory`).

`rank_plans` returns the predictions, fitting plans first, fastest first; `choose_plan` the winner (or a
PlanError that says what the smallest plan needs).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from xdit_fx.compiler.hardware import HardwareProfile
from xdit_fx.compiler.plan_cost import Prediction, Workload, predict
from xdit_fx.compiler.plan_facts import ModelFacts
from xdit_fx.errors import PlanError
from xdit_fx.plan import Plan

PATCH_FACTORS = (1, 2, 4, 8)
GIB = 2 ** 30


@dataclass(frozen=True)
class Rejected:
    plan: str
    reason: str


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def factorizations(world_size: int) -> list[tuple[int, int, int, int, int]]:
    """Every (dp, cfg, pipefusion, ring, ulysses) with cfg <= 2 whose product is world_size."""
    out = []
    for dp, cfg, pf, ring in itertools.product(_divisors(world_size), (1, 2), _divisors(world_size),
                                               _divisors(world_size)):
        rest = dp * cfg * pf * ring
        if world_size % rest == 0:
            out.append((dp, cfg, pf, ring, world_size // rest))
    return sorted(set(out))


def images_per_call(facts: ModelFacts, work: Workload) -> int:
    return max(1, facts.batch // (2 if work.guidance == "batched" else 1))


def _refusal(facts: ModelFacts, work: Workload, dp: int, cfg: int, pf: int, ring: int, uly: int) -> str | None:
    """Why the model does not allow this factorization (None: allowed, patches aside)."""
    sp_sites = [s for s in facts.sites if s[6] != "cross"]
    if cfg > 1 and work.guidance == "none":
        return "cfg=2 needs classifier-free guidance"
    if dp > 1 and images_per_call(facts, work) % dp:
        return f"dp={dp} does not divide the {images_per_call(facts, work)} image(s) of a call"
    if (ring * uly > 1 or pf > 1) and not sp_sites:
        return "no self/joint attention to shard the sequence of"
    bad = sorted({h for h in facts.sp_heads() if h % uly})
    if bad:
        return f"heads {bad} not divisible by ulysses={uly}"
    if pf > facts.blocks:
        return f"pipefusion={pf} > {facts.blocks} blocks"
    return None


def candidate_plans(facts: ModelFacts, world_size: int, work: Workload) -> tuple[list[Plan], list[Rejected]]:
    """The plans the search predicts, and the factorizations it refused with the reason."""
    plans: list[Plan] = []
    rejected: list[Rejected] = []
    longest = max(facts.segments, default=facts.tokens)
    for dp, cfg, pf, ring, uly in factorizations(world_size):
        text = Plan(dp_degree=dp, cfg_degree=cfg, pipefusion_degree=pf, ring_degree=ring,
                    ulysses_degree=uly).to_string()
        why = _refusal(facts, work, dp, cfg, pf, ring, uly)
        if why:
            rejected.append(Rejected(text, why))
            continue
        if pf == 1:
            plans.append(Plan(dp_degree=dp, cfg_degree=cfg, ring_degree=ring, ulysses_degree=uly))
            continue
        for m in sorted({pf * f for f in PATCH_FACTORS}):
            if longest % (m * ring * uly):
                rejected.append(Rejected(f"{text},patches={m}", f"the {longest}-token segment is not divisible "
                                                                 f"by patches x ring x ulysses = {m * ring * uly}"))
                continue
            plans.append(Plan(dp_degree=dp, cfg_degree=cfg, pipefusion_degree=pf, ring_degree=ring,
                              ulysses_degree=uly, pipefusion_patches=m))
    return plans, rejected


def rank_plans(facts: ModelFacts, world_size: int, hw: HardwareProfile, work: Workload = Workload()
               ) -> tuple[list[Prediction], list[Rejected]]:
    """Predictions of every candidate, fitting plans first, then by predicted time per step."""
    if world_size < 1:
        raise PlanError(f"world size {world_size}: need at least one rank")
    plans, rejected = candidate_plans(facts, world_size, work)
    preds = [predict(facts, p, hw, work) for p in plans]
    preds.sort(key=lambda p: (not p.fits, p.per_step_s))
    return preds, rejected


def choose_plan(facts: ModelFacts, world_size: int, hw: HardwareProfile, work: Workload = Workload()) -> Prediction:
    """The fastest plan that fits; PlanError naming the smallest memory need when none fits."""
    if world_size == 1:
        return predict(facts, Plan(), hw, work)
    preds, rejected = rank_plans(facts, world_size, hw, work)
    if not preds:
        reasons = "; ".join(f"{r.plan}: {r.reason}" for r in rejected[:6])
        raise PlanError(f"no plan of {world_size} ranks is allowed for this model ({reasons})")
    best = preds[0]
    if not best.fits:
        least = min(preds, key=lambda p: p.memory["total"])
        raise PlanError(
            f"no plan of {world_size} ranks fits in {hw.memory / GIB:.1f} GiB per device ({hw.name}): the "
            f"smallest, {least.plan.to_string()}, needs {least.memory['total'] / GIB:.1f} GiB per rank "
            f"(weights {least.memory['weights'] / GIB:.1f} GiB). Use more ranks (PipeFusion shards the blocks' "
            f"weights over its stages), a smaller dtype, or a device with more memory.")
    return best


PART_WORDS = {
    "compute": "the block stack's compute", "whole": "the parts outside the block stack (run whole)",
    "ulysses": "Ulysses all-to-alls", "ring": "ring P2P not hidden behind compute", "gather": "the exit gather",
    "pipeline": "PipeFusion's bubble, stage imbalance and transfers", "broadcast": "the output broadcast",
    "batch_gather": "the cfg/dp output gather",
}


def explain(preds: list[Prediction]) -> str:
    """One sentence on why the first prediction wins over the next fitting one."""
    if not preds:
        return "no candidate"
    best = preds[0]
    if len(preds) == 1:
        return f"{best.plan.to_string()} is the only plan the model allows on this world size."
    other = next((p for p in preds[1:] if p.fits), None)
    if other is None:
        return (f"{best.plan.to_string()} is the only plan that fits in memory ({best.memory['total'] / GIB:.3g} GiB "
                f"per rank); the others need more.")
    diffs = {k: other.parts.get(k, 0.0) - best.parts.get(k, 0.0) for k in set(best.parts) | set(other.parts)}
    part = max(diffs, key=diffs.get)
    return (f"{best.plan.to_string()} wins ({best.per_step_s * 1e3:.4g} ms/step vs {other.per_step_s * 1e3:.4g} ms "
            f"for {other.plan.to_string()}) because {PART_WORDS.get(part, part)} costs "
            f"{diffs[part] * 1e3:.3g} ms/step less; its bottleneck is {PART_WORDS.get(best.bottleneck, best.bottleneck)}.")


def format_table(preds: list[Prediction], limit: int = 20) -> str:
    """The ranked candidates: time per step, memory per rank, bytes per link, bottleneck."""
    rows = ["| # | plan | ms/step | fits | GiB/rank | MiB/step by axis (link) | bottleneck |",
            "|---|---|---|---|---|---|---|"]
    for i, p in enumerate(preds[:limit], start=1):
        links = ", ".join(f"{a} {b / 2 ** 20:.3g} ({p.links.get(a, 'intra' if a in ('sp', 'batch') else '-')})"
                          for a, b in sorted(p.bytes.items())) or "-"
        rows.append(f"| {i} | {p.plan.to_string()} | {p.per_step_s * 1e3:.4g} | {'yes' if p.fits else 'no'} | "
                    f"{p.memory['total'] / GIB:.3g} | {links} | {p.bottleneck} |")
    return "\n".join(rows)
