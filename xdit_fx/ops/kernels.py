"""Which kernel computes attention: local attention (`sp_attention` without ring, `pf_attention`) and the ring
chunks, which also need the log-sum-exp.

``auto`` (the default) lets torch's SDPA dispatcher pick for local attention and, for ring chunks, takes the
fused kernel with a log-sum-exp that fits (CPU: the CPU flash kernel; CUDA: FlashAttention-2 without a mask,
else the memory-efficient kernel; the reference in plain ops where neither applies). A backend can be asked
for by name for the calls made inside a block:

    with xdit_fx.attention_backend("cudnn"):
        out = pm(**inputs)

``math``, ``flash``, ``efficient`` and ``cudnn`` are SDPA's backends (``flash`` on a CPU is its CPU flash
kernel; ``efficient`` and ``cudnn`` exist on CUDA only); ``flash_attn`` is the flash-attn package, imported
when asked for. A backend that is not installed, or that has no kernel for the tensors' device, raises
`MissingBackend` with what to install or choose instead; nothing falls back silently. The choice lives in a
context variable of the calling context (not process-wide state). Under ``Plan(compile=True)`` it is read
when a graph is compiled, so set it around the first call.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator

import torch
import torch.nn.functional as F

from xdit_fx.errors import MissingBackend

#: SDPA's backends by the names used here
SDPA_BACKENDS = {"math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "cudnn": "CUDNN_ATTENTION"}
BACKENDS = ("auto", *SDPA_BACKENDS, "flash_attn")
_CUDA_ONLY = ("efficient", "cudnn", "flash_attn")

_CHOICE: ContextVar[str] = ContextVar("xdit_fx_attention_backend", default="auto")


def current_backend() -> str:
    """The backend asked for in this context ("auto" when none was)."""
    return _CHOICE.get()


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[str]:
    """Use the attention backend `name` (one of BACKENDS) for the attention calls made inside the block. A package
    that is not installed is reported here, before anything runs."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {', '.join(BACKENDS)}.")
    if name == "flash_attn":
        flash_attn_functions()
    token = _CHOICE.set(name)
    try:
        yield name
    finally:
        _CHOICE.reset(token)


def flash_attn_functions():
    """flash-attn's (flash_attn_func) imported now; MissingBackend when the package is not installed."""
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:
        raise MissingBackend(
            "attention backend 'flash_attn' was asked for, but the flash-attn package is not installed "
            f"({type(e).__name__}: {e}). Install it on a CUDA machine (`pip install flash-attn`, a source build "
            "that needs nvcc), or use 'auto' or one of SDPA's backends: flash, efficient, cudnn, math.") from e
    return flash_attn_func


def check_device(name: str, device: torch.device) -> None:
    """MissingBackend when backend `name` has no kernel for tensors on `device`."""
    if name in _CUDA_ONLY and device.type != "cuda":
        raise MissingBackend(
            f"attention backend {name!r} has kernels for CUDA only; these tensors are on {device}. "
            f"On {device.type}, use 'auto', 'flash' (SDPA's flash kernel for the CPU) or 'math'.")


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float | None) -> torch.Tensor:
    """SDPA (or flash-attn) on local [B, H, L, D] tensors, with the backend of this context. K/V with fewer
    heads than Q (grouped-query attention) go in as they are."""
    name = _CHOICE.get()
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    if name == "auto":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa)
    check_device(name, q.device)
    if name == "flash_attn":
        if mask is not None:
            raise MissingBackend("attention backend 'flash_attn' takes no attention mask, and this attention has "
                                 "one; use 'auto' or one of SDPA's backends for it.")
        out = flash_attn_functions()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
        return out.transpose(1, 2)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[name])):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa)


def additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask as the additive float mask the fused kernels with a log-sum-exp take (same shape)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def chunk_attention_with_lse(q, k, v, bias, scale):
    """(out, lse [B, H, Lq]) of one ring chunk with the backend asked for in this context, or None for "auto"
    (the caller's own choice) and "math" (the reference in plain ops)."""
    name = _CHOICE.get()
    if name in ("auto", "math"):
        return None
    check_device(name, q.device)
    if q.device.type == "cpu":  # only "flash" passes check_device on a CPU
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias,
                                                                         scale=scale)
    if bias is not None and name in ("flash_attn", "flash"):
        raise MissingBackend(f"attention backend {name!r} takes no attention mask, and this ring chunk has one "
                             "(padding or the model's mask); use 'auto', 'efficient' or 'cudnn'.")
    if name == "flash_attn":
        out, lse, _ = flash_attn_functions()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             softmax_scale=scale, return_attn_probs=True)
        return out.transpose(1, 2), lse
    if name == "flash":
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
        return res[0], res[1]
    if name == "cudnn":
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, bias, True, 0.0, False, False, scale=scale)
        return res[0], res[1].reshape(q.shape[:-1])
    return efficient_with_lse(q, k, v, bias, scale)


def efficient_with_lse(q, k, v, bias, scale):
    """CUDA's memory-efficient kernel with its log-sum-exp (fp32 too, with an additive bias; its lse is padded
    to a multiple of 32 rows). A boolean mask becomes additive; the bias rows are padded to 16-byte alignment."""
    lq = q.shape[-2]
    b = None
    if bias is not None:
        b = additive(bias, q.dtype).to(q.dtype)
        pad = (-b.shape[-1]) % 8  # the kernel wants bias rows 16-byte aligned: pad, then view the keys
        if pad:
            b = F.pad(b, (0, pad))[..., :k.shape[-2]]
        b = b.expand(q.shape[0], q.shape[1], lq, k.shape[-2])
    res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, b, True, 0.0, False, scale=scale)
    return res[0], res[1][..., :lq]
