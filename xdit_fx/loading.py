"""Loading a diffusers pipeline folder onto this process's device."""

from __future__ import annotations

import os
from typing import Any

import torch


def local_device() -> torch.device:
    """This process's device: cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def load_pipeline(model: str, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                  **from_pretrained_kwargs: Any):
    """``DiffusionPipeline.from_pretrained(model)`` moved to `device` (default: `local_device()`) and `dtype`."""
    from diffusers import DiffusionPipeline

    if dtype is not None:
        from_pretrained_kwargs.setdefault("torch_dtype", dtype)
    pipe = DiffusionPipeline.from_pretrained(model, **from_pretrained_kwargs)
    return pipe.to(device if device is not None else local_device())
