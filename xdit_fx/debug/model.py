"""What `xdit-fx dump` dumps: a model named on the command line, built without weights, plus its inputs.

MODEL is one of
  * a zoo name (`xdit_fx.zoo`, e.g. `flux`, `scratch_dit`, or a coverage entry such as `ltx_video`): the tiny
    model and its own inputs, on CPU;
  * a local diffusers model folder (its `config.json`, or a pipeline folder with `transformer/config.json`):
    the class named by `_class_name`, built from the config on the meta device, so a 12B config needs
    no weights and no memory;
  * `package.module:Class` with `--config JSON_OR_FILE`: built on the meta device with `from_config`
    (diffusers classes) or `Class(**config)`.

Inputs for the last two are derived from the forward signature and the config (`derive_inputs`):
latent sizes from `--height/--width/--frames` (pixels) and the VAE factors, text length from
`--text-len`, channel and embedding widths from the config. `--input NAME=1,4096,64[:dtype]` overrides or
adds any tensor input. Nothing here branches on the model class: the rules key on parameter names and
config fields.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from xdit_fx.errors import XditFxError
from xdit_fx.plan import AXES, Plan, _SHORT_NAMES

#: Axes applied outside the captured graph (the runtime splits the batch before the transformer call).
OUTSIDE_GRAPH_AXES = ("dp", "cfg")


class ModelSpecError(XditFxError, ValueError):
    """A MODEL argument that names nothing we can build, or inputs we cannot derive."""


# ---- plans for tools ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToolPlan:
    """A plan as the tools see it: `graph` is what the graph passes get; `requested` is what plan.json says;
    `outside` are the degrees of the axes applied outside the graph (cfg, dp)."""

    graph: Plan
    requested: dict
    outside: dict[str, int]

    @property
    def world_size(self) -> int:
        size = 1
        for axis in AXES:
            size *= int(self.requested.get(_SHORT_NAMES[axis], 1))
        return size


def parse_tool_plan(text: str) -> ToolPlan:
    """`Plan.from_string(text)` (its errors are the CLI's), with the degrees of the axes applied outside the
    graph (cfg, dp) reported in `outside`."""
    plan = Plan.from_string(text)
    return ToolPlan(plan, plan.to_dict(), {a: plan.degree(a) for a in OUTSIDE_GRAPH_AXES})


def outside_graph_note(tp: ToolPlan) -> str | None:
    """One line saying which axes the graph passes do not see (cfg, dp > 1), or None.

    If this version's pipeline does have passes for them (the pass list changes with the degree), the
    line says so instead."""
    import dataclasses

    from xdit_fx.compiler.passes import build_pipeline

    axes = {a: d for a, d in tp.outside.items() if d > 1}
    if not axes:
        return None
    what = ", ".join(f"{a}={d}" for a, d in axes.items())
    without = dataclasses.replace(tp.graph, **{_SHORT_NAMES[a]: 1 for a in axes})
    if [p.info.name for p in build_pipeline(without)] != [p.info.name for p in build_pipeline(tp.graph)]:
        return f"{what}: the pass list includes passes for these axes"
    return (f"{what}: applied outside the graph, not by a pass: the runtime splits the batch "
            f"(cfg: conditional / unconditional halves; dp: prompts) over those ranks before the transformer "
            f"call, so each rank captures and rewrites the graph below for its share of the batch; the pass "
            f"list is the same as without {'them' if len(axes) > 1 else 'it'}")


# ---- models ------------------------------------------------------------------------------------------

@dataclass
class InputSizes:
    """Sizes the derived inputs describe; the defaults are a 1024x1024 image with 512 text tokens."""

    height: int = 1024
    width: int = 1024
    frames: int = 1          # pixel frames (video models); latent frames = (frames - 1) // t + 1
    text_len: int = 512
    batch: int = 1
    vae_scale: int = 8       # pixels per latent pixel
    vae_scale_t: int = 4     # frames per latent frame (unless the config says temporal_compression_ratio)


@dataclass
class LoadedModel:
    model: nn.Module
    inputs: dict[str, Any]
    description: str
    notes: list[str] = field(default_factory=list)


def parse_shape_override(text: str) -> tuple[str, tuple[int, ...], torch.dtype | None]:
    """`NAME=1,4096,64[:bfloat16]` -> (name, shape, dtype)."""
    name, sep, rest = text.partition("=")
    shape_s, _, dtype_s = rest.partition(":")
    try:
        if not sep or not name.strip():
            raise ValueError
        shape = tuple(int(s) for s in shape_s.replace("x", ",").split(",") if s.strip())
        dtype = _dtype(dtype_s) if dtype_s else None
    except (ValueError, ModelSpecError):
        raise ModelSpecError(f"--input {text!r}: use NAME=DIM,DIM,...[:dtype], e.g. "
                             f"hidden_states=1,4096,64:bfloat16") from None
    return name.strip(), shape, dtype


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name.strip().replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype):
        raise ModelSpecError(f"unknown dtype {name!r}; use e.g. float32, bfloat16, float16")
    return dt


def load_model(spec: str, *, config: str | None = None, dtype: str | None = None, device: str | None = None,
               sizes: InputSizes | None = None, overrides: list[str] = ()) -> LoadedModel:
    """Build MODEL (see the module docstring) and the inputs to capture it with."""
    sizes = sizes or InputSizes()
    given = {parse_shape_override(text)[0] for text in overrides}
    from xdit_fx import zoo

    if config is None and (spec in zoo.ZOO or spec in zoo.coverage_zoo()):
        loaded = _load_zoo(spec, device or "cpu", sizes)
    elif ":" in spec and not os.path.exists(spec):
        loaded = _load_class(spec, config, dtype, device or "meta", sizes, given)
    elif os.path.exists(spec):
        loaded = _load_folder(spec, dtype, device or "meta", sizes, given)
    else:
        raise ModelSpecError(
            f"model {spec!r} not found: MODEL is a zoo name ({', '.join(sorted(zoo.ZOO))}, or any entry of "
            f"`xdit-fx coverage --list`), a diffusers model "
            f"folder with a config.json, or package.module:Class with --config")
    for text in overrides:
        name, shape, dt = parse_shape_override(text)
        old = loaded.inputs.get(name)
        dev = old.device if isinstance(old, torch.Tensor) else torch.device(device or "meta")
        dt = dt or (old.dtype if isinstance(old, torch.Tensor) else _model_dtype(loaded.model))
        loaded.inputs[name] = torch.zeros(shape, dtype=dt, device=dev)
    return loaded


def _load_zoo(name: str, device: str, sizes: InputSizes) -> LoadedModel:
    from xdit_fx import zoo

    entry = zoo.get(name)
    if device == "meta":
        with torch.device("meta"):
            model = entry.build()
    else:
        model = entry.build()
    inputs = entry.inputs(batch=sizes.batch)
    if device == "meta":
        inputs = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return LoadedModel(model, inputs, f"{name} (xdit_fx.zoo, {type(model).__name__}, {device})")


def _load_folder(path: str, dtype: str | None, device: str, sizes: InputSizes, given: set) -> LoadedModel:
    cfg_path = path
    if os.path.isdir(path):
        for candidate in ("config.json", os.path.join("transformer", "config.json")):
            if os.path.exists(os.path.join(path, candidate)):
                cfg_path = os.path.join(path, candidate)
                break
        else:
            raise ModelSpecError(f"model folder {path!r} has no config.json (nor transformer/config.json)")
    try:
        cfg = json.load(open(cfg_path))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelSpecError(f"cannot read model config {cfg_path!r}: {e}") from None
    name = cfg.get("_class_name")
    if not name:
        raise ModelSpecError(f"{cfg_path}: no '_class_name' (expected a diffusers model config.json)")
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ModelSpecError(f"{cfg_path}: class {name!r} is not in diffusers {diffusers.__version__}")
    model = _build(cls, cfg, dtype, device)
    inputs = derive_inputs(model, sizes, device, given)
    return LoadedModel(model, inputs, f"{name} from {cfg_path} ({device}, {_model_dtype(model)})")


def _load_class(spec: str, config: str | None, dtype: str | None, device: str, sizes: InputSizes,
                given: set) -> LoadedModel:
    mod_name, _, cls_name = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise ModelSpecError(f"cannot import {spec!r}: {e}") from None
    cfg: dict = {}
    if config:
        try:
            cfg = json.load(open(config)) if os.path.exists(config) else json.loads(config)
        except (OSError, json.JSONDecodeError) as e:
            raise ModelSpecError(f"--config {config!r}: not a JSON file or a JSON object ({e})") from None
    model = _build(cls, cfg, dtype, device)
    inputs = derive_inputs(model, sizes, device, given)
    return LoadedModel(model, inputs, f"{spec} ({device}, {_model_dtype(model)})")


def _build(cls: type, cfg: dict, dtype: str | None, device: str) -> nn.Module:
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    dt = _dtype(dtype) if dtype else (torch.bfloat16 if device == "meta" else torch.float32)
    try:
        with torch.device(device):
            if hasattr(cls, "from_config"):
                model = cls.from_config(cfg)
            else:
                model = cls(**cfg)
    except TypeError as e:
        raise ModelSpecError(f"cannot build {cls.__name__} from its config: {e}") from None
    nn.Module.to(model, dt)  # not ModelMixin.to, which warns about the float32 modules handled here
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    for name, module in model.named_modules():  # as from_pretrained(torch_dtype=...) leaves them
        if dt != torch.float32 and any(k in name.split(".") for k in keep):
            module.float()
    return model.eval()


def _model_dtype(model: nn.Module) -> torch.dtype:
    p = next(iter(model.parameters()), None)
    return p.dtype if p is not None else torch.float32


# ---- inputs from the forward signature and the config -----------------------------------------------

_TEXT_WIDTH_KEYS = ("joint_attention_dim", "text_dim", "text_embed_dim", "caption_channels", "cross_attention_dim",
                    "encoder_hidden_dim", "context_dim")


def derive_inputs(model: nn.Module, sizes: InputSizes, device: str, given: set = frozenset()) -> dict[str, Any]:
    """Inputs for `model(**inputs)` from its forward parameters and its config (see the module docstring).

    hidden_states: packed latent tokens [B, N, C] when the forward takes `img_ids` (2x2 patches packed into
    channels), else a latent image [B, C, h, w], or a latent video [B, C, f, h, w] when the config has a
    temporal patch size or frame count. Raises ModelSpecError naming any required input it cannot derive."""
    cfg = dict(getattr(model, "config", {}) or {})
    params = inspect.signature(model.forward).parameters
    dt = _model_dtype(model)
    b = sizes.batch
    h, w = sizes.height // sizes.vae_scale, sizes.width // sizes.vae_scale
    t_scale = int(cfg.get("temporal_compression_ratio") or sizes.vae_scale_t)
    f = (sizes.frames - 1) // t_scale + 1
    c = int(cfg.get("in_channels") or 4)
    video = bool(cfg.get("patch_size_t")) or "sample_frames" in cfg or isinstance(cfg.get("patch_size"), (list, tuple)) \
        and len(cfg["patch_size"]) == 3
    frames_first = "sample_frames" in cfg  # [B, F, C, H, W] (CogVideoX-style configs)
    text_width = next((int(cfg[k]) for k in _TEXT_WIDTH_KEYS if isinstance(cfg.get(k), int)), None)
    rope_axes = len(cfg.get("axes_dims_rope") or (16, 56, 56))
    packed_tokens = (h // 2) * (w // 2)

    def t(*shape: int, dtype: torch.dtype = dt) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=device)

    rules: dict[str, Any] = {}
    if "img_ids" in params:
        rules["hidden_states"] = lambda: t(b, packed_tokens, c)
    elif video and frames_first:
        rules["hidden_states"] = lambda: t(b, f, c, h, w)
    elif video:
        rules["hidden_states"] = lambda: t(b, c, f, h, w)
    else:
        rules["hidden_states"] = lambda: t(b, c, h, w)
    if text_width is not None:
        rules["encoder_hidden_states"] = lambda: t(b, sizes.text_len, text_width)
    if isinstance(cfg.get("pooled_projection_dim"), int):
        rules["pooled_projections"] = lambda: t(b, cfg["pooled_projection_dim"])
    rules["timestep"] = lambda: t(b)
    rules["img_ids"] = lambda: t(packed_tokens, rope_axes)
    rules["txt_ids"] = lambda: t(sizes.text_len, rope_axes)
    if cfg.get("guidance_embeds"):
        rules["guidance"] = lambda: t(b)
    rules["encoder_attention_mask"] = lambda: torch.ones(b, sizes.text_len, dtype=torch.int64, device=device)
    for name in ("original_size", "target_size", "crop_coords"):
        rules[name] = lambda: t(b, 2)
    rules["added_cond_kwargs"] = lambda: {"resolution": None, "aspect_ratio": None}
    rules["class_labels"] = lambda: torch.zeros(b, dtype=torch.int64, device=device)
    optional_wanted = {"encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids", "guidance",
                       "added_cond_kwargs"}
    if cfg.get("num_embeds_ada_norm"):  # a class-conditional DiT: its labels feed the adaptive norms
        optional_wanted.add("class_labels")

    inputs: dict[str, Any] = {}
    missing = []
    for name, p in params.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        required = p.default is inspect.Parameter.empty
        if name in rules and (required or name in optional_wanted):
            inputs[name] = rules[name]()
        elif required and name not in given:
            missing.append(name)
    if "return_dict" in params:
        inputs["return_dict"] = False
    if missing:
        raise ModelSpecError(
            f"cannot derive input(s) {missing} of {type(model).__name__}.forward from its config; give them with "
            f"--input NAME=DIM,DIM,...[:dtype] (e.g. --input {missing[0]}=1,16,64:bfloat16)")
    return inputs


def describe_inputs(inputs: dict[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            out[k] = f"[{', '.join(str(s) for s in v.shape)}] {str(v.dtype).replace('torch.', '')}"
        elif v is not None and not isinstance(v, dict):
            out[k] = repr(v)
    return out

