"""ModelFacts for the planner from what a user has: a module (weights or not), a pipeline, or a MODEL spec.

A diffusers model is rebuilt from its config on the meta device (no weights, no compute) and captured with
inputs derived from its forward signature (`debug.model.derive_inputs`, as `xdit-fx dump` does); any other
module is captured as it is, with the inputs given. A pipeline contributes its denoiser, whether it uses
guidance (read from its call signature) and its VAE's decode size.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
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


# ---- the planner's inputs from a MODEL spec (what `xdit-fx plan` and `--plan auto` take) ----

def folder_guidance(path: str) -> str:
    """none | batched from a pipeline folder's model_index.json (the pipeline class's call signature)."""
    index = os.path.join(path, "model_index.json")
    if not os.path.exists(index):
        return "none"
    import diffusers

    cls = getattr(diffusers, json.load(open(index)).get("_class_name", ""), None)
    return pipeline_guidance(cls) if cls is not None else "none"


def folder_vae_bytes(path: str, sizes, dtype_bytes: int) -> float:
    cfg_path = os.path.join(path, "vae", "config.json")
    if not os.path.exists(cfg_path):
        return 0.0
    channels = (json.load(open(cfg_path)).get("block_out_channels") or [0])[0]
    return 3.0 * channels * sizes.height * sizes.width * max(1, sizes.frames) * sizes.batch * dtype_bytes


def plan_report(args: argparse.Namespace):
    """(ranked predictions, rejected, facts, hardware) for the command's arguments."""
    from xdit_fx.compiler.hardware import load_profile
    from xdit_fx.compiler.plan_search import rank_plans
    from xdit_fx.debug.model import load_model

    if args.world_size < 1:
        raise XditFxError(f"--world-size {args.world_size}: need at least 1")
    hw = load_profile(args.hardware).with_nodes(args.nodes, args.world_size)
    guidance = args.guidance or (folder_guidance(args.model) if os.path.isdir(args.model) else "none")
    sizes = InputSizes(height=args.height, width=args.width, frames=args.frames, text_len=args.text_len,
                       batch=args.batch * (2 if guidance == "batched" else 1))
    loaded = load_model(args.model, config=args.config, dtype=args.dtype, device="meta", sizes=sizes,
                        overrides=args.input)
    facts = model_facts(loaded.model, loaded.inputs, loaded.description)
    vae = folder_vae_bytes(args.model, sizes, facts.dtype_bytes) if os.path.isdir(args.model) else 0.0
    work = Workload(guidance=guidance, steps=args.steps, vae_bytes=vae)
    preds, rejected = rank_plans(facts, args.world_size, hw, work)
    return preds, rejected, facts, hw, work


def auto_for_model(model: str | None, world_size: int, *, hardware: str | None = None, height: int | None = None,
                   width: int | None = None, frames: int | None = None, images: int = 1, steps: int = 20):
    """The cost model's choice for a pipeline folder (or the digits model: None), as `--plan auto` of
    `generate` and `serve` resolves it before any process starts: a Prediction. The folder is read on the meta
    device; guidance comes from the pipeline class's call signature (digits: batched)."""
    from xdit_fx.compiler.plan_search import choose_plan
    from xdit_fx.plan import Plan

    if world_size == 1:
        return None, Plan()
    args = argparse.Namespace(model=model, world_size=world_size, nodes=1, frames=frames or 1, text_len=512,
                              batch=images, guidance=None, steps=steps, dtype=None, config=None, input=[],
                              hardware=hardware or _default_hardware(), height=height or 1024, width=width or 1024)
    if model is None:  # the digits model: no VAE, its 16x16 latent is the image (derive_inputs divides by 8)
        from xdit_fx.digits import pipeline as digits_pipeline

        args.model = os.path.join(os.path.dirname(digits_pipeline.__file__), "checkpoint")
        args.height = args.width = 16 * 8
        args.guidance, args.dtype = "batched", "float32"
    preds, rejected, facts, hw, work = plan_report(args)
    best = choose_plan(facts, world_size, hw, work)
    return preds, best.plan


def _default_hardware() -> str:
    import torch

    return "h100-nvlink" if torch.cuda.is_available() else "cpu-gloo"


def resolve_auto(model: str | None, world_size: int | None, **kw) -> str:
    """`--plan auto` for a command: the chosen plan's string; prints the ranking's head and the reason."""
    from xdit_fx.compiler.plan_search import explain

    if world_size is None:
        raise XditFxError("--plan auto needs --nproc N (the ranks to plan for)")
    preds, plan = auto_for_model(model, world_size, **kw)
    if preds:
        print(f"--plan auto: {plan.to_string()} on {world_size} ranks. {explain(preds)}", flush=True)
    return plan.to_string()
