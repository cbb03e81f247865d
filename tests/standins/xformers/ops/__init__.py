from xformers.ops.fmha import memory_efficient_attention  # noqa: F401
from xformers.ops.fmha.attn_bias import (BlockDiagonalCausalMask, BlockDiagonalMask,  # noqa: F401
                                         LowerTriangularMask)
