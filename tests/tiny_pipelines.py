"""Tiny randomly initialised stock diffusers pipelines, and the call arguments that exercise their CFG.

Two forms: in memory without text encoders (``PIPELINES``: called with ``prompt_embeds`` and negative ones,
which every one of them accepts; ``batch`` is the number of prompts, since precomputed embeddings are not
repeated by ``num_images_per_prompt`` in every pipeline), and as folders on disk with one-layer text encoders
and tokenizers built from a small vocabulary (``save_folder``; ``FOLDER_FLAGS`` are the generate flags that
fit them), which is what ``xdit-fx generate --model DIR`` and ``xdit_fx.load_pipeline`` read.

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
    """Generate with a fixed seed; returns the images as a float tensor (every rank gets them)."""
    out = pipe(**kwargs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt")
    images = out.frames if hasattr(out, "frames") else out.images
    return torch.as_tensor(images).float()


# ---- pipeline folders: the same pipelines with tiny text encoders and tokenizers, saved to disk ------------
# What `xdit-fx generate --model DIR` and `load_pipeline(DIR)` read. The tokenizers are built from a small
# vocabulary by transformers' tokenizers-library-backed classes (nothing is downloaded); the text encoders are
# one-layer CLIP / T5 / UMT5 models with random weights, sized to the transformers' text dims above.

WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "car", "blurry", "low", "quality", "the", "on", "in")
#: CLIP's token window (its position table) and the text length the folder tests pass as max_sequence_length
CLIP_LEN, T5_LEN = 16, 8


def clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for piece in [w + "</w>" for w in WORDS] + [c for c in "abcdefghijklmnopqrstuvwxyz"] + \
            [c + "</w>" for c in "abcdefghijklmnopqrstuvwxyz"]:
        vocab.setdefault(piece, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_LEN)


def t5_tokenizer():
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def _vocab_size(tokenizer) -> int:
    return len(tokenizer.get_vocab())


def clip_encoder(hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=_vocab_size(clip_tokenizer()), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=CLIP_LEN,
                            projection_dim=projection or hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def t5_encoder(d_model: int = TEXT_DIM, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    fields = dict(vocab_size=_vocab_size(t5_tokenizer()), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                  num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
                  eos_token_id=1)
    return (UMT5EncoderModel(UMT5Config(**fields)) if umt5 else T5EncoderModel(T5Config(**fields))).eval()


def _folder_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4), text_encoder=clip_encoder(TEXT_DIM),
                        tokenizer=clip_tokenizer(), text_encoder_2=t5_encoder(), tokenizer_2=t5_tokenizer(),
                        transformer=get("flux").build())


def _folder_sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    # pooled: the two CLIP projections concatenated (16 + 16 = 32); text: CLIP hiddens (16 + 16) padded to T5's 32
    return StableDiffusion3Pipeline(
        transformer=get("sd3").build(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4),
        text_encoder=clip_encoder(16, 16), tokenizer=clip_tokenizer(), text_encoder_2=clip_encoder(16, 16),
        tokenizer_2=clip_tokenizer(), text_encoder_3=t5_encoder(), tokenizer_3=t5_tokenizer())


def _folder_pixart():
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    return PixArtSigmaPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_encoder(), vae=_vae(4),
                               transformer=get("pixart").build(), scheduler=DPMSolverMultistepScheduler())


def _folder_wan():
    from diffusers import UniPCMultistepScheduler, WanPipeline

    pipe, _ = wan()
    return WanPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_encoder(umt5=True), vae=pipe.vae,
                       scheduler=UniPCMultistepScheduler(flow_shift=3.0), transformer=pipe.transformer)


FOLDERS = {"flux": _folder_flux, "sd3": _folder_sd3, "pixart": _folder_pixart, "wan": _folder_wan}

#: generate's flags for each folder: a short text, a size the tiny models take, and guidance on (two calls per
#: step for flux's true CFG and wan, one batched call for sd3 and pixart)
FOLDER_FLAGS = {
    "flux": ["--height", "16", "--width", "16", "--true_cfg_scale", "4.0", "--negative_prompt", "blurry",
             "--max_sequence_length", str(T5_LEN)],
    "sd3": ["--height", "16", "--width", "16", "--guidance_scale", "5.0", "--negative_prompt", "blurry",
            "--max_sequence_length", str(T5_LEN)],
    "pixart": ["--height", "16", "--width", "16", "--guidance_scale", "4.5", "--max_sequence_length", str(T5_LEN),
               "--no_use_resolution_binning"],
    "wan": ["--height", "32", "--width", "32", "--num_frames", "5", "--guidance_scale", "5.0",
            "--negative_prompt", "blurry", "--max_sequence_length", str(T5_LEN)],
}


def save_folder(name: str, root) -> str:
    """Build pipeline `name` with its text encoders and tokenizers (seeded random weights) and save it with
    save_pretrained under root/name; returns the folder."""
    from pathlib import Path

    path = Path(root) / name
    if not (path / "model_index.json").is_file():
        torch.manual_seed(0)
        FOLDERS[name]().save_pretrained(path)
    return str(path)
