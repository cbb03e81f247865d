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
    counts = [s.name for s in xdit_fx.parallelize(model, xdit_fx.Plan()).histories]
    assert counts == []  # nothing captured before the first call
