"""Memory layout of a rewritten op's output: the strides the op it replaces returns."""

from __future__ import annotations

import torch


def memory_order(x: torch.Tensor) -> tuple[int, ...]:
    """x's dims from the outermost in memory to the innermost (ties, size-1 dims: in dim order)."""
    return tuple(sorted(range(x.dim()), key=lambda d: (-x.stride(d), d)))


def in_memory_order(x: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """x with its values unchanged and its memory laid out in `order` (outermost dim first): what SDPA returns
    on the CPU and GPU is [B, L, H, D] in memory for a [B, H, L, D] result, so that `out.transpose(1, 2)` is
    contiguous and a `.view` after it works. A copy only when x is laid out otherwise."""
    if memory_order(x) == tuple(order):
        return x
    inverse = [0] * len(order)
    for i, d in enumerate(order):
        inverse[d] = i
    return x.permute(*order).contiguous().permute(*inverse)
