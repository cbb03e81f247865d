"""A registry of tiny, randomly initialised diffusion transformers with dummy inputs.

Used by tests and benchmarks.  Every entry is a :class:`ZooModel`:

* ``build()`` returns a deterministic (weights seeded with ``torch.manual_seed(0)``, without
  disturbing the caller's global RNG) float32 model in eval mode;
* ``inputs(uneven=False, seed=0, batch=1)`` returns the kwargs for ``model(**kwargs)``,
  drawn from a ``torch.Generator`` seeded with ``seed``.  With ``uneven=False`` the number of
  image/video tokens is divisible by 4; with ``uneven=True`` it is odd, and so is the number
  of text tokens where the model has text;
* ``heads`` is the number of attention heads (every model has 4, so Ulysses degrees 2 and 4
  both divide it).

Diffusers models are called with ``return_dict=False`` and return a 1-tuple; ``scratch_dit``
returns a tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ZooModel", "ZOO", "get", "ScratchDiT", "build_flux", "flux_inputs"]


@dataclass(frozen=True)
class ZooModel:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[..., dict]
    heads: int
    source: str = ""  # where the class comes from: "diffusers.FluxTransformer2DModel", "xdit_fx.zoo.ScratchDiT"
    note: str = ""  # what the entry exercises (shown in the coverage report)


def _seeded_build(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """Wrap ``factory`` so it builds under ``torch.manual_seed(0)`` and returns a float32 eval model."""

    def build() -> nn.Module:
        prev_dtype = torch.get_default_dtype()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            torch.set_default_dtype(torch.float32)  # float32 params without a `.to()` cast (diffusers warns on it)
            try:
                model = factory()
            finally:
                torch.set_default_dtype(prev_dtype)
        return model.eval()

    return build


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _text_len(uneven: bool) -> int:
    return 7 if uneven else 8


# --------------------------------------------------------------------------------------------
# scratch_dit: a minimal DiT written from scratch (not a diffusers class)
# --------------------------------------------------------------------------------------------


def _rope_2d(h: int, w: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D rotary tables [h*w, head_dim]: first half of the rotation pairs encodes rows, second half columns."""
    quarter = head_dim // 4
    freqs = 1.0 / (10000.0 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    angles = torch.cat([ys.reshape(-1, 1) * freqs, xs.reshape(-1, 1) * freqs], dim=-1)  # [S, D/2]
    angles = torch.cat([angles, angles], dim=-1)  # [S, D] (rotate-half layout)
    return angles.cos(), angles.sin()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x: [B, H, S, D] with tables [S, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class ScratchBlock(nn.Module):
    """Pre-LN transformer block with adaLN-zero style modulation (shift/scale/gate per branch)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        # Real DiTs zero-initialise this ("adaLN-zero"); we keep random weights so outputs are non-trivial.
        self.ada = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).unsqueeze(1).chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        b, s, _ = h.shape
        q, k, v = (proj(h).view(b, s, self.heads, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        attn = F.scaled_dot_product_attention(_apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v)
        x = x + gate1 * self.to_out(attn.transpose(1, 2).reshape(b, s, -1))
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class ScratchDiT(nn.Module):
    """Class-conditional DiT: conv patchify -> blocks with 2-D RoPE -> adaLN final layer -> unpatchify."""

    def __init__(self, in_channels=4, dim=64, heads=4, depth=2, patch=2, num_classes=10, freq_dim=32):
        super().__init__()
        self.patch, self.in_channels, self.heads, self.freq_dim = patch, in_channels, heads, freq_dim
        self.x_embed = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        self.t_embed = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embed = nn.Embedding(num_classes, dim)
        self.blocks = nn.ModuleList([ScratchBlock(dim, heads) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(dim, 2 * dim)
        self.proj_out = nn.Linear(dim, patch * patch * in_channels)

    def timestep_embedding(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, _, height, width = x.shape
        p, h, w = self.patch, height // self.patch, width // self.patch
        tokens = self.x_embed(x).flatten(2).transpose(1, 2)  # [B, N, dim], N = h * w
        c = self.t_embed(self.timestep_embedding(t)) + self.y_embed(y)  # [B, dim]
        cos, sin = _rope_2d(h, w, tokens.shape[-1] // self.heads, x.device)
        for block in self.blocks:
            tokens = block(tokens, c, cos, sin)
        shift, scale = self.ada_out(F.silu(c)).unsqueeze(1).chunk(2, dim=-1)
        out = self.proj_out(self.norm_out(tokens) * (1 + scale) + shift)  # [B, N, p*p*C]
        out = out.reshape(b, h, w, p, p, self.in_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, self.in_channels, h * p, w * p)


class ScratchMMBlock(nn.Module):
    """Joint text+image attention (text first) with grouped-query attention and a text padding mask."""

    def __init__(self, dim: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm_x, self.norm_c = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q_x, self.q_c = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.kv_x, self.kv_c = nn.Linear(dim, 2 * kv_heads * self.head_dim), nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.out_x, self.out_c = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.mlp_x = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.mlp_c = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, c, cos, sin, mask):
        b, n_img, _ = x.shape
        n_txt = c.shape[1]
        hx, hc = self.norm_x(x), self.norm_c(c)
        q = torch.cat([self.q_c(hc), self.q_x(hx)], dim=1).view(b, n_txt + n_img, self.heads, -1).transpose(1, 2)
        kv = torch.cat([self.kv_c(hc), self.kv_x(hx)], dim=1).view(b, n_txt + n_img, 2, self.kv_heads, -1)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(_apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v,
                                             attn_mask=mask, enable_gqa=True)
        out = out.transpose(1, 2).reshape(b, n_txt + n_img, -1)
        c = c + self.out_c(out[:, :n_txt])
        x = x + self.out_x(out[:, n_txt:])
        return x + self.mlp_x(x), c + self.mlp_c(c)


class ScratchMMDiT(nn.Module):
    """An MMDiT written from scratch: token-linear patchify, a learned register token prepended to the image
    tokens, 1-D RoPE over the joint sequence, GQA, and a boolean key mask that hides padded text tokens."""

    def __init__(self, in_features=16, text_features=24, dim=64, heads=4, kv_heads=2, depth=2):
        super().__init__()
        self.heads = heads
        self.x_embed, self.c_embed = nn.Linear(in_features, dim), nn.Linear(text_features, dim)
        self.register = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.ModuleList([ScratchMMBlock(dim, heads, kv_heads) for _ in range(depth)])
        self.proj_out = nn.Linear(dim, in_features)

    def forward(self, hidden_states, text, text_mask):
        x, c = self.x_embed(hidden_states), self.c_embed(text)
        x = torch.cat([self.register.expand(x.shape[0], -1, -1), x], dim=1)  # one token: too short to shard
        b, n_img, n_txt = x.shape[0], x.shape[1], c.shape[1]
        head_dim = x.shape[-1] // self.heads
        pos = torch.arange(n_txt + n_img, device=x.device, dtype=torch.float32)
        freqs = 1.0 / (10000.0 ** (torch.arange(head_dim // 2, device=x.device, dtype=torch.float32) / (head_dim // 2)))
        angles = torch.outer(pos, freqs).repeat(1, 2)  # [T+S, head_dim]
        cos, sin = angles.cos(), angles.sin()
        keep = torch.cat([text_mask.bool(), torch.ones(b, n_img, dtype=torch.bool, device=x.device)], dim=1)
        mask = keep[:, None, None, :]  # [B, 1, 1, T+S]: padded text tokens are never attended to
        for block in self.blocks:
            x, c = block(x, c, cos, sin, mask)
        return self.proj_out(x[:, 1:])


def _scratch_mmdit_inputs(uneven: bool = False, seed: int = 0, batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    n_img, n_txt = (15, 7) if uneven else (16, 8)
    return {
        "hidden_states": _randn(g, batch, n_img, 16),
        "text": _randn(g, batch, n_txt, 24),
        "text_mask": (torch.arange(n_txt) < n_txt - 3).expand(batch, n_txt).clone(),
    }


def _scratch_inputs(uneven: bool = False, seed: int = 0, batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    hw = (6, 10) if uneven else (8, 8)  # 3x5 = 15 vs 4x4 = 16 patches
    return {
        "x": _randn(g, batch, 4, *hw),
        "t": torch.rand(batch, generator=g) * 1000,
        "y": torch.randint(0, 10, (batch,), generator=g),
    }


# --------------------------------------------------------------------------------------------
# diffusers models
# --------------------------------------------------------------------------------------------


def build_flux(num_layers: int = 1, num_single_layers: int = 1, heads: int = 4, head_dim: int = 16,
               text_dim: int = 32, axes_dims_rope: tuple[int, ...] = (4, 6, 6)) -> nn.Module:
    """A Flux-architecture transformer (random weights): double-stream then single-stream blocks."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # packed latents: 4 channels x 2x2
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=text_dim,
        pooled_projection_dim=text_dim,
        guidance_embeds=False,
        axes_dims_rope=axes_dims_rope,
    )


def flux_inputs(h: int, w: int, txt: int, text_dim: int = 32, seed: int = 0, batch: int = 1) -> dict:
    """Inputs for `build_flux`: an h x w grid of packed latent tokens and `txt` text tokens."""
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h, dtype=torch.float32)[:, None]
    img_ids[..., 2] = torch.arange(w, dtype=torch.float32)[None, :]
    return {
        "hidden_states": _randn(g, batch, h * w, 16),
        "encoder_hidden_states": _randn(g, batch, txt, text_dim),
        "pooled_projections": _randn(g, batch, text_dim),
        "timestep": torch.rand(batch, generator=g),
        "img_ids": img_ids.reshape(h * w, 3),
        "txt_ids": torch.zeros(txt, 3),
        "return_dict": False,
    }


def _flux_model() -> nn.Module:
    return build_flux()


def _flux_inputs(uneven: bool = False, seed: int = 0, batch: int = 1) -> dict:
    h, w = (3, 5) if uneven else (4, 4)  # packed latent grid: 15 vs 16 image tokens
    return flux_inputs(h, w, _text_len(uneven), seed=seed, batch=batch)


def _sd3_model() -> nn.Module:
    from diffusers import SD3Transformer2DModel

    # SD3.5-style: RMS qk-norm, block 0 has the extra image-only self-attention ("dual attention"),
    # the last block is context_pre_only.
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=8,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )


def _sd3_inputs(uneven: bool = False, seed: int = 0, batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    hw = (6, 10) if uneven else (8, 8)  # 3x5 = 15 vs 4x4 = 16 patches
    return {
        "hidden_states": _randn(g, batch, 4, *hw),
        "encoder_hidden_states": _randn(g, batch, _text_len(uneven), 32),
        "pooled_projections": _randn(g, batch, 32),
        "timestep": torch.rand(batch, generator=g) * 1000,
        "return_dict": False,
    }


def _pixart_model() -> nn.Module:
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,  # learned sigma
        num_layers=2,
        cross_attention_dim=32,
        sample_size=8,
        patch_size=2,
        caption_channels=32,
        use_additional_conditions=False,
    )


def _pixart_inputs(uneven: bool = False, seed: int = 0, batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    hw = (6, 10) if uneven else (8, 8)  # 3x5 = 15 vs 4x4 = 16 patches
    return {
        "hidden_states": _randn(g, batch, 4, *hw),
        "encoder_hidden_states": _randn(g, batch, _text_len(uneven), 32),
        "timestep": torch.rand(batch, generator=g) * 1000,
        "return_dict": False,
    }


def _wan_model() -> nn.Module:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=16,  # rope axes t/h/w = 8/4/4
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=128,
        num_layers=2,
        rope_max_seq_len=32,
    )


def _video_shape(uneven: bool) -> tuple[int, int, int]:
    # (frames, height, width) with spatial patch 2: 2*2*4 = 16 vs 3*3*3 = 27 video tokens
    return (3, 6, 6) if uneven else (2, 4, 8)


def _wan_inputs(uneven: bool = False, seed: int = 0, batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": _randn(g, batch, 4, *_video_shape(uneven)),
        "timestep": torch.rand(batch, generator=g) * 1000,
        "encoder_hidden_states": _randn(g, batch, _text_len(uneven), 32),
        "return_dict": False,
    }


def _hunyuan_video_model() -> nn.Module:
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=4,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        qk_norm="rms_norm",
        guidance_embeds=True,
        text_embed_dim=32,
        pooled_projection_dim=32,
        rope_axes_dim=(4, 6, 6),
    )


def _hunyuan_video_inputs(uneven: bool = False, seed: int = 0, batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    txt = _text_len(uneven)
    return {
        "hidden_states": _randn(g, batch, 4, *_video_shape(uneven)),
        "timestep": torch.rand(batch, generator=g) * 1000,
        "encoder_hidden_states": _randn(g, batch, txt, 32),
        # the last two text tokens are padding: a real key mask over the joint sequence
        "encoder_attention_mask": (torch.arange(txt) < txt - 2).to(torch.int64).expand(batch, txt).clone(),
        "pooled_projections": _randn(g, batch, 32),
        "guidance": torch.full((batch,), 6000.0),
        "return_dict": False,
    }


def _cogvideox_model() -> nn.Module:
    from diffusers import CogVideoXTransformer3DModel

    # sincos positional embeddings: at a size other than the configured 8x8 the table is rebuilt inside
    # the graph and written in place (`pos.data[:, text:].copy_(...)`)
    return CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8)


def _cogvideox_inputs(uneven: bool = False, seed: int = 0, batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    f, h, w = (3, 6, 10) if uneven else (3, 8, 8)  # 3 x 15 = 45 vs 3 x 16 = 48 video tokens
    return {
        "hidden_states": _randn(g, batch, f, 4, h, w),
        "encoder_hidden_states": _randn(g, batch, 8, 16),
        "timestep": torch.full((batch,), 500),
        "return_dict": False,
    }


def _cogview4_model() -> nn.Module:
    from diffusers import CogView4Transformer2DModel

    # RoPE is written in place into the image part of q and k: `query[:, :, text:] = rotate(...)`
    return CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        text_embed_dim=16, time_embed_dim=8, condition_dim=4, pos_embed_max_size=16, sample_size=8,
        rope_axes_dim=(16, 16))


def _cogview4_inputs(uneven: bool = False, seed: int = 0, batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    hw = (6, 10) if uneven else (8, 8)
    return {
        "hidden_states": _randn(g, batch, 4, *hw),
        "encoder_hidden_states": _randn(g, batch, _text_len(uneven), 16),
        "timestep": torch.full((batch,), 500),
        "original_size": torch.tensor([[64, 64]] * batch),
        "target_size": torch.tensor([[64, 64]] * batch),
        "crop_coords": torch.tensor([[0, 0]] * batch),
        "return_dict": False,
    }


ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in [
        ZooModel("flux", _seeded_build(_flux_model), _flux_inputs, heads=4),
        ZooModel("sd3", _seeded_build(_sd3_model), _sd3_inputs, heads=4),
        ZooModel("pixart", _seeded_build(_pixart_model), _pixart_inputs, heads=4),
        ZooModel("wan", _seeded_build(_wan_model), _wan_inputs, heads=4),
        ZooModel("hunyuan_video", _seeded_build(_hunyuan_video_model), _hunyuan_video_inputs, heads=4),
        ZooModel("scratch_dit", _seeded_build(ScratchDiT), _scratch_inputs, heads=4, source="xdit_fx.zoo.ScratchDiT",
                 note="conv patchify, adaLN, 2-D RoPE, SDPA"),
        ZooModel("scratch_mmdit", _seeded_build(ScratchMMDiT), _scratch_mmdit_inputs, heads=4,
                 source="xdit_fx.zoo.ScratchMMDiT", note="joint attention, GQA, register token, key mask"),
        ZooModel("cogvideox", _seeded_build(_cogvideox_model), _cogvideox_inputs, heads=4),
        ZooModel("cogview4", _seeded_build(_cogview4_model), _cogview4_inputs, heads=4),
    ]
}


def get(name: str) -> ZooModel:
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; available: {sorted(ZOO)}") from None
