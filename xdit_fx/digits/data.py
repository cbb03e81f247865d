"""scikit-learn's bundled 8x8 digits, as the 16x16 images the embedded model is trained on.

The bundled set needs no download, which is why the project's own trained model is built on it. Images are
upsampled bilinearly to 16x16 so that a 2x2 patch grid gives 64 tokens (enough to shard over 4 ranks), and
scaled from the dataset's 0..16 ink levels to [-1, 1], the range the diffusion model works in.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def load_digit_images(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``(images (N, 1, size, size) in [-1, 1], labels (N,) int64)``."""
    raw, labels = _raw_digits()
    images = torch.from_numpy(raw)[:, None] / 8.0 - 1.0
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(-1.0, 1.0), torch.from_numpy(labels)
