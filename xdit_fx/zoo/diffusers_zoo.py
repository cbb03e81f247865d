"""Tiny random configs and dummy inputs for the transformer classes of diffusers 0.42.x.

One :class:`~xdit_fx.zoo.core.ZooModel` per class in ``diffusers.models.transformers`` that denoises a
token sequence with attention (``COVERAGE_ZOO``), and the classes left out, with the reason
(``EXCLUDED``).  The configs are the smallest that still exercise each class's structure (joint or cross
attention, refiners, RoPE variants, masks, MoE, VACE/control, framepack history): 1-2 blocks, 2-4
heads (even, so ``ulysses=2`` divides), hidden sizes 16-64.  ``inputs(uneven, seed, batch)`` draws from a
seeded generator; ``uneven`` is honoured where the entry says so (``odd_tokens``) and ignored otherwise.

Nothing here is used by the passes: the entries only feed ``xdit-fx coverage`` and the tests.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from xdit_fx.zoo.core import ZOO as _CORE, ZooModel, _seeded_build

__all__ = ["COVERAGE_ZOO", "EXCLUDED", "diffusers_entry"]


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _r(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _cls(name: str):
    import diffusers

    return getattr(diffusers, name, None) or getattr(diffusers.models.transformers, name)


def diffusers_entry(name: str, cls_name: str, init: dict, inputs: Callable[[torch.Generator, bool], dict],
                    heads: int, note: str = "") -> ZooModel:
    """A zoo entry for diffusers class ``cls_name`` built with ``init``; ``return_dict=False`` is added
    when the forward takes it."""

    def factory():
        return _cls(cls_name)(**init)

    def make_inputs(uneven: bool = False, seed: int = 0, batch: int = 1) -> dict:
        kwargs = inputs(_g(seed), uneven)
        if "return_dict" in inspect.signature(_cls(cls_name).forward).parameters:
            kwargs.setdefault("return_dict", False)
        return kwargs

    return ZooModel(name, _seeded_build(factory), make_inputs, heads=heads, source=f"diffusers.{cls_name}",
                    note=note)


def _ids(h: int, w: int, txt: int, axes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.zeros(h, w, axes)
    img[..., axes - 2] = torch.arange(h, dtype=torch.float32)[:, None]
    img[..., axes - 1] = torch.arange(w, dtype=torch.float32)[None, :]
    return img.reshape(h * w, axes), torch.zeros(txt, axes)


def _hw(uneven: bool, even=(4, 4), odd=(3, 5)) -> tuple[int, int]:
    return odd if uneven else even


def _txt(uneven: bool) -> int:
    return 7 if uneven else 8


# ------------------------------------------------------------------------------------------------
# entries (alphabetical by class).  `E(...)` lines are data: class, config, inputs.
# ------------------------------------------------------------------------------------------------

_ENTRIES: list[ZooModel] = []


def E(name: str, cls_name: str, init: dict, heads: int, note: str = ""):
    def wrap(inputs):
        _ENTRIES.append(diffusers_entry(name, cls_name, init, inputs, heads, note))
        return inputs

    return wrap


@E("ace_step", "AceStepTransformer1DModel", dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, in_channels=24, audio_acoustic_hidden_dim=8, patch_size=2, rope_theta=10000.0,
    rms_norm_eps=1e-6, sliding_window=16), heads=4, note="audio 1-D, GQA, sliding window")
def _(g, uneven):
    n = 14 if uneven else 16
    return dict(hidden_states=_r(g, 1, n, 8), timestep=torch.rand(1, generator=g),
                timestep_r=torch.rand(1, generator=g), encoder_hidden_states=_r(g, 1, 10, 32),
                context_latents=_r(g, 1, n, 16))


@E("allegro", "AllegroTransformer3DModel", dict(
    patch_size=2, patch_size_t=1, num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4,
    num_layers=2, cross_attention_dim=32, sample_height=8, sample_width=8, sample_frames=2, caption_channels=16),
    heads=4)
def _(g, uneven):
    f, h, w = (3, 6, 10) if uneven else (2, 8, 8)
    return dict(hidden_states=_r(g, 1, 4, f, h, w), encoder_hidden_states=_r(g, 1, _txt(uneven), 16),
                timestep=torch.tensor([500]))


@E("anyflow", "AnyFlowTransformer3DModel", dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
    freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32, gate_value=0.25,
    deltatime_type="r"), heads=2)
def _(g, uneven):
    return dict(hidden_states=_r(g, 1, 2, 4, 8, 8), timestep=torch.full((1, 2), 500.0),
                r_timestep=torch.full((1, 2), 250.0), encoder_hidden_states=_r(g, 1, 12, 16))


@E("anyflow_far", "AnyFlowFARTransformer3DModel", dict(
    patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4), full_chunk_limit=3, num_attention_heads=2,
    attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2,
    cross_attn_norm=True, rope_max_seq_len=32, gate_value=0.25, deltatime_type="r"), heads=2,
    note="causal chunks through flex_attention (its block mask becomes a mask over global positions)")
def _(g, uneven):
    return dict(hidden_states=_r(g, 1, 4, 4, 8, 8), timestep=torch.full((1, 4), 500.0),
                r_timestep=torch.full((1, 4), 250.0), encoder_hidden_states=_r(g, 1, 12, 16),
                chunk_partition=[2, 2])


@E("aura_flow", "AuraFlowTransformer2DModel", dict(
    sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1, attention_head_dim=8,
    num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, out_channels=4,
    pos_embed_max_size=256), heads=4, note="register tokens")
def _(g, uneven):
    return dict(hidden_states=_r(g, 1, 4, *_hw(uneven, (8, 8), (6, 10))),
                encoder_hidden_states=_r(g, 1, _txt(uneven), 32), timestep=torch.tensor([500.0]))


@E("bria", "BriaTransformer2DModel", dict(
    patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=None, axes_dims_rope=[0, 4, 4]), heads=2)
def _(g, uneven):
    h, w = _hw(uneven)
    img_ids, txt_ids = _ids(h, w, 12)
    return dict(hidden_states=_r(g, 1, h * w, 4), encoder_hidden_states=_r(g, 1, 12, 32), img_ids=img_ids,
                txt_ids=txt_ids, timestep=torch.tensor([1.0]))


@E("bria_fibo", "BriaFiboTransformer2DModel", dict(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=64, text_encoder_dim=32, pooled_projection_dim=None, axes_dims_rope=[0, 4, 4]), heads=2)
def _(g, uneven):
    h, w = _hw(uneven)
    ehs = _r(g, 1, 12, 64)
    img_ids, txt_ids = _ids(h, w, 12)
    return dict(hidden_states=_r(g, 1, h * w, 16), encoder_hidden_states=ehs, img_ids=img_ids, txt_ids=txt_ids,
                timestep=torch.tensor([1.0]), text_encoder_layers=[ehs[:, :, :32], ehs[:, :, :32]])


@E("bria_fibo2", "BriaFibo2Transformer2DModel", dict(
    in_channels=4, patch_size=2, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=24,
    injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4, max_num_gist_tokens=8, gist_step=4,
    gist_min_text_len=4, gist_max_text_len=16, axes_dims=(4, 6, 6), axes_lens=(16, 16, 16)), heads=2,
    note="perceiver gist tokens, injection blocks")
def _(g, uneven):
    return dict(hidden_states=_r(g, 1, 4, 8, 8), timestep=torch.tensor([0.5]), encoder_hidden_states=_r(g, 1, 2, 6, 24))


@E("chroma", "ChromaTransformer2DModel", dict(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=4,
    joint_attention_dim=32, axes_dims_rope=(4, 6, 6), approximator_num_channels=8, approximator_hidden_dim=32,
    approximator_layers=1), heads=4)
def _(g, uneven):
    h, w = _hw(uneven)
    img_ids, txt_ids = _ids(h, w, _txt(uneven))
    return dict(hidden_states=_r(g, 1, h * w, 16), encoder_hidden_states=_r(g, 1, _txt(uneven), 32),
                timestep=torch.tensor([0.5]), img_ids=img_ids, txt_ids=txt_ids)


@E("chrono_edit", "ChronoEditTransformer3DModel", dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16, out_channels=16, text_dim=32,
    freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=64, pos_embed_seq_len=None,
    rope_temporal_skip_len=8), heads=2)
def _(g, uneven):
    return dict(hidden_states=_r(g, 1, 16, 2, 8, 8), timestep=torch.tensor([500]),
                encoder_hidden_states=_r(g, 1, 12, 32), encoder_hidden_states_image=None)


@E("cogview3plus", "CogView3PlusTransformer2DModel", dict(
    patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4, out_channels=4,
    text_embed_dim=8, time_embed_dim=8, condition_dim=2, pos_embed_max_size=8, sample_size=8), heads=4)
def _(g, uneven):
    return dict(hidden_states=_r(g, 1, 4, 8, 8), encoder_hidden_states=_r(g, 1, 8, 8),
                original_size=torch.tensor([[64, 64]]), target_size=torch.tensor([[64, 64]]),
                crop_coords=torch.tensor([[0, 0]]), timestep=torch.tensor([500]))


@E("consis_id", "ConsisIDTransformer3DModel", dict(
    num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2, text_embed_dim=8,
    num_layers=1, sample_width=8, sample_height=8, sample_frames=8, patch_size=2, temporal_compression_ratio=4,
    max_text_seq_length=8, cross_attn_interval=1, is_kps=False, is_train_face=True, cross_attn_dim_head=1,
    cross_attn_num_heads=1, LFE_id_dim=2, LFE_vit_dim=2, LFE_depth=5, LFE_dim_head=8, LFE_num_heads=2,
    LFE_num_id_token=1, LFE_num_querie=1, LFE_output_dim=10, LFE_ff_mult=1, LFE_num_scale=1), heads=2,
    note="face perceiver cross-attention written as matmul+softmax")
def _(g, uneven):
    return dict(hidden_states=_r(g, 1, 1, 4, 8, 8), encoder_hidden_states=_r(g, 1, 8, 8),
                timestep=torch.tensor([500]), id_vit_hidden=[torch.ones(1, 2, 2)], id_cond=torch.ones(1, 2))


@E("cosmos", "CosmosTransformer3DModel", dict(
    in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2, mlp_ratio=2,
    text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
    concat_padding_mask=False, extra_pos_embed_type="learnable"), heads=2)
def _(g, uneven):
    return dict(hidden_states=_r(g, 1, 4, 1, 16, 16), timestep=torch.tensor([500]),
                encoder_hidden_states=_r(g, 1, 12, 16), attention_mask=torch.ones(1, 12), fps=30)


@E("cosmos3_omni", "Cosmos3OmniTransformer", dict(
    head_dim=6, hidden_act="relu2", hidden_size=12, intermediate_size=24, latent_channel=2, latent_patch_size=1,
    num_attention_heads=2, num_hidden_layers=2, num_key_value_heads=1, patch_latent_dim=2, qk_norm_for_text=False,
    rms_norm_eps=1e-5, rope_axes_dim=[1, 1, 1], rope_theta=1e8, vocab_size=32), heads=2,
    note="packed mixture-of-transformers (text + vision) sequence; causal attention (is_causal=True) is masked by global position")
def _(g, uneven):
    h, w = 4, 4
    n = h * w
    seq = 2 + n
    idx = torch.arange(2, seq)
    return dict(input_ids=torch.tensor([1, 2]), text_indexes=torch.tensor([0, 1]),
                position_ids=torch.zeros(3, seq, dtype=torch.long), und_len=2, sequence_length=seq,
                vision_tokens=[_r(g, 1, 2, 1, h, w)], vision_token_shapes=[(1, h, w)], vision_sequence_indexes=idx,
                vision_mse_loss_indexes=idx, vision_timesteps=torch.ones(n),
                vision_noisy_frame_indexes=[torch.tensor([0])])


@E("dit", "DiTTransformer2DModel", dict(
    num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2, norm_num_groups=1,
    sample_size=8, patch_size=2, num_embeds_ada_norm=10), heads=4)
def _(g, uneven):
    hw = (6, 6) if uneven else (8, 8)
    return dict(hidden_states=_r(g, 1, 4, *hw), timestep=torch.tensor([500]), class_labels=torch.tensor([3]))


@E("easy_animate", "EasyAnimateTransformer3DModel", dict(
    attention_head_dim=16, num_attention_heads=2, in_channels=4, mmdit_layers=2, num_layers=2, out_channels=4,
    patch_size=2, sample_height=60, sample_width=90, text_embed_dim=16, time_embed_dim=8,
    time_position_encoding_type="3d_rope", timestep_activation_fn="silu"), heads=2)
def _(g, uneven):
    return dict(hidden_states=_r(g, 1, 4, 2, 8, 8), timestep=torch.tensor([500]), timestep_cond=None,
                encoder_hidden_states=_r(g, 1, 16, 16), encoder_hidden_states_t5=None, inpaint_latents=None,
                control_latents=None)


@E("ernie_image", "ErnieImageTransformer2DModel", dict(
    hidden_size=32, num_attention_heads=2, num_layers=2, ffn_hidden_size=32, in_channels=16, out_channels=16,
    patch_size=1, text_in_dim=16, rope_theta=256, rope_axes_dim=(8, 4, 4), eps=1e-6, qk_layernorm=True), heads=2)
def _(g, uneven):
    return dict(hidden_states=_r(g, 1, 16, 4, 4), timestep=torch.tensor([1.0]), text_bth=_r(g, 1, 8, 16),
                text_lens=torch.tensor([8]))


@E("flux2", "Flux2Transformer2DModel", dict(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=4,
    joint_attention_dim=32, timestep_guidance_channels=16, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4),
    guidance_embeds=True), heads=4)
def _(g, uneven):
    h, w = _hw(uneven)
    img_ids, txt_ids = _ids(h, w, _txt(uneven), axes=4)
    return dict(hidden_states=_r(g, 1, h * w, 16), encoder_hidden_states=_r(g, 1, _txt(uneven), 32),
                timestep=torch.tensor([0.5]), img_ids=img_ids[None], txt_ids=txt_ids[None],
                guidance=torch.full((1,), 4.0))


@E("glm_image", "GlmImageTransformer2DModel", dict(
    patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
    text_embed_dim=32, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=64), heads=2)
def _(g, uneven):
    return dict(hidden_states=_r(g, 1, 4, 8, 8), encoder_hidden_states=_r(g, 1, 12, 32),
                prior_token_id=torch.randint(0, 64, (1,), generator=g), prior_token_drop=torch.zeros(1, dtype=torch.bool),
                timestep=torch.tensor([500]), target_size=torch.tensor([[8.0, 8.0]]),
                crop_coords=torch.tensor([[0.0, 0.0]]))


@E("helios", "HeliosTransformer3DModel", dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
    freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_dim=(4, 4, 4),
    has_multi_term_memory_patch=True, guidance_cross_attn=True, zero_history_timestep=True,
    is_amplify_history=False), heads=2, note="multi-term memory (history latents) patches")
def _(g, uneven):
    f, h, w = 2, 8, 8
    return dict(hidden_states=_r(g, 1, 4, f, h, w), timestep=torch.tensor([500]),
                encoder_hidden_states=_r(g, 1, 12, 16), indices_hidden_states=torch.ones(1, f),
                indices_latents_history_short=torch.ones(1, f - 1), indices_latents_history_mid=torch.ones(1, f - 1),
                indices_latents_history_long=torch.ones(1, (f - 1) * 4),
                latents_history_short=_r(g, 1, 4, f - 1, h, w), latents_history_mid=_r(g, 1, 4, f - 1, h, w),
                latents_history_long=_r(g, 1, 4, (f - 1) * 4, h, w))


@E("hidream", "HiDreamImageTransformer2DModel", dict(
    patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
    num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2, num_activated_experts=2,
    axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=(0, 1), force_inference_output=True), heads=4,
    note="MoE feed-forward (data-dependent routing breaks the graph)")
def _(g, uneven):
    return dict(hidden_states=_r(g, 1, 4, 16, 16), encoder_hidden_states_t5=_r(g, 1, 8, 8),
                encoder_hidden_states_llama3=_r(g, 2, 1, 8, 4), pooled_embeds=_r(g, 1, 8),
                timesteps=torch.tensor([500]))


@E("hunyuan_dit", "HunyuanDiT2DModel", dict(
    num_attention_heads=4, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8, hidden_size=32,
    num_layers=2, mlp_ratio=2.0, learn_sigma=True, cross_attention_dim=16, norm_type="layer_norm",
    cross_attention_dim_t5=16, pooled_projection_dim=16, text_len=7, text_len_t5=7,
    use_style_cond_and_image_meta_size=True), heads=4, note="U-ViT long skips; nn.MultiheadAttention text pooling")
def _(g, uneven):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    rope = get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4), output_type="pt")
    return dict(hidden_states=_r(g, 1, 4, 8, 8), timestep=torch.tensor([500.0]),
                encoder_hidden_states=_r(g, 1, 7, 16), text_embedding_mask=torch.ones(1, 7, dtype=torch.int64),
                encoder_hidden_states_t5=_r(g, 1, 7, 16), text_embedding_mask_t5=torch.ones(1, 7, dtype=torch.int64),
                image_meta_size=torch.tensor([[64, 64, 64, 64, 0, 0]], dtype=torch.float32),
                style=torch.tensor([0]), image_rotary_emb=rope)


@E("hunyuan_video15", "HunyuanVideo15Transformer3DModel", dict(
    in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2, num_refiner_layers=1,
    mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12,
    rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v"), heads=2)
def _(g, uneven):
    return dict(hidden_states=_r(g, 1, 4, 1, 8, 8), timestep=torch.tensor([1.0]),
                encoder_hidden_states=_r(g, 1, 6, 16), encoder_hidden_states_2=_r(g, 1, 4, 8),
                encoder_attention_mask=torch.ones(1, 6), encoder_attention_mask_2=torch.ones(1, 4),
                image_embeds=torch.zeros(1, 3, 12))


@E("hunyuan_video_framepack", "HunyuanVideoFramepackTransformer3DModel", dict(
    in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1, num_single_layers=1,
    num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
    pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type=None, has_image_proj=True,
    image_proj_dim=16, has_clean_x_embedder=True), heads=2, note="framepack: clean/history latents concatenated")
def _(g, uneven):
    f, h, w = 3, 4, 4
    return dict(hidden_states=_r(g, 1, 4, f, h, w), timestep=torch.tensor([500]),
                encoder_hidden_states=_r(g, 1, 12, 16), pooled_projections=_r(g, 1, 8),
                encoder_attention_mask=torch.ones(1, 12), guidance=torch.tensor([500]), image_embeds=_r(g, 1, 12, 16),
                indices_latents=torch.ones(3), latents_clean=_r(g, 1, 4, f - 1, h, w),
                indices_latents_clean=torch.ones(f - 1), latents_history_2x=_r(g, 1, 4, f - 1, h, w),
                indices_latents_history_2x=torch.ones(f - 1), latents_history_4x=_r(g, 1, 4, (f - 1) * 4, h, w),
                indices_latents_history_4x=torch.ones((f - 1) * 4))


@E("ideogram4", "Ideogram4Transformer2DModel", dict(
    in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4, intermediate_size=32, adaln_dim=16,
    llm_features_dim=24, rope_theta=10_000, mrope_section=(2, 1, 1), norm_eps=1e-5), heads=4,
    note="packed text+image sequence with segment ids")
def _(g, uneven):
    from diffusers.models.transformers import transformer_ideogram4 as m

    t, side = 4, 4
    n = side * side
    seq = t + n
    hs = torch.zeros(1, seq, 16)
    hs[:, t:] = _r(g, 1, n, 16)
    ehs = torch.zeros(1, seq, 24)
    ehs[:, :t] = _r(g, 1, t, 24)
    pos = torch.zeros(1, seq, 3, dtype=torch.long)
    pos[:, :t] = torch.arange(t)[:, None]
    pos[:, t:, 0] = m.IMAGE_POSITION_OFFSET
    pos[:, t:, 1] = torch.arange(side).repeat_interleave(side) + m.IMAGE_POSITION_OFFSET
    pos[:, t:, 2] = torch.arange(side).repeat(side) + m.IMAGE_POSITION_OFFSET
    ind = torch.empty(1, seq, dtype=torch.long)
    ind[:, :t] = m.LLM_TOKEN_INDICATOR
    ind[:, t:] = m.OUTPUT_IMAGE_INDICATOR
    return dict(hidden_states=hs, encoder_hidden_states=ehs, timestep=torch.tensor([0.5]), position_ids=pos,
                segment_ids=torch.ones(1, seq, dtype=torch.long), indicator=ind)


@E("joy_image_edit", "JoyImageEditTransformer3DModel", dict(
    patch_size=[1, 2, 2], in_channels=16, hidden_size=32, num_attention_heads=2, text_dim=16, num_layers=2,
    rope_dim_list=[4, 6, 6], theta=256), heads=2)
def _(g, uneven):
    return dict(hidden_states=_r(g, 1, 16, 1, 8, 8), encoder_hidden_states=_r(g, 1, 12, 16), timestep=torch.tensor([1.0]))


@E("joy_image_edit_plus", "JoyImageEditPlusTransformer3DModel", dict(
    patch_size=[1, 2, 2], in_channels=16, hidden_size=32, num_attention_heads=2, text_dim=16, num_layers=2,
    rope_dim_list=[4, 6, 6], theta=256), heads=2, note="several conditioning images concatenated as tokens")
def _(g, uneven):
    # hidden_states are patches [B, N, C, pt, ph, pw]: a 2x2 target and a 2x2 reference image
    return dict(hidden_states=_r(g, 1, 8, 16, 1, 2, 2), encoder_hidden_states=_r(g, 1, 12, 16),
                timestep=torch.tensor([1.0]), shape_list=[[(1, 2, 2), (1, 2, 2)]])


@E("kandinsky6", "Kandinsky6Transformer3DModel", dict(
    in_visual_dim=4, out_visual_dim=4, in_text_dim=8, in_text_dim2=8, time_dim=16, patch_size=(1, 2, 2), model_dim=48,
    ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 4, 4), visual_cond=True, in_audio_dim=4,
    out_audio_dim=4), heads=4)
def _(g, uneven):
    f, h, w = 2, 8, 8  # [B, T, H, W, 2 * in_visual_dim + 1]: latent, conditioning latent, mask
    return dict(hidden_states=_r(g, 1, f, h, w, 9), encoder_hidden_states=_r(g, 1, 6, 8),
                pooled_projections=_r(g, 1, 8), timestep=torch.tensor([500.0]))


@E("krea2", "Krea2Transformer2DModel", dict(
    in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=32, timestep_embed_dim=8, text_hidden_dim=16, num_text_layers=3, text_num_attention_heads=2,
    text_num_key_value_heads=1, text_intermediate_size=16, num_layerwise_text_blocks=1, num_refiner_text_blocks=1,
    axes_dims_rope=(4, 2, 2), rope_theta=1000.0, norm_eps=1e-5), heads=4, note="GQA, text key mask")
def _(g, uneven):
    t, side = 4, 4
    pos = torch.zeros(t + side * side, 3)
    pos[t:, 1] = torch.arange(side).repeat_interleave(side)
    pos[t:, 2] = torch.arange(side).repeat(side)
    mask = torch.ones(1, t, dtype=torch.bool)
    mask[:, -1] = False
    return dict(hidden_states=_r(g, 1, side * side, 16), encoder_hidden_states=_r(g, 1, t, 3, 16),
                timestep=torch.tensor([0.5]), position_ids=pos, encoder_attention_mask=mask)


@E("latte", "LatteTransformer3DModel", dict(
    sample_size=8, num_layers=2, patch_size=2, attention_head_dim=4, num_attention_heads=2, caption_channels=8,
    in_channels=4, cross_attention_dim=8, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    video_length=2), heads=2,
    note="temporal attention folds the spatial tokens into the batch dim ([B*HW, F, D]): the spatial tokens are sharded, the frames attention runs locally on the sharded batch dim")
def _(g, uneven):
    return dict(hidden_states=_r(g, 1, 4, 2, 8, 8), encoder_hidden_states=_r(g, 1, 8, 8), timestep=torch.tensor([500]),
                enable_temporal_attentions=True)


@E("longcat_audio_dit", "LongCatAudioDiTTransformer", dict(
    dit_dim=64, dit_depth=2, dit_heads=4, dit_text_dim=32, latent_dim=8, text_conv=False), heads=4, note="audio 1-D")
def _(g, uneven):
    n = 15 if uneven else 16
    return dict(hidden_states=_r(g, 1, n, 8), encoder_hidden_states=_r(g, 1, 10, 32),
                encoder_attention_mask=torch.ones(1, 10, dtype=torch.bool),
                attention_mask=torch.ones(1, n, dtype=torch.bool), timestep=torch.ones(1))


@E("longcat_image", "LongCatImageTransformer2DModel", dict(
    patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]), heads=2)
def _(g, uneven):
    h, w = _hw(uneven)
    img_ids, txt_ids = _ids(h, w, 12)
    return dict(hidden_states=_r(g, 1, h * w, 4), encoder_hidden_states=_r(g, 1, 12, 32), img_ids=img_ids,
                txt_ids=txt_ids, timestep=torch.tensor([1.0]), guidance=torch.tensor([3.5]))


@E("ltx_video", "LTXVideoTransformer3DModel", dict(
    in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
    cross_attention_dim=32, num_layers=2, caption_channels=16), heads=4)
def _(g, uneven):
    f, h, w = (3, 3, 5) if uneven else (2, 4, 4)
    txt = _txt(uneven)
    mask = torch.ones(1, txt, dtype=torch.int64)
    mask[:, -2:] = 0
    return dict(hidden_states=_r(g, 1, f * h * w, 8), encoder_hidden_states=_r(g, 1, txt, 16),
                timestep=torch.tensor([500]), encoder_attention_mask=mask, num_frames=f, height=h, width=w)


@E("ltx2_video", "LTX2VideoTransformer3DModel", dict(
    in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
    cross_attention_dim=32, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=4,
    audio_attention_head_dim=8, audio_cross_attention_dim=32, num_layers=2, caption_channels=16,
    rope_double_precision=False), heads=4, note="joint audio+video streams with audio<->video cross-attention")
def _(g, uneven):
    f, h, w = (3, 3, 5) if uneven else (2, 4, 4)
    txt, af = _txt(uneven), (5 if uneven else 8)
    return dict(hidden_states=_r(g, 1, f * h * w, 8), audio_hidden_states=_r(g, 1, af, 4),
                encoder_hidden_states=_r(g, 1, txt, 16), audio_encoder_hidden_states=_r(g, 1, txt, 16),
                timestep=torch.tensor([500.0]), num_frames=f, height=h, width=w, audio_num_frames=af)


@E("lumina2", "Lumina2Transformer2DModel", dict(
    sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1,
    num_attention_heads=4, num_kv_heads=2, multiple_of=2, ffn_dim_multiplier=None, norm_eps=1e-5, scaling_factor=1.0,
    axes_dim_rope=(4, 2, 2), axes_lens=(128, 128, 128), cap_feat_dim=32), heads=4,
    note="per-sample caption lengths via .tolist() break the graph")
def _(g, uneven):
    return dict(hidden_states=_r(g, 1, 4, 8, 8), encoder_hidden_states=_r(g, 1, 8, 32), timestep=torch.tensor([0.5]),
                encoder_attention_mask=torch.ones(1, 8, dtype=torch.bool))


@E("lumina_next", "LuminaNextDiT2DModel", dict(
    sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2,
    multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5, learn_sigma=True, qk_norm=True, cross_attention_dim=16,
    scaling_factor=1.0), heads=4)
def _(g, uneven):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    txt = _txt(uneven)
    mask = torch.ones(1, txt, dtype=torch.int64)
    mask[:, -2:] = 0
    return dict(hidden_states=_r(g, 1, 4, *_hw(uneven, (8, 8), (6, 10))), timestep=torch.tensor([0.5]),
                encoder_hidden_states=_r(g, 1, txt, 16), encoder_mask=mask,
                image_rotary_emb=get_2d_rotary_pos_embed_lumina(8, 16, 16), cross_attention_kwargs={})


@E("minimax_h3", "MiniMaxH3Transformer3DModel", dict(
    num_attention_heads=2, attention_head_dim=16, hidden_size=24, num_layers=2, num_refiner_layers=1, ffn_dim=32,
    in_channels=4, audio_in_channels=6, patch_size=(1, 2, 2), text_dim=8, freq_dim=8, time_embed_hidden_dim=24,
    time_embed_dim=16, rope_freq_dim=2), heads=2, note="packed text+audio+video sequence with index tensors")
def _(g, uneven):
    nt, na, nv = 4, 6, 16
    seq = nt + na + nv
    ti, ai, vi = torch.arange(nt), torch.arange(nt, nt + na), torch.arange(nt + na, seq)
    tags = torch.empty(seq, dtype=torch.long)
    tags[ti], tags[ai], tags[vi] = 1, 2, 0
    tidx = torch.zeros(seq, dtype=torch.long)
    tidx[ai] = 1
    pos = torch.zeros(seq, 3)
    pos[:, 0] = torch.arange(seq, dtype=torch.float32)
    pos[vi, 1] = (torch.arange(nv) // 4).float()
    pos[vi, 2] = (torch.arange(nv) % 4).float()
    return dict(hidden_states=_r(g, 1, nv, 16), audio_hidden_states=_r(g, 1, na, 6), encoder_hidden_states=_r(g, 1, nt, 8),
                timestep=torch.tensor([0.7, 0.3]), timestep_indices=tidx, token_tags=tags, position_ids=pos,
                video_indices=vi, audio_indices=ai, text_indices=ti)


@E("minimax_music3", "MiniMaxMusic3Transformer1DModel", dict(
    in_channels=8, condition_dim=16, num_layers=2, num_attention_heads=2, attention_head_dim=8, ff_inner_dim=32,
    rotary_dim=4, fourier_embedding_dim=8), heads=2, note="audio 1-D")
def _(g, uneven):
    n = 23 if uneven else 24
    return dict(hidden_states=_r(g, 1, 8, n), encoder_hidden_states=_r(g, 1, n, 16), timestep=torch.tensor([0.5]))


@E("mochi", "MochiTransformer3DModel", dict(
    patch_size=2, num_attention_heads=4, attention_head_dim=16, num_layers=2, pooled_projection_dim=16, in_channels=4,
    out_channels=4, text_embed_dim=16, time_embed_dim=4, max_sequence_length=16), heads=4,
    note="per-sample text compaction (nonzero) inside a Python loop over the batch in the attention processor: dynamo cannot resume a break inside that loop and runs the whole processor eagerly, so no captured graph holds its attention (eager attention is not parallelized: the census counts 3 calls, 0 sharded)")
def _(g, uneven):
    f, h, w = (3, 6, 6) if uneven else (2, 4, 8)
    txt = _txt(uneven)
    mask = torch.ones(1, txt, dtype=torch.int64)
    mask[:, -2:] = 0
    return dict(hidden_states=_r(g, 1, 4, f, h, w), encoder_hidden_states=_r(g, 1, txt, 16),
                timestep=torch.tensor([500]), encoder_attention_mask=mask)


@E("motif_video", "MotifVideoTransformer3DModel", dict(
    in_channels=33, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=1, num_single_layers=1,
    num_decoder_layers=0, mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm", norm_type="layer_norm",
    text_embed_dim=32, image_embed_dim=4, rope_theta=256.0, rope_axes_dim=(4, 4, 4),
    enable_text_cross_attention_dual=False, enable_text_cross_attention_single=False), heads=2)
def _(g, uneven):
    return dict(hidden_states=_r(g, 1, 33, 3, 4, 4), encoder_hidden_states=_r(g, 1, 12, 32), timestep=torch.tensor([500]))


_NUCLEUS = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
                joint_attention_dim=16, axes_dims_rope=(8, 4, 4), capacity_factors=[8.0, 8.0])


@E("nucleus_moe_image", "NucleusMoEImageTransformer2DModel", dict(_NUCLEUS, moe_enabled=False), heads=4,
   note="joint KV: image queries attend to [image; text]")
def _nucleus_inputs(g, uneven):
    h, w = 4, 4
    return dict(hidden_states=_r(g, 1, h * w, 16), encoder_hidden_states=_r(g, 1, 8, 16),
                encoder_hidden_states_mask=torch.ones(1, 8, dtype=torch.long), timestep=torch.tensor([1.0]),
                img_shapes=[(1, h, w)])


E("nucleus_moe_image_moe", "NucleusMoEImageTransformer2DModel", dict(_NUCLEUS, moe_enabled=True), heads=4,
  note="MoE variant (token-choice routing with capacity)")(_nucleus_inputs)


@E("omnigen", "OmniGenTransformer2DModel", dict(
    hidden_size=16, num_attention_heads=4, num_key_value_heads=4, intermediate_size=32, num_layers=2, pad_token_id=0,
    vocab_size=1000, in_channels=4, time_step_dim=4,
    rope_scaling={"long_factor": list(range(1, 3)), "short_factor": list(range(1, 3))}), heads=4,
    note="packed LLM sequence, full [L, L] mask, data-dependent branch")
def _(g, uneven):
    h = w = 8
    seq = 24
    attn = seq + 1 + h * w // 4
    return dict(hidden_states=_r(g, 1, 4, h, w), timestep=torch.tensor([0.5]),
                input_ids=torch.randint(0, 10, (1, seq), generator=g), input_img_latents=[_r(g, 1, 4, h, w)],
                input_image_sizes={0: [[0, h * w // 4]]}, attention_mask=torch.ones(1, attn, attn),
                position_ids=torch.arange(attn)[None])


@E("ovis_image", "OvisImageTransformer2DModel", dict(
    patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8)), heads=2)
def _(g, uneven):
    h, w = _hw(uneven)
    img_ids, txt_ids = _ids(h, w, 12)
    return dict(hidden_states=_r(g, 1, h * w, 4), encoder_hidden_states=_r(g, 1, 12, 32), img_ids=img_ids,
                txt_ids=txt_ids, timestep=torch.tensor([1.0]))


@E("prx", "PRXTransformer2DModel", dict(
    in_channels=16, patch_size=2, context_in_dim=32, hidden_size=64, mlp_ratio=2.0, num_heads=4, depth=2,
    axes_dim=[8, 8], theta=10_000), heads=4, note="joint KV: image queries attend to [text; image]")
def _(g, uneven):
    return dict(hidden_states=_r(g, 1, 16, 8, 8), encoder_hidden_states=_r(g, 1, 8, 32), timestep=torch.tensor([1.0]))


@E("qwen_image", "QwenImageTransformer2DModel", dict(
    patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
    joint_attention_dim=16, axes_dims_rope=(4, 6, 6)), heads=4)
def _(g, uneven):
    h, w = _hw(uneven)
    txt = _txt(uneven)
    mask = torch.ones(1, txt, dtype=torch.int64)
    mask[:, -2:] = 0
    return dict(hidden_states=_r(g, 1, h * w, 16), encoder_hidden_states=_r(g, 1, txt, 16),
                encoder_hidden_states_mask=mask, timestep=torch.tensor([0.5]), img_shapes=[(1, h, w)])


@E("qwen_image21", "QwenImage21Transformer2DModel", dict(
    patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=4,
    context_in_dim=16, mlp_ratio=2, axes_dims_rope=(4, 6, 6)), heads=4,
    note="condition image interleaved in the text; 2x2 slot expansion; block-causal prefill runs one SDPA per "
         "segment on q[:, start:end] against the key prefix k[:, :end]; query rows fully masked within one ring "
         "chunk merge with weight 0")
def _(g, uneven):
    h, w = (4, 6) if uneven else (4, 4)
    txt = 8
    # one 2x2 condition image (one VLM slot) inside the text, then the target image's slots
    img_mask = torch.zeros(1, txt + h * w // 4, dtype=torch.bool)
    img_mask[:, 3] = True
    img_mask[:, txt:] = True
    mask = torch.ones(1, txt, dtype=torch.bool)
    mask[:, -2:] = False
    return dict(hidden_states=_r(g, 1, 4 + h * w, 16), encoder_hidden_states=_r(g, 1, txt, 16),
                timestep=torch.tensor([0.5]), img_shapes=[[(1, 2, 2), (1, h, w)]], img_mask=img_mask,
                encoder_hidden_states_mask=mask)


@E("sana_wm", "SanaWMTransformer3DModel", dict(
    in_channels=8, num_layers=2, hidden_size=64, num_attention_heads=4, softmax_every_n=2, linear_head_dim=16,
    caption_channels=16, chunk_plucker_channels=48, chunk_plucker_post_attn_blocks=2, mlp_ratio=2.0,
    mixed_precision="fp32"), heads=4,
    note="camera-conditioned (UCPE) world model: one gated-delta-net linear-attention block, one softmax block; "
         "Plucker rays added after attention. Its attention casts q, k, v to bf16: ring=2 (fp32 chunks) matches the "
         "fp32-attention reference (its 6e-5 against the bf16 one is the kernel's rounding); the gated delta net's "
         "chunked scan over frames (flip, causal conv, per-chunk views) gathers")
def _(g, uneven):
    f, h, w = (3, 3, 5) if uneven else (2, 4, 4)
    txt = _txt(uneven)
    return dict(hidden_states=_r(g, 1, 8, f, h, w), timestep=torch.full((1, 1, f), 500.0),
                encoder_hidden_states=_r(g, 1, 1, txt, 16), encoder_attention_mask=torch.ones(1, txt),
                camera_conditions=_camera(g, f, h, w), chunk_plucker=_r(g, 1, 48, f, h, w))


def _camera(g: torch.Generator, f: int, h: int, w: int) -> torch.Tensor:
    """(1, f, 20) pinhole cameras: camera-to-world (identity rotation, a small random translation per frame,
    flattened 4x4) then fx, fy, cx, cy in pixels.  A random 4x4 would be ill-conditioned to invert."""
    c2w = torch.eye(4).repeat(f, 1, 1)
    c2w[:, :3, 3] = 0.1 * _r(g, f, 3)
    intr = torch.tensor([float(w), float(h), w / 2, h / 2]).repeat(f, 1)
    return torch.cat([c2w.reshape(f, 16), intr], dim=1)[None]


_SANA_WM_REFINER = dict(
    in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
    cross_attention_dim=32, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=4,
    audio_attention_head_dim=8, audio_cross_attention_dim=32, num_layers=2, caption_channels=16,
    rope_double_precision=False)


@E("sana_wm_refiner", "SanaWMLTX2RefinerTransformer3DModel", _SANA_WM_REFINER, heads=4,
   note="video RoPE precomputed for absolute frame positions (no KV cache: plain full self-attention)")
def _(g, uneven):
    f, h, w = (3, 3, 5) if uneven else (2, 4, 4)
    # the RoPE is a pure function of the config: build it from a throwaway instance's helper
    rope = _cls("SanaWMLTX2RefinerTransformer3DModel")(**_SANA_WM_REFINER).build_rotary_emb_for_absolute_positions(
        1, list(range(3, 3 + f)), h, w, torch.device("cpu"), 24.0)
    txt = _txt(uneven)
    return dict(hidden_states=_r(g, 1, f * h * w, 8), encoder_hidden_states=_r(g, 1, txt, 16),
                timestep=torch.full((1, f * h * w), 500.0), video_rotary_emb=rope,
                encoder_attention_mask=torch.ones(1, txt))


@E("sana", "SanaTransformer2DModel", dict(
    in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=8, num_layers=2,
    num_cross_attention_heads=4, cross_attention_head_dim=8, cross_attention_dim=32, caption_channels=16,
    mlp_ratio=2.5, sample_size=8, patch_size=1), heads=4, note="ReLU linear self-attention: K^T V over the sharded tokens is all-reduced; Mix-FFN depthwise conv on row-sharded (H, W) grids with halo rows")
def _(g, uneven):
    return dict(hidden_states=_r(g, 1, 4, *_hw(uneven)), encoder_hidden_states=_r(g, 1, _txt(uneven), 16),
                timestep=torch.tensor([500.0]))


@E("sana_video", "SanaVideoTransformer3DModel", dict(
    in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=2,
    num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=16,
    mlp_ratio=2.5, dropout=0.0, attention_bias=False, sample_size=8, patch_size=(1, 2, 2),
    norm_elementwise_affine=False, norm_eps=1e-6, qk_norm="rms_norm_across_heads", rope_max_seq_len=32), heads=2,
    note="linear self-attention with RoPE (K^T V and sum of K all-reduced); the (F, H, W) grid is sharded by whole frames, its temporal conv gets halo frames (2 frames on 4 ranks do not split: the 4-process plan gathers there)")
def _(g, uneven):
    return dict(hidden_states=_r(g, 1, 16, 2, 8, 8), encoder_hidden_states=_r(g, 1, 12, 16), timestep=torch.tensor([500]))


@E("skyreels_v2", "SkyReelsV2Transformer3DModel", dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=16,
    freq_dim=16, ffn_dim=64, num_layers=2, rope_max_seq_len=32), heads=4)
def _(g, uneven):
    f, h, w = (3, 6, 6) if uneven else (2, 4, 8)
    return dict(hidden_states=_r(g, 1, 4, f, h, w), timestep=torch.tensor([500]),
                encoder_hidden_states=_r(g, 1, _txt(uneven), 16))


@E("stable_audio", "StableAudioDiTModel", dict(
    sample_size=16, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
    num_key_value_attention_heads=2, out_channels=4, cross_attention_dim=16, time_proj_dim=8,
    global_states_input_dim=16, cross_attention_input_dim=16), heads=4, note="audio 1-D, GQA, prepended global token")
def _(g, uneven):
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    n = 15 if uneven else 16
    rope = get_1d_rotary_pos_embed(4, n + 1, use_real=True, repeat_interleave_real=False)
    return dict(hidden_states=_r(g, 1, 4, n), timestep=torch.tensor([500]), encoder_hidden_states=_r(g, 1, _txt(uneven), 16),
                global_hidden_states=_r(g, 1, 1, 16), rotary_embedding=rope)


@E("stable_audio3", "StableAudio3DiTModel", dict(
    io_channels=8, patch_size=1, embed_dim=32, depth=2, num_heads=4, cond_token_dim=16, global_cond_dim=12,
    local_add_cond_dim=5, timestep_features_dim=16, ff_mult=2, num_memory_tokens=3, use_differential_attention=False),
    heads=4, note="audio 1-D with prepended memory tokens")
def _(g, uneven):
    n = 15 if uneven else 16
    return dict(hidden_states=_r(g, 1, 8, n), timestep=torch.rand(1, generator=g), encoder_hidden_states=_r(g, 1, 4, 16),
                global_hidden_states=_r(g, 1, 12))


@E("wan_animate", "WanAnimateTransformer3DModel", dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=12, latent_channels=4,
    out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", image_dim=16, rope_max_seq_len=32,
    motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}, motion_encoder_size=16, motion_style_dim=8,
    motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
    inject_face_latents_blocks=2), heads=2, note="pose/face control, image cross-attention; the face adapter unflattens tokens into (frames, tokens per frame) for a per-frame cross-attention: the frames are sharded with the tokens, 21 frames over 2 ranks with the sequence padded to whole frames per rank (11 + 11, the last one zeros)")
def _(g, uneven):
    f, h, w = 20, 8, 8  # the motion path needs 21 | (frames + 1)
    return dict(hidden_states=_r(g, 1, 12, f + 1, h, w), timestep=torch.tensor([500]),
                encoder_hidden_states=_r(g, 1, 12, 16), encoder_hidden_states_image=_r(g, 1, 12, 16),
                pose_hidden_states=_r(g, 1, 4, f, h, w), face_pixel_values=_r(g, 1, 3, 77, 16, 16))


@E("wan_animate2", "WanAnimate2Transformer3DModel", dict(
    patch_size=(1, 2, 2), text_len=16, in_dim=8, dim=48, ffn_dim=64, freq_dim=32, text_dim=16, out_dim=4, num_heads=4,
    num_layers=2, use_img_emb=False), heads=4,
    note="reference pass (kv_cache_mode='extract', dense self-attention); rope_apply loops over grid_sizes.tolist() "
         "inside the attention processor, which breaks the graph around the SDPA: its graph gets q, k and v as "
         "separate inputs, so its queries are sharded with K/V whole (the cross-attention's graph likewise); every "
         "graph boundary gathers the sequence; the generation pass uses a flex BlockMask")
def _(g, uneven):
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    f, h, w = (3, 6, 10) if uneven else (2, 8, 8)
    return dict(hidden_states=[_r(g, 4, f, h, w)], timestep=torch.tensor([500.0]),
                encoder_hidden_states=[_r(g, _txt(uneven), 16)], condition_latents=[_r(g, 4, f, h, w)],
                kv_cache=WanAnimate2KVCache(2), kv_cache_mode="extract", seq_len=f * h * w // 4,
                offset_grid_sizes=torch.tensor([[f, h // 2, w // 2]]))


@E("wan_vace", "WanVACETransformer3DModel", dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16, text_dim=32,
    freq_dim=32, ffn_dim=32, num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32, vace_layers=[0, 2], vace_in_channels=48), heads=2, note="VACE control blocks (hints added)")
def _(g, uneven):
    return dict(hidden_states=_r(g, 1, 16, 2, 8, 8), encoder_hidden_states=_r(g, 1, 12, 32),
                control_hidden_states=_r(g, 1, 48, 2, 8, 8), timestep=torch.tensor([500]))


@E("z_image", "ZImageTransformer2DModel", dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=4,
    n_kv_heads=4, cap_feat_dim=16, axes_dims=[2, 2, 4], axes_lens=[256, 64, 64]), heads=4,
    note="refiners, then one unified sequence; list inputs")
def _(g, uneven):
    return dict(x=[_r(g, 4, 1, *_hw(uneven, (8, 8), (6, 10)))], t=torch.tensor([0.5]), cap_feats=[_r(g, _txt(uneven), 16)])


@E("flux3", "Flux3Transformer2DModel", dict(
    in_channels=16, cond_in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, timestep_channels=32, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4)),
    heads=2)
def _(g, uneven):
    h, w = _hw(uneven)
    img_ids, txt_ids = _ids(h, w, 8, axes=4)
    return dict(hidden_states=_r(g, 1, h * w, 16), encoder_hidden_states=_r(g, 1, 8, 32), timestep=torch.tensor([0.5]),
                img_ids=img_ids, txt_ids=txt_ids)


@E("hunyuan_image", "HunyuanImageTransformer2DModel", dict(
    in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
    num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=16, rope_axes_dim=(4, 4)), heads=2,
    note="text compaction by boolean mask (nonzero) breaks the graph")
def _(g, uneven):
    return dict(hidden_states=_r(g, 1, 4, 4, 4), timestep=torch.tensor([500.0]), encoder_hidden_states=_r(g, 1, 6, 16),
                encoder_attention_mask=torch.ones(1, 6))


@E("kandinsky5", "Kandinsky5Transformer3DModel", dict(
    in_visual_dim=4, in_text_dim=8, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
    model_dim=48, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 4, 4)), heads=4)
def _(g, uneven):
    f, h, w = 2, 8, 8
    return dict(hidden_states=_r(g, 1, f, h, w, 4), encoder_hidden_states=_r(g, 1, 6, 8), timestep=torch.tensor([500.0]),
                pooled_projections=_r(g, 1, 8), visual_rope_pos=[torch.arange(f), torch.arange(h // 2), torch.arange(w // 2)],
                text_rope_pos=torch.arange(6))


@E("kandinsky6_sr", "Kandinsky6SRTransformer3DModel", dict(
    in_visual_dim=4, out_visual_dim=4, time_dim=16, patch_size=(1, 1, 1), model_dim=48, ff_dim=64,
    num_visual_blocks=2, axes_dims=(4, 4, 4)), heads=4, note="NABLA sparse attention through flex_attention (its block mask becomes a mask over global positions; the NABLA mask is built from the tokens, which gathers)")
def _(g, uneven):
    return dict(hidden_states=_r(g, 1, 2, 8, 8, 9), timestep=torch.tensor([500.0]))


# Core zoo entries that are diffusers classes (their configs live in core.py, used by the fast tests).
_CORE_CLASSES = {
    "flux": "FluxTransformer2DModel", "sd3": "SD3Transformer2DModel", "pixart": "PixArtTransformer2DModel",
    "wan": "WanTransformer3DModel", "hunyuan_video": "HunyuanVideoTransformer3DModel",
    "cogvideox": "CogVideoXTransformer3DModel", "cogview4": "CogView4Transformer2DModel",
}


def _with_source(entry: ZooModel, source: str) -> ZooModel:
    from dataclasses import replace

    return replace(entry, source=source)


COVERAGE_ZOO: dict[str, ZooModel] = {
    **{name: _with_source(_CORE[name], f"diffusers.{cls}") for name, cls in _CORE_CLASSES.items()},
    **{m.name: m for m in _ENTRIES},
}

# Classes of diffusers.models.transformers 0.42.x left out of the matrix, with the reason.
EXCLUDED: dict[str, str] = {
    "PriorTransformer": "not a DiT: predicts a CLIP image embedding from a handful of text tokens (no latent token grid)",
    "T5FilmDecoder": "not a DiT: spectrogram decoder conditioned by FiLM, no latent token sequence to shard",
    "TransformerTemporalModel": "a UNet building block (temporal attention over frames inside a UNet), not a standalone denoiser",
    "Transformer2DModel": "a UNet building block (spatial transformer behind a GroupNorm over all tokens), not a standalone denoiser",
    "DualTransformer2DModel": "a UNet building block (two Transformer2DModels mixed), not a standalone denoiser",
    "DreamLiteTransformer2DModel": "a UNet building block (GroupNorm over all tokens at the boundary), not a standalone denoiser",
    "MiniMaxMusic3RVQDepthDecoder": "not a DiT: autoregressive RVQ depth decoder (causal LM over codebooks)",
    "RFD4ProteinaTransformer": "not an image/video/audio DiT: protein structure model with a pair representation",
}

# In-scope classes without a tiny config yet: their forward needs structured inputs (KV-cache objects, camera
# conditioning) that a dummy-input generator does not produce; they count as failing in the report.
NOT_CONFIGURED: dict[str, str] = {
}
