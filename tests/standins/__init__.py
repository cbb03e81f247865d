"""CPU stand-ins for attention libraries that DiT code calls (flash-attn, xformers), for tests only.

They expose the libraries' Python API under the real names (`flash_attn.flash_attn_func`,
`xformers.ops.memory_efficient_attention`, `xformers.ops.fmha.attn_bias.BlockDiagonalMask`, ...) and, like
flash-attn >= 2.6, register the forward kernels as torch.library custom ops under the real op names
(`torch.ops.flash_attn._flash_attn_forward`, `torch.ops.flash_attn._flash_attn_varlen_forward`), so that dynamo
captures what it captures on a GPU. The kernels are plain softmax math in fp32 on the CPU.

`install()` puts this folder first on sys.path (call it in every process, spawned workers included)."""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def install() -> None:
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    for name in ("flash_attn", "xformers"):
        mod = sys.modules.get(name)
        if mod is not None and not getattr(mod, "XDIT_FX_STANDIN", False):
            raise RuntimeError(f"a real {name} is already imported; the CPU stand-in would not replace it")
    import flash_attn  # noqa: F401  (registers the custom ops)
    import xformers.ops  # noqa: F401


def reference_attention(q, k, v, scale, allowed=None, bias=None):
    """softmax(q k^T * scale + bias, masked by `allowed`) v on [..., L, D] in fp64 (a row with no key -> 0)."""
    import torch

    s = (q.double() @ k.double().transpose(-2, -1)) * scale
    if bias is not None:
        s = s + bias.double()
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p @ v.double()).to(q.dtype)
