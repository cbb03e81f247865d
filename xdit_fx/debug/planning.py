"""ModelFacts for the planner from what a user has: a module (weights or not), a pipeline, or a MODEL spec.

A diffusers model is rebuilt from its config on the meta device (no weights, no compute) and captured with
inputs derived from its forward signature (`debug.model.derive_inputs`, as `xdit-fx dump` does); any other
module is captured as it is, with the inputs given. A pipeline contributes its denoiser, whether it uses
guidance (read from its call signature) and its VAE's decode size.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from xdit_fx.compiler.plan_cost import Workload
from xdit_fx.compiler.plan_facts import ModelFacts, model_facts
from xdit_fx.debug.model import InputSizes, _build, _model_dtype, derive_inputs
from xdit_fx.errors import XditFxError

#: pipeline call parameters that say how it applies classifier-free guidance
TWO_CALL_FLAG = "true_cfg_scale"


def denoiser_of(pipe: Any) -> nn.Module:
    for name in ("transformer", "unet", "transformer_2"):
        m = getattr(pipe, name, None)
        if isinstance(m, nn.Module):
            return m
    raise XditFxError(f"{type(pipe).__name__}: no transformer to plan for")


def pipeline_guidance(pipe: Any) -> str:
    """none | batched, from the call signature: a pipeline with a negative prompt (and no true-CFG switch,
    which is off by default) batches the two guidance branches."""
    params = inspect.signature(pipe.__call__).parameters
    if TWO_CALL_FLAG in params:
        return "none"
    return "batched" if "negative_prompt" in params or "guidance_scale" in params else "none"


def vae_decode_bytes(pipe: Any, sizes: InputSizes, dtype_bytes: int) -> float:
    """Peak activation bytes of one VAE decode on one device: about 3 tensors of the decoder's last block's
    channels at the output resolution (input, output and a group norm's temporary of a convolution)."""
    vae = getattr(pipe, "vae", None)
    cfg = dict(getattr(vae, "config", {}) or {})
    channels = (cfg.get("block_out_channels") or [0])[0]
    return 3.0 * channels * sizes.height * sizes.width * max(1, sizes.frames) * sizes.batch * dtype_bytes


def facts_of_module(model: nn.Module, sizes: InputSizes, inputs: dict[str, Any] | None = None) -> ModelFacts:
    """ModelFacts of `model` at `sizes` (or for `inputs`); diffusers models are rebuilt on the meta device."""
    if inputs is not None:
        return model_facts(model, inputs)
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(type(model), "from_config"):
        raise XditFxError(f"{type(model).__name__} has no diffusers config to derive its inputs from: give "
                          f"example inputs (auto_plan(model, world_size, inputs={{...}}))")
    dtype = str(_model_dtype(model)).replace("torch.", "")
    meta = _build(type(model), dict(cfg), dtype, "meta")
    return model_facts(meta, derive_inputs(meta, sizes, "meta"), type(model).__name__)


def is_pipeline_like(obj: Any) -> bool:
    return isinstance(getattr(obj, "components", None), dict) and hasattr(obj, "scheduler")


def plan_inputs(obj: Any, sizes: InputSizes, inputs: dict[str, Any] | None = None, guidance: str | None = None,
                steps: int = 20) -> tuple[ModelFacts, Workload]:
    """(ModelFacts, Workload) of a module or pipeline; `sizes.batch` is the images per call. Under batched
    guidance the captured batch holds both branches (2 x images)."""
    pipe = obj if is_pipeline_like(obj) else None
    model = denoiser_of(pipe) if pipe is not None else obj
    if guidance is None:
        guidance = pipeline_guidance(pipe) if pipe is not None else "none"
    if guidance not in ("none", "batched", "two-call"):
        raise XditFxError(f"guidance {guidance!r}: use none, batched or two-call")
    captured = InputSizes(**{**sizes.__dict__, "batch": sizes.batch * (2 if guidance == "batched" else 1)})
    facts = facts_of_module(model, captured, inputs)
    vae = vae_decode_bytes(pipe, sizes, facts.dtype_bytes) if pipe is not None else 0.0
    return facts, Workload(guidance=guidance, steps=steps, vae_bytes=vae)
