"""Single-process references written independently of the code under test.

They use only the plain model and PyTorch's hooks, so a test that compares a parallel run with them checks
the semantics, not the implementation against itself:

* `pipefusion_reference`: what PipeFusion with stale K/V computes, by definition. At every self-attention
  site a full-sequence K/V buffer is kept; a warm-up call runs whole and fills it; a later call runs patch
  by patch in order, each patch writing its own fresh K/V into the buffer and attending over all of it
  (earlier patches of this call fresh, later ones from the previous call).
* `fbc_reference`: First-Block-Cache by definition, from forward hooks on the model's block list: the first
  block's residual is compared (relative L1) with the one of the last call that ran the stack; below the
  threshold, the other blocks are replaced by their cached residual (stack output minus stack input).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

#: F.scaled_dot_product_attention's parameters in order (a builtin: inspect cannot read them)
_SDPA_ARGS = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]


def _sdpa_args(args, kwargs) -> dict:
    bound = dict(zip(_SDPA_ARGS, args))
    bound.update(kwargs or {})
    return bound


def patch_positions(segments: tuple[int, ...], patches: int, p: int, uneven: str = "whole") -> torch.Tensor:
    """Token positions of patch p: chunk p of every segment of the attention sequence. A segment that does
    not split into `patches` equal chunks is, with uneven="whole", computed whole by every patch (a short
    text, a register token; as long as another segment splits), with uneven="pad" split into chunks of
    ceil(length / patches), the last ones shorter (PipeFusion's documented rules). A one-token segment (a
    time or register token) is never split: every patch computes it."""
    if uneven == "whole" and all(length % patches for length in segments):
        raise ValueError(f"reference: no segment of {segments} splits into {patches} patches")
    out, off = [], 0
    for length in segments:
        if length % patches and (uneven == "whole" or length == 1):
            out.extend(range(off, off + length))
        else:
            c = -(-length // patches)
            out.extend(range(off + min(p * c, length), off + min((p + 1) * c, length)))
        off += length
    return torch.tensor(out)


def _site_segments(segments: tuple[int, ...], length: int) -> tuple[int, ...]:
    """The segments of an attention sequence of `length` tokens: all of them (joint attention), or the one
    segment of that length (an image-only self-attention beside the joint one, as in SD3.5's dual blocks)."""
    if sum(segments) == length:
        return segments
    if length in segments:
        return (length,)
    raise ValueError(f"reference: an attention over {length} tokens is none of the segments {segments}")


class _StaleAttention(TorchFunctionMode):
    """Replaces every self-attention SDPA call by attention over a per-site K/V buffer (see the module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.mode = "fill"
        self.segments: tuple[int, ...] = ()
        self.patches, self.patch, self.uneven = 1, 0, "whole"
        self.assembled: dict[int, torch.Tensor] = {}
        self.site = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        a = _sdpa_args(args, kwargs)
        q, k, v = a.pop("query"), a.pop("key"), a.pop("value")
        site, self.site = self.site, self.site + 1
        if k.shape[-2] != q.shape[-2]:  # cross-attention to keys every patch holds whole
            return func(q, k, v, **a)
        if self.mode == "fill":
            self.k[site], self.v[site] = k.clone(), v.clone()
            return func(q, k, v, **a)
        if self.mode == "assemble":
            return self.assembled[site]
        rows = patch_positions(_site_segments(self.segments, q.shape[-2]), self.patches, self.patch, self.uneven)
        self.k[site][..., rows, :] = k[..., rows, :]
        self.v[site][..., rows, :] = v[..., rows, :]
        out = func(q, self.k[site], self.v[site], **a)
        acc = self.assembled.setdefault(site, torch.zeros_like(out))
        acc[..., rows, :] = out[..., rows, :]
        return out


class StaleKVReference:
    """Call it like the model: one call of one slot of PipeFusion with `patches` patches and `warmup` warm-up
    calls (a two-call CFG pipeline has one instance per branch, as PipeFusion keeps buffers per slot).

    A patch's rows of every attention output depend only on that patch's tokens and on the buffer, when
    everything outside attention is token-wise (the block stack of a DiT): so patch p is computed by a
    whole forward whose attention uses the buffer, and only its rows are kept; a last forward whose
    attention returns the assembled rows gives every token its value."""

    def __init__(self, forward, segments: tuple[int, ...], patches: int, warmup: int = 1,
                 uneven: str = "whole") -> None:
        self.forward, self.segments, self.patches, self.warmup = forward, segments, patches, warmup
        self.uneven = uneven
        self.mode = _StaleAttention()
        self.calls = 0

    def __call__(self, *args, **kwargs):
        mode = self.mode
        with torch.no_grad(), mode:
            self.calls += 1
            if self.calls <= self.warmup:
                mode.mode, mode.site = "fill", 0
                return self.forward(*args, **kwargs)
            mode.assembled = {}
            mode.segments, mode.patches, mode.uneven = self.segments, self.patches, self.uneven
            for p in range(self.patches):  # in order: a whole segment's rows come from the last patch
                mode.mode, mode.site, mode.patch = "patch", 0, p
                self.forward(*args, **kwargs)
            mode.mode, mode.site = "assemble", 0
            return self.forward(*args, **kwargs)


def pipefusion_reference(model, calls: list[dict], segments: tuple[int, ...], patches: int,
                         warmup: int = 1, uneven: str = "whole") -> list:
    """The outputs PipeFusion with `patches` patches and `warmup` warm-up calls gives for `calls` (one slot)."""
    ref = StaleKVReference(model, segments, patches, warmup, uneven)
    return [ref(**inputs) for inputs in calls]


def _rel_l1(new: torch.Tensor, old: torch.Tensor) -> float:
    return ((new - old).abs().sum(dtype=torch.float64) / old.abs().sum(dtype=torch.float64)).item()


def fbc_reference(model, blocks, calls: list[dict], threshold: float, warmup: int = 1) -> tuple[list, list[bool], list]:
    """First-Block-Cache over `calls` of `model`, whose block stack is the module list `blocks` (each block
    takes the token stream as its first argument and returns it). Returns (outputs, ran the full stack per
    call, metric per call or None)."""
    first, second, last = blocks[0], blocks[1], blocks[-1]
    state: dict = {"prev": None, "residual": None}
    seen: dict = {}
    full, metrics, outs = [], [], []

    def first_in(_, args):
        seen["x0"] = args[0]

    def first_out(_, args, out):
        seen["r0"] = out - seen["x0"]

    def stack_in(_, args):  # when skipping, the blocks after the first still run: their result is replaced
        seen["x1"] = args[0]

    def stack_out(_, args, out):
        if seen["skip"]:
            return seen["x1"] + state["residual"]
        state["residual"] = out - seen["x1"]
        return None

    hooks = [first.register_forward_pre_hook(first_in), first.register_forward_hook(first_out),
             second.register_forward_pre_hook(stack_in), last.register_forward_hook(stack_out)]

    try:
        with torch.no_grad():
            for t, inputs in enumerate(calls):
                # the decision needs the first block's residual of this call before the stack runs: run the
                # model once to see it (the stack's result is thrown away), then again with the decision
                seen["skip"] = False
                saved = state["residual"]
                model(**inputs)
                state["residual"] = saved
                r0 = seen["r0"]
                metric = None if t < warmup or state["prev"] is None else _rel_l1(r0, state["prev"])
                skip = metric is not None and threshold > 0 and metric < threshold
                seen["skip"] = skip
                outs.append(model(**inputs))
                if not skip:
                    state["prev"] = r0
                full.append(not skip)
                metrics.append(metric)
    finally:
        for h in hooks:
            h.remove()
    return outs, full, metrics
