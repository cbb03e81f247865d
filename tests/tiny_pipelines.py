"""Tiny randomly initialised stock diffusers pipelines, and the call arguments that exercise their CFG.

Text encoders need tokenizer files that cannot be downloaded here, so the pipelines are built without them
and called with ``prompt_embeds`` (and negative ones), which every one of them accepts; ``batch`` is the
number of prompts (precomputed embeddings are not repeated by ``num_images_per_prompt`` in every pipeline).

How each one does classifier-free guidance (what cfg=2 has to cope with):
  flux    two transformer calls per step (true CFG: a negative prompt and true_cfg_scale > 1)
  sd3     one batched call per step on [uncond; cond]
  pixart  one batched call per step on [uncond; cond]
  wan     two transformer calls per step (cond, then uncond)
"""

from __future__ import annotations

import torch

from xdit_fx.zoo import get

TEXT_LEN, TEXT_DIM = 8, 32


def _vae(latent_channels: int):
    from diffusers import AutoencoderKL

    # two resolutions: one 2x upsampling in the decoder, group norms and a mid-block attention
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=32,
                         scaling_factor=1.5, shift_factor=0.06)


def _embeds(g: torch.Generator, n: int, dim: int = TEXT_DIM) -> torch.Tensor:
    return torch.randn(n, TEXT_LEN, dim, generator=g)


def _pooled_embeds(seed: int, batch: int) -> dict:
    """Prompt and negative-prompt embeddings with pooled vectors (the MMDiT pipelines' inputs)."""
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=_embeds(g, batch), pooled_prompt_embeds=torch.randn(batch, TEXT_DIM, generator=g),
                negative_prompt_embeds=_embeds(g, batch),
                negative_pooled_prompt_embeds=torch.randn(batch, TEXT_DIM, generator=g))


def flux(batch: int = 1):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4), text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=get("flux").build())
    kwargs = dict(_pooled_embeds(1, batch), true_cfg_scale=4.0, height=16, width=16)
    return pipe, kwargs


def sd3(batch: int = 1):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(transformer=get("sd3").build(), scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=_vae(4), text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    kwargs = dict(_pooled_embeds(2, batch), guidance_scale=5.0, height=16, width=16)
    return pipe, kwargs


def pixart(batch: int = 1):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=_vae(4), transformer=get("pixart").build(),
                               scheduler=DPMSolverMultistepScheduler())
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(batch, TEXT_LEN, dtype=torch.long)
    kwargs = dict(prompt_embeds=_embeds(g, batch), prompt_attention_mask=mask, negative_prompt=None,
                  negative_prompt_embeds=_embeds(g, batch),
                  negative_prompt_attention_mask=mask, guidance_scale=4.5, height=16, width=16,
                  use_resolution_binning=False)
    return pipe, kwargs


def wan(batch: int = 1):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=UniPCMultistepScheduler(flow_shift=3.0),
                       transformer=get("wan").build())
    g = torch.Generator().manual_seed(4)
    kwargs = dict(prompt_embeds=_embeds(g, batch), negative_prompt_embeds=_embeds(g, batch), guidance_scale=5.0,
                  height=32, width=32, num_frames=5)
    return pipe, kwargs


PIPELINES = {"flux": flux, "sd3": sd3, "pixart": pixart, "wan": wan}


def run(pipe, kwargs: dict, steps: int = 3, seed: int = 0):
    """Generate with a fixed seed; returns the images as a float tensor (or None on ranks other than 0)."""
    out = pipe(**kwargs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt")
    if out is None:
        return None
    images = out.frames if hasattr(out, "frames") else out.images
    return torch.as_tensor(images).float()
