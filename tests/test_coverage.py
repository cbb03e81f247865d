"""`xdit-fx coverage` on a representative subset of the zoo (the full matrix runs with `make coverage`).

One 2-process spawn runs every model under ulysses=2 and ring=2: a MoE, an audio DiT, a U-ViT, a video DiT with
history latents, a packed text+image model with mrope, and a model whose noise mask is written into one segment
of a freshly created tensor (it used to come out silently wrong)."""

from __future__ import annotations

import pytest

from xdit_fx.cli.coverage import ModelSpec, classify, run_coverage, write_report
from xdit_fx.zoo import coverage_zoo, excluded

SUBSET = ["nucleus_moe_image_moe",  # MoE feed-forward
          "ace_step",               # audio 1-D, GQA
          "hunyuan_dit",            # U-ViT long skips, nn.MultiheadAttention pooling outside the blocks
          "helios",                 # video with history latents: per-token tables from another cat chain
          "ideogram4",              # packed sequence, mrope built with a tensor index
          "bria_fibo2"]             # setitem into one segment of a fresh mask
PLANS = ["ulysses=2", "ring=2"]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    zoo = coverage_zoo()
    specs = [ModelSpec(n, zoo=n, heads=zoo[n].heads) for n in SUBSET]
    out = tmp_path_factory.mktemp("coverage") / "cov.jsonl"
    return run_coverage(specs, PLANS, str(out), model_timeout=240, log=lambda s: None)


@pytest.mark.parametrize("name", SUBSET)
def test_subset_reaches_parity_without_fallback_gathers(records, name):
    recs = {r["plan"]: r for r in records if r["model"] == name}
    assert set(recs) == set(PLANS)
    for plan, r in recs.items():
        assert r["ok"], f"{name} {plan}: {r.get('error')}"
        assert r["sp_attention"] > 0 and r["fallback_gathers"] == 0, (name, plan, r)
        # the census: attention calls of one eager forward vs attention runs made sequence parallel
        assert 0 < r["sharded_attention_runs"] <= r["eager_attention_calls"], (name, plan, r)
    assert classify(recs, PLANS) == "parity"


def test_report_headline_counts_classes_and_lists_exclusions(tmp_path):
    recs = [
        {"model": "a", "plan": p, "ok": True, "max_abs": 1e-7, "rel": 1e-7, "graphs": 1, "self": 1, "cross": 0,
         "joint": 0, "sp_attention": 1, "fallback_gathers": 0, "eager_attention_calls": 3,
         "sharded_attention_runs": 2} for p in PLANS
    ] + [{"model": "b", "plan": p, "ok": False, "error": "UnsupportedGraph: node 'x'"} for p in PLANS]
    entries = {"a": {"source": "A", "diffusers": True}, "b": {"source": "B", "diffusers": True}}
    path = tmp_path / "COVERAGE.md"
    summary = write_report(recs, entries, excluded(), str(path), required=PLANS, not_configured={"C": "why"})
    text = path.read_text()
    assert summary["classes"] == 3 and summary["classes_parity"] == 1 and summary["classes_fail"] == 2
    assert "1 / 3" in text and "UnsupportedGraph: node 'x'" in text and "no tiny config: why" in text
    assert "| a | A | yes | 1/0/0 | 3/2 | 0 |" in text and "| b | B | no | - | - |" in text, text
    assert all(cls in text for cls in excluded())


def test_every_zoo_entry_names_its_class():
    for name, m in coverage_zoo().items():
        assert m.source, name
