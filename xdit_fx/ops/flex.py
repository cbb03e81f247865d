"""flex_attention's masks and score modifications as one dense tensor over global token positions.

normalize_attention rewrites a ``flex_attention`` call into scaled_dot_product_attention whose ``attn_mask`` is
`flex_dense_mask`: the block mask (its block structure and its ``mask_mod``) and an additive ``score_mod``
evaluated at every (batch, head, query position, key position) of the whole sequence. Positions are global
because the mask is built before the sequence is split: sequence parallelism and PipeFusion then re-index
it to each rank's queries and key chunks like any attention mask, so a causal or document mask stays the
model's mask whatever the split.
"""

from __future__ import annotations

import torch


def _vmap4(fn, prefix: tuple = ()):
    """fn vmapped over (b, h, q_idx, kv_idx) as flex_attention's own create_mask does (arguments in
    `prefix` carry the same four dims)."""
    from torch.nn.attention.flex_attention import _vmap_for_bhqkv
    return _vmap_for_bhqkv(fn, prefix=prefix)


def _block_layout(num: torch.Tensor | None, idx: torch.Tensor | None, shape: tuple) -> torch.Tensor:
    """[B, H, q blocks, kv blocks] bool: the kv blocks listed in the first `num` entries of `idx`."""
    if num is None or idx is None:
        return torch.zeros(shape, dtype=torch.bool)
    valid = (torch.arange(idx.shape[-1], device=idx.device) < num[..., None]).to(torch.int32)
    counts = torch.zeros(idx.shape, dtype=torch.int32, device=idx.device).scatter_add_(-1, idx.long(), valid)
    return counts > 0


def flex_dense_mask(batch: int, heads: int, lq: int, lk: int, score_mod, block: tuple, score_buffers: tuple,
                    mask_buffers: tuple, dtype: torch.dtype) -> torch.Tensor:
    """The attention mask SDPA needs to compute what ``flex_attention(q, k, v, score_mod, block_mask)`` does:
    [batch, heads, lq, lk], bool without a score_mod, else the additive bias ``score_mod(0, b, h, q, kv)``
    with -inf where the block mask hides a key. `block` is the block mask as flex_attention's operator
    receives it (``BlockMask.as_tuple()``: lengths, kv_num_blocks, kv_indices, full_kv_num_blocks,
    full_kv_indices, ..., Q_BLOCK_SIZE, KV_BLOCK_SIZE, mask_mod); a key is visible in a full block, or in a
    partial block where mask_mod says so."""
    kv_num, kv_idx, full_num, full_idx = block[2], block[3], block[4], block[5]
    q_block, kv_block, mask_mod = block[-3], block[-2], block[-1]
    device = kv_idx.device
    b, h = torch.arange(batch, device=device), torch.arange(heads, device=device)
    m, n = torch.arange(lq, device=device), torch.arange(lk, device=device)
    allowed = _vmap4(lambda bb, hh, qq, kk: mask_mod(bb, hh, qq, kk, *mask_buffers))(b, h, m, n)

    q_of, kv_of = torch.div(m, q_block, rounding_mode="floor"), torch.div(n, kv_block, rounding_mode="floor")

    def elements(layout: torch.Tensor) -> torch.Tensor:  # each position takes its block's entry
        return layout.index_select(-2, q_of).index_select(-1, kv_of)

    partial = elements(_block_layout(kv_num, kv_idx, kv_idx.shape))
    full = elements(_block_layout(full_num, full_idx, kv_idx.shape))
    mask = (full | (partial & allowed)).expand(batch, heads, lq, lk)
    if score_mod is None:
        return mask.contiguous()
    zeros = torch.zeros(batch, heads, lq, lk, dtype=torch.float32, device=device)
    bias = _vmap4(lambda s, bb, hh, qq, kk: score_mod(s, bb, hh, qq, kk, *score_buffers), prefix=(0,))(
        zeros, b, h, m, n)
    return torch.where(mask, bias, float("-inf")).to(dtype)
