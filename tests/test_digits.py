"""The embedded digits model: checkpoint, judge, sample quality, CFG modes, determinism.

Quality is asserted on the shipped weights at the pipeline's default settings, on 10 samples per class
(seconds on CPU); ``benchmarks/digit_accuracy.py`` measures it on larger samples.
"""

from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, DiTTransformer2DModel

from xdit_fx.digits import CHECKPOINT_DIR, DigitsPipeline, digit_accuracy, digit_classifier, load_pipeline, make_grid
from xdit_fx.digits.data import load_digit_images

MAX_CHECKPOINT_BYTES = 5 * 1024 * 1024
SEQUENCE_PARALLEL_DEGREES = (2, 4)


@pytest.fixture(scope="module")
def pipe() -> DigitsPipeline:
    return load_pipeline()


def _sample(pipe, labels, seed=0, **kwargs) -> torch.Tensor:
    return pipe(labels, generator=torch.Generator().manual_seed(seed), progress=False, **kwargs).images


def test_checkpoint_is_small_and_loads_through_from_pretrained(pipe):
    size = sum(f.stat().st_size for f in Path(CHECKPOINT_DIR).rglob("*") if f.is_file())
    assert size <= MAX_CHECKPOINT_BYTES
    assert isinstance(pipe, DiffusionPipeline)
    assert type(pipe.transformer) is DiTTransformer2DModel and pipe.transformer.dtype == torch.float32
    config = pipe.transformer.config
    assert config.out_channels == 1 and config.num_embeds_ada_norm == 10
    assert all(config.num_attention_heads % d == 0 for d in SEQUENCE_PARALLEL_DEGREES)
    assert (config.sample_size // config.patch_size) ** 2 == 64
    # the null label used for the unconditional half of CFG is a trained row of its own
    table = pipe.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == pipe.null_class + 1


def test_classifier_reads_real_digits():
    judge = digit_classifier()
    assert judge.held_out_accuracy >= 0.95
    images, labels = load_digit_images()
    assert digit_accuracy(images / 2 + 0.5, labels) >= 0.97  # the pipeline's [0, 1] range, all real digits


def test_default_settings_draw_the_requested_digits(pipe):
    labels = [c for c in range(10) for _ in range(10)]
    images = _sample(pipe, labels)
    assert images.shape == (100, 1, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert digit_accuracy(images, labels) >= 0.9


def test_batched_and_two_call_cfg_agree(pipe):
    """Same math; only the GEMM batch differs (2N rows vs N), which may reorder float32 sums. Rounding
    differences of ~1e-7 per op, carried through 20 Euler steps: measured 3e-7 on [0, 1] pixels, bound 10x."""
    labels = list(range(10))
    batched = _sample(pipe, labels, cfg_mode="batched")
    two_call = _sample(pipe, labels, cfg_mode="two_call")
    torch.testing.assert_close(batched, two_call, rtol=0, atol=3e-6)


def _count_calls(pipe, **kwargs) -> list[int]:
    batches = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kw: batches.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        _sample(pipe, [3, 7], num_inference_steps=4, **kwargs)
    finally:
        handle.remove()
    return batches


def test_transformer_calls_per_step(pipe):
    assert _count_calls(pipe, cfg_mode="batched") == [4] * 4
    assert _count_calls(pipe, cfg_mode="two_call") == [2] * 8
    assert _count_calls(pipe, guidance_scale=1.0, cfg_mode="two_call") == [2] * 4


def test_seeded_sampling_is_deterministic(pipe):
    labels = [0, 5, 9]
    assert torch.equal(_sample(pipe, labels, seed=1), _sample(pipe, labels, seed=1))
    assert not torch.equal(_sample(pipe, labels, seed=1), _sample(pipe, labels, seed=2))
    latents = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(_sample(pipe, labels, seed=1), pipe(labels, latents=latents, progress=False).images)


def test_output_types_and_grid(pipe):
    labels = [1, 2]
    arrays = _sample(pipe, labels, num_inference_steps=2, output_type="np")
    assert arrays.shape == (2, 16, 16, 1)
    pils = _sample(pipe, labels, num_inference_steps=2, output_type="pil")
    assert [p.size for p in pils] == [(16, 16)] * 2
    grid = make_grid(torch.rand(12, 1, 16, 16), nrow=10, scale=4, padding=1)
    assert grid.size == ((10 * 17 + 1) * 4, (2 * 17 + 1) * 4)


@pytest.mark.parametrize("bad", [dict(class_labels=[10]), dict(class_labels=[]), dict(class_labels=[1], cfg_mode="x"),
                                 dict(class_labels=[1], output_type="bmp")])
def test_bad_arguments_are_refused(pipe, bad):
    with pytest.raises(ValueError):
        pipe(progress=False, num_inference_steps=1, **bad)
