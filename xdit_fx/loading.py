"""Load a pipeline for this rank: a diffusers pipeline folder (or the embedded digits model), on this rank's
device, in the asked dtype, with loading messages on rank 0 only.

Used by ``xdit-fx generate``, ``xdit-fx serve`` and scripts::

    pipe = xdit_fx.load_pipeline("/models/FLUX.1-dev", dtype="bf16")   # on cuda:LOCAL_RANK, or cpu
    pipe = xdit_fx.parallelize(pipe, "cfg=2,ulysses=2")

Every rank loads the whole pipeline; ``parallelize`` then decides what each rank computes. Placement comes
first: under NCCL each rank must hold its pipeline on its own GPU before ``parallelize`` wraps its modules.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from xdit_fx.errors import MissingBackend, PlanError, XditFxError

#: the embedded trained model (xdit_fx/digits), loaded by this name
DIGITS = "digits"

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}

#: optional packages a pipeline folder may need; the first three come with the extra
_EXTRA = "pip install 'xdit_fx[pipelines]'"
_IN_EXTRA = ("transformers", "accelerate", "tokenizers")
_OPTIONAL = _IN_EXTRA + ("sentencepiece", "ftfy", "protobuf")


class LoadError(XditFxError):
    """A pipeline folder that could not be loaded (the message names the folder and the cause)."""


def local_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def env_rank() -> int:
    """This process's global rank as the launcher set it (0 outside a launch)."""
    return int(os.environ.get("RANK", "0"))


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str | None = None) -> torch.dtype | None:
    """``"fp32"``/``"fp16"``/``"bf16"`` (or the torch names), a torch.dtype, ``"auto"`` (bf16 on CUDA, fp32
    elsewhere) or None (whatever ``from_pretrained`` does: fp32)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key == "auto":
        return torch.bfloat16 if torch.device(device or local_device()).type == "cuda" else torch.float32
    if key not in DTYPES:
        raise PlanError(f"dtype {dtype!r}: use one of fp32, fp16, bf16 or auto.")
    return DTYPES[key]


def quiet_other_ranks(rank: int | None = None) -> None:
    """On ranks other than 0: diffusers' and transformers' loading messages and progress bars off, and
    xdit_fx's own warnings (logging and ``warnings``) muted, so each prints once, on rank 0."""
    rank = env_rank() if rank is None else rank
    if rank == 0:
        return
    for name in ("diffusers", "transformers"):
        # rank 0 prints the library's messages, errors included; the rank's own exception still surfaces
        os.environ[f"{name.upper()}_VERBOSITY"] = "critical"  # read when the library is first imported
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            module = importlib.import_module(f"{name}.utils.logging")
            module.set_verbosity(logging.CRITICAL)
            module.disable_progress_bar()
    logging.getLogger("xdit_fx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"xdit_fx(\.|$)")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@contextlib.contextmanager
def quiet_libraries():
    """diffusers' and transformers' messages off inside the block (the launcher's own look at a pipeline
    class, so that rank 0 is the only one to print them)."""
    modules = []
    for name in ("diffusers", "transformers"):
        if importlib.util.find_spec(name) is not None:
            module = importlib.import_module(f"{name}.utils.logging")
            modules.append((module, module.get_verbosity()))
            module.set_verbosity_error()
    try:
        yield
    finally:
        for module, level in modules:
            module.set_verbosity(level)


def resolve_model(model: str | os.PathLike, cache_dir: str | None = None) -> str:
    """A local folder (or ``"digits"``) as it is; a hub id (``org/name``) resolved to its snapshot folder, from
    ``cache_dir``'s hub cache or fetched into it. Call it once, before launching ranks, so that they do not all
    fetch. PlanError (one line) when it is neither."""
    model = str(model)
    if model == DIGITS or Path(model).exists():
        return model
    parts = model.split("/")
    if len(parts) != 2 or not all(parts) or model.startswith((".", "~")):
        pipeline_index(model)  # raises: not a pipeline folder
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, cache_dir=cache_dir)
    except Exception as e:  # offline, unknown id, gated repo, ...
        raise PlanError(f"--model {model!r}: not a local folder, and fetching it from the hub failed "
                        f"({type(e).__name__}: {first_line(e)[:200]}). Pass a local pipeline folder.") from None


def pipeline_index(model: str | os.PathLike) -> dict[str, Any]:
    """model_index.json of a local pipeline folder; PlanError (one line, what to pass) if there is none."""
    path = Path(model)
    index = path / "model_index.json"
    if not index.is_file():
        hint = " (that is a component folder; pass its parent)" if (path / "config.json").is_file() else ""
        raise PlanError(f"--model {str(model)!r}: not a diffusers pipeline folder (no model_index.json there){hint}. "
                        f"Pass a folder saved with save_pretrained, or '{DIGITS}'.")
    try:
        return json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise LoadError(f"{index}: unreadable ({e}).") from None


def components(index: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """name -> (library, class name) of the components model_index.json lists (None entries skipped)."""
    out = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, (list, tuple)) or len(value) != 2 or None in value:
            continue
        out[name] = (str(value[0]), str(value[1]))
    return out


def check_packages(model: str | os.PathLike, index: dict[str, Any], from_pretrained_kwargs: dict[str, Any]) -> None:
    """Before loading: every library a component comes from is importable, and diffusers components that keep
    modules in float32 (which diffusers loads only through accelerate) find accelerate. MissingBackend
    naming the package and the extra otherwise."""
    for name, (library, cls_name) in components(index).items():
        top = library.split(".")[0]
        if top in _OPTIONAL and importlib.util.find_spec(top) is None:
            how = _EXTRA if top in _IN_EXTRA else f"pip install {top}"
            raise MissingBackend(f"{model}: component '{name}' ({library}.{cls_name}) needs the '{top}' package: "
                                 f"{how}.")
    if "low_cpu_mem_usage" in from_pretrained_kwargs or importlib.util.find_spec("accelerate") is not None:
        return
    import diffusers

    for name, (library, cls_name) in components(index).items():
        cls = getattr(diffusers, cls_name, None) if library == "diffusers" else None
        if getattr(cls, "_keep_in_fp32_modules", None):
            raise MissingBackend(f"{model}: component '{name}' ({cls_name}) keeps modules in float32, which diffusers "
                                 f"loads only with the 'accelerate' package: {_EXTRA}.")


def load_pipeline(model: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
                  device: str | torch.device | None = None, **from_pretrained_kwargs: Any):
    """Load a pipeline onto this rank's device.

    Args:
        model: a local diffusers pipeline folder (``model_index.json`` inside), a hub id (see
            `resolve_model`), or ``"digits"``.
        dtype: ``"fp32"``, ``"fp16"``, ``"bf16"``, ``"auto"`` (bf16 on CUDA, fp32 on CPU), a torch.dtype, or
            None (``from_pretrained``'s default, fp32). Modules a model keeps in float32 stay there.
        device: default ``local_device()``: ``cuda:LOCAL_RANK`` under a launcher on a CUDA machine, else cpu.
        **from_pretrained_kwargs: passed to ``DiffusionPipeline.from_pretrained`` (``variant``,
            ``cache_dir``, ``trust_remote_code``, ``low_cpu_mem_usage``, ...).

    Raises:
        PlanError: not a pipeline folder, or an unknown dtype.
        MissingBackend: a package the folder's components need is not installed (names the extra).
        LoadError: diffusers could not load it (the cause on one line).
    """
    quiet_other_ranks()
    device = torch.device(device) if device is not None else local_device()
    torch_dtype = resolve_dtype(dtype, device)
    if str(model) == DIGITS:
        from xdit_fx.digits import load_pipeline as load_digits

        pipe = load_digits(torch_dtype=torch_dtype or torch.float32)
    else:
        model = resolve_model(model, from_pretrained_kwargs.get("cache_dir"))
        index = pipeline_index(model)
        check_packages(model, index, from_pretrained_kwargs)
        from diffusers import DiffusionPipeline

        kwargs = dict(from_pretrained_kwargs)
        if torch_dtype is not None and "torch_dtype" not in kwargs:
            kwargs.setdefault("dtype", torch_dtype)
        try:
            pipe = DiffusionPipeline.from_pretrained(str(model), **kwargs)
        except ImportError as e:
            missing = getattr(e, "name", None) or str(e)
            raise MissingBackend(f"loading {str(model)!r}: {first_line(e)}; {_EXTRA} (missing: {missing}).") from None
        except (OSError, ValueError, TypeError, KeyError, RuntimeError, AttributeError) as e:
            raise LoadError(f"loading {str(model)!r} failed: {type(e).__name__}: {first_line(e)}") from None
    pipe.to(device)
    if env_rank() != 0 and hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def first_line(exc: BaseException) -> str:
    """An exception's message, on one line."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
