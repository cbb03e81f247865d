"""Parallel VAE decode: each rank decodes a contiguous block of latent rows; convolutions see their halo.

The latent is split along height (dim -2, for NCHW and NCTHW alike) into one block of rows per rank, and
`vae.decode` runs *unchanged* on the local block under a `TorchFunctionMode` that rewrites the few ops
whose result depends on rows another rank holds:

  conv2d / conv3d       H padding becomes a halo exchange with the neighbour ranks (zeros only at the
                        global top and bottom), then the conv runs with H padding 0
  F.pad along H         interior boundaries get the neighbour's rows; the pad mode applies at the
                        global top/bottom only (Wan's causal conv pads by hand, then convs with padding 0)
  group_norm            mean and variance over the full height (two small all-reduces)
  scaled_dot_product_attention
                        local queries attend to the keys/values of every rank (all-gathered); without a
                        mask or positional bias, attention does not care in which order keys arrive
  interpolate           nearest / nearest-exact by an integer factor along H is row-local

and refuses, with the op's name, what would silently be wrong on a block of rows: strided or "valid"
convs along H, transposed convs, other interpolation modes, softmax / matmul outside SDPA (hand-written
attention), reductions and layer/RMS norms over H, circular padding, attention masks. Finally the decoded
rows are gathered, so the caller gets what `vae.decode` returns for the whole latent.

Why this is safe without per-model code: every diffusers convolutional VAE decoder keeps its activations
as [..., H, W] with H at dim -2, and every op that mixes rows is one of the above; all other ops
(activations, 1x1 convs, channel norms, pixel shuffles, reshapes within a row block, temporal caches)
act on each row block as they act on the whole. The rule is implicit: *every* 4-D/5-D tensor that reaches
an intercepted op is taken to be sharded along dim -2; a tensor that reaches conv/group_norm unsharded
(none does in diffusers' decoders) would be treated as sharded too. Not detected (none occurs in
diffusers' decoders): slicing or concatenating along H by position, an interpolate `size=` fixed to a
global height, conv1d over flattened pixels.

Coverage (diffusers 0.42.1, tiny random configs, 2 ranks, max abs error vs one process <= 4e-6):
AutoencoderKL (Flux/SD3/PixArt), AutoencoderKLFlux2, AutoencoderKLWan, AutoencoderKLQwenImage,
AutoencoderKLCogVideoX, AutoencoderKLLTXVideo, AutoencoderKLMochi, AutoencoderKLTemporalDecoder,
AutoencoderTiny, AutoencoderDC with ResBlocks only. Refused with the op named: AutoencoderKLHunyuanVideo
(frame-causal attention mask; works with mid_block_add_attention=False), AutoencoderDC with
EfficientViT blocks (linear attention by matmul over the tokens). AutoencoderKLAllegro decodes only tiled.

Minimum rows: each rank needs at least one latent row, and at every resolution at least as many rows as
the largest H padding there (1 for the 3x3 convs of all diffusers VAEs; each upsampling multiplies rows).

Memory: a rank holds 1/N of every activation plus 2 * padding rows of halo per conv input, one centred
copy of the input inside group_norm, and (at attention) the full K/V of that one layer: peak activation
memory ~ 1/N of single-process decode.

Bytes moved (this rank's receives, counted (`xdit_fx.ops.comm`) under ops "vae_halo", "vae_norm_stats",
"vae_kv_gather", "vae_sizes", "vae_output"): per 3x3 conv, one row of its input from each neighbour; per group
norm, 2 x [B, groups] float64 sums; per attention, the other ranks' K and V and their two token counts; at the
end, the other ranks' rows.

Example:
    pipe.vae.decode = ParallelVAE(pipe.vae).decode     # every rank runs the pipeline; same images
    image = parallel_decode(vae, latents).sample       # or directly
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from xdit_fx.errors import PlanError, XditFxError
from xdit_fx.ops import comm
from xdit_fx.ops.comm import all_reduce_received

RETURN_ON = ("all", "rank0")


class UnsupportedVAEOp(XditFxError, RuntimeError):
    """An op inside the decoder that would give a wrong answer on a block of rows."""


# ---- the split ----------------------------------------------------------------------------------------

def split_rows(height: int, n: int) -> list[int]:
    """Rows per rank for a height split into n contiguous blocks: the first `height % n` ranks get one more."""
    if height < n:
        raise PlanError(f"parallel VAE decode: latent height {height} < {n} ranks; every rank needs at "
                        f"least one latent row: use at most {height} ranks.")
    return [height // n + (r < height % n) for r in range(n)]


@dataclass
class RowShard:
    """This rank's place in the row split: the group, its rank/size, and every rank's latent rows."""

    group: dist.ProcessGroup
    rank: int
    size: int
    rows: list[int]

    @property
    def name(self) -> str:
        return self.group.group_name

    def global_rank(self, r: int) -> int:
        return dist.get_global_rank(self.group, r)

    def rows_at(self, local_height: int) -> list[int]:
        """Every rank's rows of a tensor whose local height is `local_height`, scaled from the latent split
        (all ranks compute the same list, so a check on it fails on all ranks alike)."""
        scale = Fraction(local_height, self.rows[self.rank])
        rows = [r * scale for r in self.rows]
        if any(x.denominator != 1 for x in rows):
            raise UnsupportedVAEOp(f"parallel VAE decode: a tensor of local height {local_height} is not an "
                                   f"integer multiple of this rank's {self.rows[self.rank]} latent rows.")
        return [int(x) for x in rows]


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


# ---- communication ----------------------------------------------------------------------------------

def exchange_halo(x: torch.Tensor, top: int, bottom: int, shard: RowShard, op: str):
    """Rows of the neighbours around this rank's block: (the `top` rows above, the `bottom` rows below),
    None at the global edges. Each rank sends its first `bottom` rows up and its last `top` rows down."""
    fewest = min(shard.rows_at(x.shape[-2]))
    if max(top, bottom) > fewest:
        raise UnsupportedVAEOp(f"parallel VAE decode: {op} needs {max(top, bottom)} rows from a neighbour, "
                               f"but a rank holds only {fewest} rows at this resolution: use fewer ranks.")
    r, n, h = shard.rank, shard.size, x.shape[-2]
    above = x.new_empty(x.shape[:-2] + (top, x.shape[-1])) if r > 0 and top else None
    below = x.new_empty(x.shape[:-2] + (bottom, x.shape[-1])) if r < n - 1 and bottom else None
    ops = []
    if r > 0 and top:
        ops.append(dist.P2POp(dist.irecv, above, shard.global_rank(r - 1), shard.group))
    if r > 0 and bottom:
        ops.append(dist.P2POp(dist.isend, x.narrow(-2, 0, bottom).contiguous(), shard.global_rank(r - 1),
                              shard.group))
    if r < n - 1 and bottom:
        ops.append(dist.P2POp(dist.irecv, below, shard.global_rank(r + 1), shard.group))
    if r < n - 1 and top:
        ops.append(dist.P2POp(dist.isend, x.narrow(-2, h - top, top).contiguous(), shard.global_rank(r + 1),
                              shard.group))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    comm.record(shard.name, "vae_halo", _nbytes(above) + _nbytes(below))
    return above, below


def all_reduce_sum(x: torch.Tensor, shard: RowShard) -> torch.Tensor:
    """Sum of `x` over the ranks, in place (counted as a ring all-reduce receives: 2 (N-1)/N of it)."""
    x = x.contiguous()
    dist.all_reduce(x, group=shard.group)
    comm.record(shard.name, "vae_norm_stats", all_reduce_received(_nbytes(x), shard.size))
    return x


def gather_rows(x: torch.Tensor, lengths: list[int], shard: RowShard, op: str, to_rank0: bool = False):
    """Concatenate every rank's `x` along dim -2, rank r contributing `lengths[r]` rows (blocks are padded to
    the longest for the collective). With `to_rank0`, only rank 0 gets the result; the others get None."""
    longest = max(lengths)
    padded = F.pad(x, (0, 0, 0, longest - x.shape[-2])).contiguous()
    parts = [torch.empty_like(padded) for _ in range(shard.size)]
    if to_rank0:
        dst = shard.global_rank(0)
        dist.gather(padded, parts if shard.rank == 0 else None, dst=dst, group=shard.group)
        comm.record(shard.name, op, _nbytes(padded) * (shard.size - 1) if shard.rank == 0 else 0)
        if shard.rank != 0:
            return None
    else:
        dist.all_gather(parts, padded, group=shard.group)
        comm.record(shard.name, op, _nbytes(padded) * (shard.size - 1))
    return torch.cat([p.narrow(-2, 0, n) for p, n in zip(parts, lengths)], dim=-2)


# ---- the intercepted ops ------------------------------------------------------------------------------
# Each handler gets the mode (for the shard and the record of halo-padded tensors), the function, and
# the call's arguments bound by name through a signature-only function that mirrors torch's.

_HANDLERS: dict = {}


def _handles(*funcs):
    def register(handler):
        for f in funcs:
            _HANDLERS[f] = handler
        return handler
    return register


def _conv_signature(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return input, weight, bias, stride, padding, dilation, groups


def _pad_signature(input, pad, mode="constant", value=None):
    return input, pad, mode, value


def _sdpa_signature(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


def _interpolate_signature(input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                           recompute_scale_factor=None, antialias=False):
    return input, size, scale_factor, mode


def _group_norm_signature(input, num_groups, weight=None, bias=None, eps=1e-5):
    return input, num_groups, weight, bias, eps


def _per_dim(value, n: int) -> list:
    return list(value) if isinstance(value, (tuple, list)) else [value] * n


def _explicit_padding(padding, weight: torch.Tensor, dilation, op: str) -> list[int]:
    """A conv's `padding` argument (int, tuple, "same" or "valid") as one symmetric pad per spatial dim."""
    spatial = weight.ndim - 2
    if padding == "valid":
        return [0] * spatial
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(_per_dim(dilation, spatial), weight.shape[2:])]
        if any(t % 2 for t in totals):
            raise UnsupportedVAEOp(f"parallel VAE decode: {op} with padding='same' and an even kernel "
                                   f"{tuple(weight.shape[2:])} pads asymmetrically; not supported.")
        return [t // 2 for t in totals]
    return _per_dim(padding, spatial)


def _cat_rows(above: torch.Tensor | None, x: torch.Tensor, below: torch.Tensor | None) -> torch.Tensor:
    return torch.cat([t for t in (above, x, below) if t is not None], dim=-2)


@_handles(torch.conv2d, torch.conv3d)
def _conv(mode, func, args, kwargs):
    """A conv whose output rows are this rank's rows: stride 1 along H, and the H padding replaced by the
    neighbours' rows (zeros at the global top and bottom), so the conv itself runs with H padding 0.
    An input that F.pad already extended by halo rows (see `_pad`) needs no more."""
    x, weight, bias, stride, padding, dilation, groups = _conv_signature(*args, **kwargs)
    op = f"{func.__name__} (weight {tuple(weight.shape)})"
    pads = _explicit_padding(padding, weight, dilation, op)
    spatial = weight.ndim - 2
    kernel_h, pad_h = weight.shape[-2], pads[-2]
    stride_h, dilation_h = _per_dim(stride, spatial)[-2], _per_dim(dilation, spatial)[-2]
    pre_top, pre_bottom = mode.halo_padded.get(x, (0, 0))
    if kernel_h == 1 and stride_h == 1 and pad_h == 0:
        return mode.seen(func(*args, **kwargs))
    if stride_h != 1:
        raise UnsupportedVAEOp(f"parallel VAE decode: {op} has stride {stride_h} along H, which would mix rows "
                               f"across rank blocks; only stride 1 along H is supported.")
    if pad_h and (pre_top or pre_bottom):
        raise UnsupportedVAEOp(f"parallel VAE decode: {op} pads along H an input that F.pad already padded "
                               f"along H; not supported.")
    if 2 * pad_h + pre_top + pre_bottom != dilation_h * (kernel_h - 1):
        raise UnsupportedVAEOp(
            f"parallel VAE decode: {op} with kernel {kernel_h} along H and H padding "
            f"({pad_h + pre_top}, {pad_h + pre_bottom}) changes the height ('valid' conv), so the ranks' output "
            f"rows would not tile the image; only height-preserving convs are supported along H.")
    if pad_h:
        above, below = exchange_halo(x, pad_h, pad_h, mode.shard, op)
        zeros = x.new_zeros(x.shape[:-2] + (pad_h, x.shape[-1]))
        x = _cat_rows(zeros if above is None else above, x, zeros if below is None else below)
        pads[-2] = 0
    return mode.seen(func(x, weight, bias, stride, pads, dilation, groups))


@_handles(F.pad)
def _pad(mode, func, args, kwargs):
    """F.pad along H: interior block boundaries get the neighbours' rows, the global top/bottom get the pad
    mode's rows. The result is recorded as halo-padded for the conv that consumes it."""
    x, pad, pad_mode, value = _pad_signature(*args, **kwargs)
    if x.ndim not in (4, 5) or len(pad) < 4 or (pad[2] == 0 and pad[3] == 0):
        return func(*args, **kwargs)
    top, bottom = pad[2], pad[3]
    if top < 0 or bottom < 0 or pad_mode == "circular":
        raise UnsupportedVAEOp(f"parallel VAE decode: F.pad along H with pads ({top}, {bottom}) and mode "
                               f"{pad_mode!r}: cropping and circular padding need rows of far ranks.")
    above, below = exchange_halo(x, top, bottom, mode.shard, "F.pad")
    local = list(pad)
    local[2], local[3] = (top if above is None else 0), (bottom if below is None else 0)
    out = func(_cat_rows(above, x, below), local, pad_mode, value)
    mode.halo_padded[out] = (top, bottom)
    return out


@_handles(F.group_norm)
def _group_norm(mode, func, args, kwargs):
    """GroupNorm with mean and variance over the full height: a sum, then a centred sum of squares (two
    all-reduces of [B, groups] float64 numbers), as accurate as the single-process kernel. Holds one
    extra activation-sized tensor (the centred input) where the native kernel holds none."""
    x, num_groups, weight, bias, eps = _group_norm_signature(*args, **kwargs)
    mode.seen(x)
    grouped = x.float().reshape(x.shape[0], num_groups, -1)
    stats = torch.cat([grouped.sum(-1, dtype=torch.float64).flatten(),
                       grouped.new_tensor([grouped.shape[-1]], dtype=torch.float64)])
    stats = all_reduce_sum(stats, mode.shard)
    count = stats[-1]
    mean = (stats[:-1] / count).reshape(x.shape[0], num_groups, 1)
    centred = grouped - mean.float()
    var = all_reduce_sum(centred.square().sum(-1, dtype=torch.float64), mode.shard) / count
    out = centred.mul_(torch.rsqrt(var + eps).float().unsqueeze(-1)).reshape(x.shape)
    affine_shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    if weight is not None:
        out.mul_(weight.float().reshape(affine_shape))
    if bias is not None:
        out.add_(bias.float().reshape(affine_shape))
    return out.to(x.dtype)


@_handles(F.scaled_dot_product_attention)
def _attention(mode, func, args, kwargs):
    """Local queries over every rank's keys/values (all-gathered along the token dim -2).

    Only attention over the pixels of the activation last seen by a conv or norm (h x w tokens, as in the
    mid-block attention of every diffusers VAE) is spatial; attention over frames with pixels folded into
    the batch (temporal attention) is refused, on all ranks alike since the check runs on gathered sizes."""
    q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa = _sdpa_signature(*args, **kwargs)
    if attn_mask is not None or is_causal:
        raise UnsupportedVAEOp("parallel VAE decode: scaled_dot_product_attention with an attn_mask or "
                               "is_causal=True: the mask indexes local tokens, not the gathered keys.")
    shard = mode.shard
    sizes = torch.tensor([k.shape[-2], mode.last_pixels], dtype=torch.int64, device=k.device)
    parts = [torch.empty_like(sizes) for _ in range(shard.size)]
    dist.all_gather(parts, sizes, group=shard.group)
    comm.record(shard.name, "vae_sizes", _nbytes(sizes) * (shard.size - 1))
    if any(int(tokens) != int(pixels) for tokens, pixels in parts):
        raise UnsupportedVAEOp(
            f"parallel VAE decode: scaled_dot_product_attention over {k.shape[-2]} tokens, but the last "
            f"activation had {mode.last_pixels} pixels on this rank: its tokens are not this rank's pixels "
            f"(temporal attention?), so gathering keys by rows would be wrong.")
    kv = gather_rows(torch.cat([k, v], dim=-1), [int(p[0]) for p in parts], shard, "vae_kv_gather")
    k_all, v_all = kv.split([k.shape[-1], v.shape[-1]], dim=-1)
    return func(q, k_all, v_all, dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa)


@_handles(F.interpolate)
def _interpolate(mode, func, args, kwargs):
    """Nearest(-exact) upsampling by an integer factor along H maps each rank's rows to its output rows."""
    x, size, scale_factor, interp_mode = _interpolate_signature(*args, **kwargs)
    if x.ndim not in (4, 5):
        return func(*args, **kwargs)
    spatial = x.ndim - 2
    factor = (Fraction(_per_dim(size, spatial)[-2], x.shape[-2]) if size is not None
              else Fraction(_per_dim(scale_factor, spatial)[-2]))
    if interp_mode not in ("nearest", "nearest-exact") or factor.denominator != 1:
        raise UnsupportedVAEOp(f"parallel VAE decode: F.interpolate(mode={interp_mode!r}) by {float(factor)} "
                               f"along H reads rows across rank blocks; only nearest/nearest-exact by an "
                               f"integer factor is supported.")
    return func(*args, **kwargs)


def _refuse(reason: str):
    def handler(mode, func, args, kwargs):
        raise UnsupportedVAEOp(f"parallel VAE decode: {getattr(func, '__name__', func)} {reason}")
    return handler


_handles(torch.conv_transpose2d, torch.conv_transpose3d)(
    _refuse("(a transposed conv) is not supported: its output rows overlap across rank blocks."))
_handles(torch.softmax, torch.Tensor.softmax, F.softmax, torch.log_softmax, torch.Tensor.log_softmax,
         F.log_softmax, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm,
         torch.baddbmm, torch.Tensor.baddbmm, torch.einsum)(
    _refuse("outside scaled_dot_product_attention: hand-written attention over the tokens of one rank "
            "block would be wrong; use an SDPA attention processor (diffusers' AttnProcessor2_0)."))


def _reduction_signature(input, dim=None, *args, **kwargs):
    return input, dim


def _norm_signature(input, p="fro", dim=None, *args, **kwargs):
    return input, dim


def _reduces_height(x: torch.Tensor, dim) -> bool:
    """Whether a reduction over `dim` of an activation `x` (4-D/5-D, H at dim -2) runs over H."""
    if x.ndim not in (4, 5) or isinstance(x, torch.nn.Parameter):
        return False
    dims = range(x.ndim) if dim is None or dim == [] or dim == () else _per_dim(dim, 1)
    return any(d % x.ndim == x.ndim - 2 for d in dims)


_REDUCTIONS = [getattr(owner, name) for owner in (torch, torch.Tensor)
               for name in ("sum", "mean", "std", "var", "amax", "amin", "norm", "logsumexp", "nansum",
                            "nanmean", "std_mean", "var_mean")
               if hasattr(owner, name)]
_NORMS = (torch.norm, torch.Tensor.norm)


@_handles(*_REDUCTIONS)
def _reduction(mode, func, args, kwargs):
    """Reductions over H would see one rank block only: refused (over other dims they are local)."""
    x, dim = (_norm_signature if func in _NORMS else _reduction_signature)(*args, **kwargs)
    if isinstance(x, torch.Tensor) and _reduces_height(x, dim):
        raise UnsupportedVAEOp(f"parallel VAE decode: {func.__name__} over dim {dim} of a {x.ndim}-D "
                               f"activation reduces over the sharded height (dim -2).")
    return func(*args, **kwargs)


@_handles(F.layer_norm, F.rms_norm)
def _row_norm(mode, func, args, kwargs):
    """Layer/RMS norms over the trailing dims: local unless those include H."""
    x, shape = args[0], kwargs.get("normalized_shape", args[1] if len(args) > 1 else None)
    if x.ndim in (4, 5) and len(shape) >= 2:
        raise UnsupportedVAEOp(f"parallel VAE decode: {func.__name__} over shape {tuple(shape)} normalises "
                               f"over the sharded height (dim -2).")
    return func(*args, **kwargs)


class _ShardedRows(TorchFunctionMode):
    """Runs the handlers above for the ops they cover; everything else runs as is (row-local)."""

    def __init__(self, shard: RowShard):
        super().__init__()
        self.shard = shard
        self.halo_padded = WeakIdKeyDictionary()   # F.pad outputs -> (top, bottom) halo rows
        self.last_pixels = 0                       # h * w of the last conv output / group_norm input

    def seen(self, x: torch.Tensor) -> torch.Tensor:
        """Record the pixels per image of an activation (see `_attention`); return it."""
        if x.ndim in (4, 5):
            self.last_pixels = x.shape[-2] * x.shape[-1]
        return x

    def __torch_function__(self, func, types, args=(), kwargs=None):
        handler = _HANDLERS.get(func)
        if handler is None:
            return func(*args, **(kwargs or {}))
        return handler(self, func, args, kwargs or {})


# ---- entry points ---------------------------------------------------------------------------------------

def _check_vae(vae) -> None:
    if getattr(vae, "use_tiling", False):
        raise PlanError("parallel VAE decode: the VAE has tiling enabled; tiles would be blended within each "
                        "rank's rows only. Call vae.disable_tiling(): the row split replaces tiling.")


def _gather_output(value, shard: RowShard, to_rank0: bool):
    """The decoded rows of every rank, for each 4-D/5-D tensor of a decode output (tuple or BaseOutput)."""
    if isinstance(value, torch.Tensor):
        if value.ndim not in (4, 5):
            return value
        return gather_rows(value, shard.rows_at(value.shape[-2]), shard, "vae_output", to_rank0)
    if isinstance(value, tuple):
        return type(value)(_gather_output(v, shard, to_rank0) for v in value)
    if isinstance(value, dict):   # diffusers' DecoderOutput is a dataclass over an OrderedDict
        return type(value)(**{k: _gather_output(v, shard, to_rank0) for k, v in value.items()})
    return value


def parallel_decode(vae, latents: torch.Tensor, group: dist.ProcessGroup | None = None, *,
                    return_on: str = "all", **decode_kwargs):
    """`vae.decode(latents, **decode_kwargs)`, with the latent rows split over the ranks of `group`.

    Every rank of `group` must call it with the same full `latents` ([B, C, H, W] or [B, C, T, H, W]).
    Returns what `vae.decode` returns, holding the whole decoded sample on every rank
    (`return_on="all"`) or on rank 0 only (`return_on="rank0"`: the other ranks get None in its place,
    and the gather moves the image to one rank instead of all).

    Example:
        image = parallel_decode(vae, latents, return_dict=False)[0]
    """
    if return_on not in RETURN_ON:
        raise PlanError(f"parallel VAE decode: return_on={return_on!r}; use one of {RETURN_ON}.")
    _check_vae(vae)
    group = group or dist.group.WORLD
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    shard = RowShard(group, rank, size, split_rows(latents.shape[-2], size))
    start = sum(shard.rows[:rank])
    local = latents.narrow(-2, start, shard.rows[rank])
    decode = type(vae).decode.__get__(vae)   # the class's decode, even where ParallelVAE replaced vae.decode
    with _ShardedRows(shard):
        out = decode(local, **decode_kwargs)
    return _gather_output(out, shard, to_rank0=return_on == "rank0")


class ParallelVAE:
    """A `decode` with `vae.decode`'s signature that decodes in parallel over `group`.

    Install it on a pipeline's VAE (stock pipelines call `self.vae.decode(latents, return_dict=False)[0]`);
    the VAE itself, with its config and dtype, stays as it is:

    Example:
        pipe.vae.decode = ParallelVAE(pipe.vae).decode
    """

    def __init__(self, vae, group: dist.ProcessGroup | None = None, return_on: str = "all"):
        _check_vae(vae)
        self.vae, self.group, self.return_on = vae, group, return_on

    def decode(self, z: torch.Tensor, *args, **kwargs):
        bound = inspect.signature(type(self.vae).decode).bind(self.vae, z, *args, **kwargs).arguments
        decode_kwargs = dict(list(bound.items())[2:])   # all but self and the latent, by name
        return parallel_decode(self.vae, z, self.group, return_on=self.return_on, **decode_kwargs)
