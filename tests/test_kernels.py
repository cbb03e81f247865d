"""Attention kernel choice (xdit_fx.attention_backend): asked-for backends run, missing ones say so.

On this CPU-only machine: "flash" (SDPA's CPU flash kernel) and "math" give the "auto" output (measured max abs
difference 2.4e-7 on these shapes; tolerance 1e-5) and really run the kernel asked for (seen in the ops
dispatched); the CUDA-only backends and flash-attn (not installed here) raise MissingBackend naming what to do,
both for local attention and for ring chunks (which need the log-sum-exp)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import xdit_fx
from xdit_fx.ops.collectives import attention_with_lse, attention_with_lse_reference
from xdit_fx.ops.kernels import current_backend, local_attention

ATOL = 1e-5


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _qkv(kv_heads=4):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 4, 10, 16, generator=g), torch.randn(1, kv_heads, 12, 16, generator=g),
            torch.randn(1, kv_heads, 12, 16, generator=g))


@pytest.mark.parametrize("name", ["flash", "math"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_cpu_backends_run_as_asked_and_match_auto(name, kv_heads):
    q, k, v = _qkv(kv_heads)
    mask = torch.rand(1, 1, 1, 12, generator=torch.Generator().manual_seed(1)) > 0.3
    auto = local_attention(q, k, v, mask, None)
    with xdit_fx.attention_backend(name):
        assert current_backend() == name
        with Ops() as seen:
            out = local_attention(q, k, v, mask, None)
    assert current_backend() == "auto"
    assert (out - auto).abs().max().item() <= ATOL
    flash = "_scaled_dot_product_flash_attention_for_cpu" in seen.names
    assert flash == (name == "flash"), seen.names


def test_ring_chunk_backends_on_cpu():
    q, k, v = _qkv()
    bias = torch.zeros(1, 1, 1, 12).masked_fill(torch.arange(12) >= 9, float("-inf"))
    ref_out, ref_lse = attention_with_lse_reference(q, k, v, bias, 0.25)
    for name in ("auto", "flash", "math"):
        with xdit_fx.attention_backend(name), Ops() as seen:
            out, lse = attention_with_lse(q, k, v, bias, 0.25)
        assert (out - ref_out).abs().max().item() <= ATOL and (lse - ref_lse).abs().max().item() <= ATOL, name
        assert ("_scaled_dot_product_flash_attention_for_cpu" in seen.names) == (name != "math"), name


@pytest.mark.parametrize("name", ["efficient", "cudnn", "flash_attn"])
def test_missing_backends_raise_with_what_to_do(name):
    q, k, v = _qkv()
    if name == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(xdit_fx.MissingBackend, match="pip install flash-attn"):
            with xdit_fx.attention_backend(name):
                pass
        return
    with xdit_fx.attention_backend(name):
        with pytest.raises(xdit_fx.MissingBackend, match="CUDA only.*use 'auto', 'flash'"):
            local_attention(q, k, v, None, None)
        with pytest.raises(xdit_fx.MissingBackend, match="CUDA only"):
            attention_with_lse(q, k, v, None, 0.25)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="not one of auto, math, flash, efficient, cudnn, flash_attn"):
        with xdit_fx.attention_backend("xformers"):
            pass
