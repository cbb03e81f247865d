"""parallelize() as a drop-in: capture once per input signature, the original module untouched."""

from __future__ import annotations

import torch

import xdit_fx
from xdit_fx import zoo


def test_capture_is_cached_per_input_signature_and_the_model_is_untouched():
    torch._dynamo.reset()
    entry = zoo.get("scratch_dit")
    model = entry.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forward_before = type(model).forward
    pm = xdit_fx.parallelize(model, xdit_fx.Plan())  # one process: analysis passes only
    with torch.no_grad():
        even, uneven = entry.inputs(uneven=False), entry.inputs(uneven=True)
        out1 = pm(**even)
        pm(**even)
        assert len(pm.histories) == 1, "the same input signature must not be captured twice"
        pm(**uneven)
        assert len(pm.histories) == 2, "a new token count is a new signature"
        assert torch.equal(out1, model(**even))
    assert type(model).forward is forward_before and not hasattr(model, "_compiled")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_parallel_module_reads_through_to_the_wrapped_model():
    entry = zoo.get("flux")
    model = entry.build()
    pm = xdit_fx.parallelize(model, "serial")
    assert pm.config is model.config and pm.dtype == model.dtype
    pm = xdit_fx.parallelize(model, xdit_fx.Plan())
    assert pm.histories == [] and pm.graphs == []  # nothing captured before the first call
    torch._dynamo.reset()
    with torch.no_grad():
        out = pm(**entry.inputs())
    # the first call captures one graph and the passes ran on it
    assert len(pm.histories) == 1 and len(pm.graphs) == 1
    assert [s.name for s in pm.histories[0].snapshots][:2] == ["captured", "normalize_attention"]
    with torch.no_grad():
        torch.testing.assert_close(out, model(**entry.inputs()), rtol=0, atol=0)


class _Attn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).view(1, -1, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_many_instances_of_one_class_are_all_captured_without_changing_dynamos_settings():
    """More instances than dynamo's default recompile_limit (8) share one forward code object: each must still
    be captured (past the limit dynamo would run the forward eagerly, unparallelized), and the process-wide
    limits stay as they were (the raise is scoped to the calls)."""
    torch._dynamo.reset()
    cfg = torch._dynamo.config
    limits = (cfg.recompile_limit, cfg.accumulated_recompile_limit)
    n = cfg.recompile_limit + 4
    x = torch.randn(1, 8, 16)
    with torch.no_grad():
        pms = [xdit_fx.parallelize(_Attn(), xdit_fx.Plan()) for _ in range(n)]
        for pm in pms:
            pm(x)
    assert [len(pm.histories) for pm in pms] == [1] * n
    assert (cfg.recompile_limit, cfg.accumulated_recompile_limit) == limits
