"""Collectives that rewritten graphs call: torch.library custom ops with fake implementations.

Being custom ops, they trace cleanly into torch.compile graphs (Inductor sees an opaque op with known
output shape) and their Python bodies always run, so every byte they move is counted (`xdit_fx.ops.comm`).
Groups are passed by their c10d group name (a string), as torch's functional collectives do.

Byte accounting: each op adds the bytes *this rank receives from other ranks*.
  all_to_all over N ranks: (N-1)/N of the local tensor; all_gather: (N-1) local tensors;
  all_reduce: 2 (N-1)/N of the tensor (`all_reduce_received`: a ring all-reduce's reduce-scatter and
  all-gather); ring attention: the K and V chunks received at each of the N-1 steps.
The tests count the same at the torch.distributed primitives and check that both agree.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from xdit_fx.ops import comm
from xdit_fx.ops.comm import all_reduce_received
from xdit_fx.ops.kernels import chunk_attention_with_lse, current_backend, efficient_with_lse




def _group(name: str):
    return _resolve_process_group(name)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---- all_to_all --------------------------------------------------------------------------------------

@torch.library.custom_op("xdit_fx::all_to_all", mutates_args=())
def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: str) -> torch.Tensor:
    """Split `x` into N chunks along `scatter_dim`, send chunk i to rank i, concatenate what arrives
    along `gather_dim` (in rank order)."""
    pg = _group(group)
    n = dist.get_world_size(pg)
    if n == 1:
        return x.clone()
    # [..., S, ...] -> [n, ..., S/n, ...]: chunk i (for rank i) contiguous at the front, in one copy
    send = x.unflatten(scatter_dim, (n, -1)).movedim(scatter_dim, 0).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=pg)
    comm.record(group, "all_to_all", _nbytes(send) * (n - 1) // n)
    # [n, ..., G, ...] -> [..., n*G, ...] with rank-major order, in one copy
    return recv.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1).contiguous()


@all_to_all.register_fake
def _(x, scatter_dim, gather_dim, group):
    n = dist.get_world_size(_group(group))
    shape = list(x.shape)
    shape[scatter_dim] //= n
    shape[gather_dim] *= n
    return x.new_empty(shape)


# ---- shard / gather along one dim ------------------------------------------------------------------

@torch.library.custom_op("xdit_fx::shard", mutates_args=())
def shard(x: torch.Tensor, dim: int, padded_len: int, group: str) -> torch.Tensor:
    """This rank's contiguous chunk of `x` along `dim` after zero-padding it to `padded_len`. No comm."""
    pg = _group(group)
    n, r = dist.get_world_size(pg), dist.get_rank(pg)
    chunk = padded_len // n
    start = r * chunk
    avail = max(0, min(chunk, x.shape[dim] - start))
    piece = x.narrow(dim, min(start, x.shape[dim]), avail)
    if avail == chunk:
        return piece.clone()
    pad_shape = list(x.shape)
    pad_shape[dim] = chunk - avail
    return torch.cat([piece, x.new_zeros(pad_shape)], dim=dim)


@shard.register_fake
def _(x, dim, padded_len, group):
    n = dist.get_world_size(_group(group))
    shape = list(x.shape)
    shape[dim] = padded_len // n
    return x.new_empty(shape)


@torch.library.custom_op("xdit_fx::all_gather", mutates_args=())
def all_gather(x: torch.Tensor, dim: int, length: int, group: str) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` (rank order), then keep the first `length` entries."""
    pg = _group(group)
    n = dist.get_world_size(pg)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=pg)
    comm.record(group, "all_gather", _nbytes(x) * (n - 1))
    return torch.cat(parts, dim=dim).narrow(dim, 0, length).clone()


@all_gather.register_fake
def _(x, dim, length, group):
    shape = list(x.shape)
    shape[dim] = length
    return x.new_empty(shape)


def local_len(length: int, sharded: bool | int, n: int) -> int:
    """Tokens a rank holds of a segment: ceil(length / n) if sharded (the last ranks padded), else all.
    A segment sharded in whole rows of g tokens (`sharded` = g > 1: frames of g tokens each, which a
    per-frame attention unflattens) holds ceil(length / (n * g)) rows of g tokens."""
    if not sharded:
        return length
    g = int(sharded)
    return -(-length // (n * g)) * g


def shard_tokens(x: torch.Tensor, dim: int, segments: Sequence[Sequence], group: str, n: int) -> torch.Tensor:
    """Full -> local for a token dim made of segments ((length, sharded), ...): sharded segments are
    chunked (padded to a multiple of n), replicated ones kept whole."""
    if len(segments) == 1:
        length, sharded = segments[0]
        return shard(x, dim, local_len(length, sharded, n) * n, group) if sharded else x
    pieces = x.split([s[0] for s in segments], dim=dim)
    out = [shard(p, dim, local_len(length, sharded, n) * n, group) if sharded else p
           for p, (length, sharded) in zip(pieces, segments)]
    return torch.cat(out, dim=dim)


def gather_tokens(x: torch.Tensor, dim: int, segments: Sequence[Sequence], group: str, n: int) -> torch.Tensor:
    """Local -> full, the inverse of `shard_tokens`."""
    if len(segments) == 1:
        length, sharded = segments[0]
        return all_gather(x, dim, length, group) if sharded else x
    pieces = x.split([local_len(length, sharded, n) for length, sharded in segments], dim=dim)
    out = [all_gather(p, dim, length, group) if sharded else p for p, (length, sharded) in zip(pieces, segments)]
    return torch.cat(out, dim=dim)


# ---- partial sums over the token dim, and halos for convolutions over a sharded grid dim --------------

@torch.library.custom_op("xdit_fx::all_reduce_sum", mutates_args=())
def all_reduce_sum(x: torch.Tensor, group: str) -> torch.Tensor:
    """Sum of every rank's `x` (a partial result of a contraction over sharded tokens)."""
    pg = _group(group)
    n = dist.get_world_size(pg)
    out = x.contiguous().clone()
    if n > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=pg)
        comm.record(group, "all_reduce", all_reduce_received(_nbytes(out), n))
    return out


@all_reduce_sum.register_fake
def _(x, group):
    return torch.empty_like(x)


def all_reduce_tokens(x: torch.Tensor, group: str) -> torch.Tensor:
    """Graph-level call of `all_reduce_sum`: the sum over tokens of every rank's partial result."""
    return all_reduce_sum(x, group)


def halo_rows(x: torch.Tensor, dim: int, halo: int, group: str) -> torch.Tensor:
    """Graph-level call of `halo_exchange`: local rows plus `halo` neighbour rows on each side."""
    return halo_exchange(x, dim, halo, group) if halo else x


def zero_token_padding(x: torch.Tensor, dim: int, segments: Sequence[Sequence], group: str, n: int) -> torch.Tensor:
    """`x` with the padding positions of its local token dim set to 0 (they must not enter a sum)."""
    if not any(s and local_len(length, s, n) * n != length for length, s in segments):
        return x
    r = dist.get_rank(_group(group))
    keep = []
    for length, sharded in segments:
        if sharded:
            c = local_len(length, sharded, n)
            keep.extend(r * c + i < length for i in range(c))
        else:
            keep.extend([True] * length)
    shape = [1] * x.dim()
    shape[dim] = len(keep)
    return x * torch.tensor(keep, dtype=x.dtype, device=x.device).view(shape)


@torch.library.custom_op("xdit_fx::halo_exchange", mutates_args=())
def halo_exchange(x: torch.Tensor, dim: int, halo: int, group: str) -> torch.Tensor:
    """`x` (this rank's rows of a grid sharded along `dim`) extended by `halo` rows of each neighbour on
    both sides; zeros beyond the first and last rank (a zero-padded convolution's border)."""
    pg = _group(group)
    n, r = dist.get_world_size(pg), dist.get_rank(pg)
    rows = x.shape[dim]
    edges = torch.cat([x.narrow(dim, 0, halo), x.narrow(dim, rows - halo, halo)], dim=dim).contiguous()
    parts = [torch.empty_like(edges) for _ in range(n)]
    dist.all_gather(parts, edges, group=pg)
    comm.record(group, "halo", _nbytes(edges) * (n - 1))
    zeros = x.new_zeros(edges.narrow(dim, 0, halo).shape)
    before = parts[r - 1].narrow(dim, halo, halo) if r > 0 else zeros
    after = parts[r + 1].narrow(dim, 0, halo) if r < n - 1 else zeros
    return torch.cat([before, x, after], dim=dim)


@halo_exchange.register_fake
def _(x, dim, halo, group):
    shape = list(x.shape)
    shape[dim] += 2 * halo
    return x.new_empty(shape)


# ---- ring attention ----------------------------------------------------------------------------------

def attention_with_lse(q, k, v, bias, scale):
    """Attention output and log-sum-exp over the keys: (out [B,H,L,D], lse [B,H,L]).

    A query row whose keys are all masked (-inf) in this chunk gets lse = -inf and out = 0, so that a
    log-sum-exp merge gives it weight 0 (the CPU flash kernel reports lse = 0 for such rows)."""
    fused = _fused_attention_with_lse(q, k, v, bias, scale)
    if fused is not None:
        out, lse = fused
        if bias is not None and bias.dtype != torch.bool:
            dead = torch.isneginf(bias).all(dim=-1)  # broadcastable to lse: [.., Lq]
            if dead.any():
                dead = dead.expand(lse.shape)
                lse = lse.masked_fill(dead, float("-inf"))
                out = out.masked_fill(dead.unsqueeze(-1), 0.0)
        return out, lse
    return attention_with_lse_reference(q, k, v, bias, scale)


def _fused_attention_with_lse(q, k, v, bias, scale):
    """A fused kernel that also returns the log-sum-exp, or None where none applies (then the reference).

    A backend asked for with `xdit_fx.attention_backend` is used as asked ("math": the reference). Otherwise,
    CPU: the flash kernel for CPU. CUDA: FlashAttention-2 (fp16/bf16, no bias, head dim <= 256), else the
    memory-efficient kernel (fp32 too, with an additive bias)."""
    name = current_backend()
    if name == "math":
        return None
    if name != "auto":
        return chunk_attention_with_lse(q, k, v, bias, scale)
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=scale)
    if q.device.type != "cuda" or not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        return None
    if bias is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        try:
            res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
            return res[0], res[1]
        except RuntimeError:
            pass
    try:
        return efficient_with_lse(q, k, v, bias, scale)
    except RuntimeError:
        return None


def attention_with_lse_reference(q, k, v, bias, scale):
    """The same in plain ops (materializes the scores): devices without a fused kernel, and checks."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
    if bias is not None:  # rows without a key: 0, as from the fused kernels (softmax gave nan)
        out = out.masked_fill(torch.isneginf(lse).unsqueeze(-1), 0.0)
    return out, lse


def merge_partial(out, lse, o, o_lse):
    """Merge a chunk's (output, log-sum-exp) into the running ones, in float32, in place: out moves towards o
    by o's share of the merged softmax, exp(o_lse - merged lse) (one pass over the output). A row without keys
    in the chunk (o_lse -inf; its output is 0, see `attention_with_lse`) gets weight 0; a row without keys in
    either gets weight 0 too (nan -> 0). ``out``/``lse`` None: the first chunk, which becomes the running
    output (the caller's chunk outputs are its own, fresh tensors)."""
    o, o_lse = o.float(), o_lse.float()
    if out is None:
        return o, o_lse
    new = torch.logaddexp(lse, o_lse)
    w_new = torch.exp(o_lse - new).nan_to_num_(0.0).unsqueeze(-1)
    return out.lerp_(o, w_new), new


def _parse_keep(keep, n: int, lk: int) -> list[tuple[int, tuple[tuple[int, int], ...]]]:
    """`ring_attention`'s flat key list -> per ring source (column offset in the mask, (start, length) spans of
    its valid keys). Empty: every key of every chunk is valid."""
    if not keep:
        return [(src * lk, ((0, lk),)) for src in range(n)]
    out, i, col = [], 0, 0
    for _ in range(n):
        count = keep[i]
        spans = tuple((keep[i + 1 + 2 * j], keep[i + 2 + 2 * j]) for j in range(count))
        out.append((col, spans))
        col += sum(length for _, length in spans)
        i += 1 + 2 * count
    return out


def _keys(x: torch.Tensor, spans) -> torch.Tensor:
    """A chunk's valid keys along dim 2: the chunk itself, a view of one span, or one copy of several."""
    if len(spans) == 1:
        start, length = spans[0]
        return x if start == 0 and length == x.shape[2] else x.narrow(2, start, length)
    return torch.cat([x.narrow(2, start, length) for start, length in spans], dim=2)


def ring_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                       scale: float, group: str, keep=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of local queries over the keys/values of every rank of `group`, passed around a ring:
    (out in float32, log-sum-exp), so that a caller can merge more keys into it.

    `keep` (flat: per rank in rank order, the number of spans, then (start, length) per span) names the
    valid keys of each rank's chunk; the others (padding of an uneven split) are cut out before the kernel.
    `bias`, if given, covers the valid keys in rank order: [..., Lq or 1, keys or 1]; step j uses the columns
    of the rank whose chunk is held then. Partial results are merged with their log-sum-exp. K and V
    travel as they are (two buffers, no stacked copy)."""
    pg = _group(group)
    n, rank = dist.get_world_size(pg), dist.get_rank(pg)
    chunks = _parse_keep(keep, n, k.shape[-2])
    out = lse = None
    k, v = k.contiguous(), v.contiguous()
    for step in range(n):
        src = (rank - step) % n
        if step < n - 1:
            nk, nv = torch.empty_like(k), torch.empty_like(v)
            peer_out, peer_in = dist.get_global_rank(pg, (rank + 1) % n), dist.get_global_rank(pg, (rank - 1) % n)
            reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, k, peer_out, pg),
                                           dist.P2POp(dist.isend, v, peer_out, pg),
                                           dist.P2POp(dist.irecv, nk, peer_in, pg),
                                           dist.P2POp(dist.irecv, nv, peer_in, pg)])
        col, spans = chunks[src]
        width = sum(length for _, length in spans)
        b = bias[..., col:col + width] if bias is not None and bias.shape[-1] > 1 else bias
        out, lse = merge_partial(out, lse, *_chunk_attention(q, _keys(k, spans), _keys(v, spans), b, scale))
        if step < n - 1:
            for r in reqs:
                r.wait()
            comm.record(group, "ring_p2p", _nbytes(nk) + _nbytes(nv))
            k, v = nk, nv
    return out, lse


def _chunk_attention(q, k, v, bias, scale):
    """One chunk's (out, lse). bf16/fp16 chunks on the CPU attend in float32 (its kernel rounds each chunk's
    output to bf16); on CUDA the fused kernels accumulate in float32 already and keep their speed. K/V with
    fewer heads than Q (grouped-query attention) go in as they are on the CPU, whose kernel takes them; other
    devices get one K/V head per query head for this chunk."""
    if k.shape[1] != q.shape[1] and q.device.type != "cpu":
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if q.dtype in (torch.bfloat16, torch.float16) and q.device.type == "cpu":
        return attention_with_lse(q.float(), k.float(), v.float(),
                                  bias.float() if bias is not None and bias.is_floating_point() else bias, scale)
    return attention_with_lse(q, k, v, bias, scale)


@torch.library.custom_op("xdit_fx::ring_attention", mutates_args=())
def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                   scale: float, group: str, keep: Optional[list[int]] = None) -> torch.Tensor:
    """Attention of local queries over the keys/values of every rank of `group`, passed around a ring
    (see `ring_attention_lse`; `keep`: each rank's valid keys, None or empty: all)."""
    return _laid_out_like_q(ring_attention_lse(q, k, v, bias, scale, group, keep)[0].to(q.dtype), q)


def _laid_out_like_q(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`out` in the strides the fake promises (Inductor checks what an opaque op returns): those of
    `torch.empty_like(q)`. On the CPU the flash kernel writes [B, L, H, D] memory order, which is what q has
    when it is the model's transposed projection: then no copy."""
    if out.shape != q.shape:
        return out.contiguous()
    if out.stride() == torch.empty_like(q, device="meta").stride():  # the strides, with no allocation
        return out
    return torch.empty_like(q).copy_(out)


@ring_attention.register_fake
def _(q, k, v, bias, scale, group, keep=None):
    shape = q.shape[:-1] + (v.shape[-1],)
    return torch.empty_like(q) if shape == q.shape else q.new_empty(shape)
