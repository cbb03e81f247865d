"""xformers.ops.fmha.attn_bias: the attention biases DiT code passes (a subset, same names and fields)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


class AttentionBias:
    def materialize(self, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
        raise NotImplementedError


class LowerTriangularMask(AttentionBias):
    """Causal, aligned to the top-left corner."""

    def materialize(self, shape, dtype=torch.float32, device="cpu"):
        allowed = torch.ones(shape[-2:], dtype=torch.bool, device=device).tril()
        return torch.zeros(shape[-2:], dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))


@dataclass
class _SeqLenInfo:
    seqstart: torch.Tensor  # int32 [n + 1]
    max_seqlen: int
    min_seqlen: int
    seqstart_py: list

    @classmethod
    def from_seqlens(cls, seqlens: Sequence[int]) -> "_SeqLenInfo":
        seqstart_py = [0]
        for n in seqlens:
            seqstart_py.append(seqstart_py[-1] + n)
        return cls(seqstart=torch.tensor(seqstart_py, dtype=torch.int32), max_seqlen=max(seqlens),
                   min_seqlen=min(seqlens), seqstart_py=seqstart_py)


@dataclass
class BlockDiagonalMask(AttentionBias):
    """Packed sequences [1, total, H, K]: query sequence i attends to key sequence i only."""

    q_seqinfo: _SeqLenInfo
    k_seqinfo: _SeqLenInfo
    _batch_sizes: object = None

    @classmethod
    def from_seqlens(cls, q_seqlen: Sequence[int], kv_seqlen: Sequence[int] | None = None):
        q = _SeqLenInfo.from_seqlens(q_seqlen)
        k = q if kv_seqlen is None else _SeqLenInfo.from_seqlens(kv_seqlen)
        return cls(q_seqinfo=q, k_seqinfo=k)

    def make_causal(self) -> "BlockDiagonalCausalMask":
        return BlockDiagonalCausalMask(q_seqinfo=self.q_seqinfo, k_seqinfo=self.k_seqinfo)

    def _allowed(self, device) -> torch.Tensor:
        qs, ks = self.q_seqinfo.seqstart_py, self.k_seqinfo.seqstart_py
        m = torch.zeros(qs[-1], ks[-1], dtype=torch.bool, device=device)
        for i in range(len(qs) - 1):
            block = torch.ones(qs[i + 1] - qs[i], ks[i + 1] - ks[i], dtype=torch.bool, device=device)
            m[qs[i]:qs[i + 1], ks[i]:ks[i + 1]] = self._block(block)
        return m

    def _block(self, block):
        return block

    def materialize(self, shape, dtype=torch.float32, device="cpu"):
        allowed = self._allowed(device)
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))


@dataclass
class BlockDiagonalCausalMask(BlockDiagonalMask):
    """Block-diagonal, causal within each block (top-left aligned)."""

    def _block(self, block):
        return block.tril()
