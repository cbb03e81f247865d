"""xformers.ops.fmha.memory_efficient_attention over the cutlass forward op, as xformers >= 0.0.23 calls it
(`xformers::efficient_attention_forward_cutlass`, a torch.library op; CPU math here)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

import standins
from xformers.ops.fmha import attn_bias as _ab
from xformers.ops.fmha.attn_bias import BlockDiagonalMask, LowerTriangularMask  # noqa: F401


@torch.library.custom_op("xformers::efficient_attention_forward_cutlass", mutates_args=())
def efficient_attention_forward_cutlass(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                        attn_bias: Optional[torch.Tensor], seqstart_q: Optional[torch.Tensor],
                                        seqstart_k: Optional[torch.Tensor], max_seqlen_q: Optional[int],
                                        dropout_p: float, compute_logsumexp: bool, custom_mask_type: int,
                                        scale: Optional[float], seqlen_k: Optional[torch.Tensor],
                                        window_size: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """q, k, v [B, M, H, K]; with seqstart_q/k, B = 1 and the sequences are packed along M.
    custom_mask_type: 0 none, 1 causal from the top-left, 2 causal from the bottom-right (per sequence)."""
    assert dropout_p == 0.0 and seqlen_k is None and window_size is None
    b, mq, h, d = query.shape
    mk = key.shape[1]
    scale = d ** -0.5 if scale is None else scale
    qs = seqstart_q.tolist() if seqstart_q is not None else [0, mq]
    ks = seqstart_k.tolist() if seqstart_k is not None else [0, mk]
    allowed = torch.zeros(mq, mk, dtype=torch.bool)
    for i in range(len(qs) - 1):
        lq, lk = qs[i + 1] - qs[i], ks[i + 1] - ks[i]
        block = torch.ones(lq, lk, dtype=torch.bool)
        if custom_mask_type == 1:
            block = block.tril()
        elif custom_mask_type == 2:
            block = block.tril(lk - lq)
        allowed[qs[i]:qs[i + 1], ks[i]:ks[i + 1]] = block
    out = standins.reference_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale,
                                       allowed, attn_bias)
    return out.transpose(1, 2).contiguous(), torch.zeros(b, h, mq, dtype=torch.float32)


@efficient_attention_forward_cutlass.register_fake
def _(query, key, value, attn_bias, seqstart_q, seqstart_k, max_seqlen_q, dropout_p, compute_logsumexp,
      custom_mask_type, scale, seqlen_k, window_size):
    b, mq, h, _ = query.shape
    return torch.empty_like(query, memory_format=torch.contiguous_format), query.new_empty((b, h, mq),
                                                                                          dtype=torch.float32)


def memory_efficient_attention(query, key, value, attn_bias=None, p: float = 0.0, scale=None, *, op=None,
                               output_dtype=None):
    """[B, M, H, K] (or [B, M, K]) attention; attn_bias: None, a tensor (added to the scores, broadcast to
    [B, H, Mq, Mk]), LowerTriangularMask, BlockDiagonalMask / BlockDiagonalCausalMask (then B = 1)."""
    three_d = query.ndim == 3
    if three_d:
        query, key, value = query.unsqueeze(2), key.unsqueeze(2), value.unsqueeze(2)
    seqstart_q = seqstart_k = None
    max_seqlen_q = None
    mask_type = 0
    bias_tensor = None
    if isinstance(attn_bias, torch.Tensor):
        bias_tensor = attn_bias
    elif isinstance(attn_bias, _ab.BlockDiagonalMask):
        seqstart_q = attn_bias.q_seqinfo.seqstart.to(query.device)
        seqstart_k = attn_bias.k_seqinfo.seqstart.to(query.device)
        max_seqlen_q = attn_bias.q_seqinfo.max_seqlen
        mask_type = 1 if isinstance(attn_bias, _ab.BlockDiagonalCausalMask) else 0
    elif isinstance(attn_bias, _ab.LowerTriangularMask):
        mask_type = 1
    elif attn_bias is not None:
        raise NotImplementedError(f"stand-in: attn_bias {type(attn_bias).__name__}")
    out, _ = torch.ops.xformers.efficient_attention_forward_cutlass(
        query, key, value, bias_tensor, seqstart_q, seqstart_k, max_seqlen_q, p, False, mask_type, scale, None, None)
    return out[:, :, 0] if three_d else out
