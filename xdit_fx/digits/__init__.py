"""The project's own small trained DiT: class-conditional 16x16 digits, shipped in the package.

Nothing can be downloaded in the environments this project is tested in, and random weights draw no
pictures; this model (0.8M parameters, trained in minutes on CPU from scikit-learn's bundled digits) makes
visible, checkable output possible anywhere::

    from xdit_fx.digits import digit_accuracy, load_pipeline, make_grid

    pipe = load_pipeline()                                  # DiTTransformer2DModel.from_pretrained(CHECKPOINT_DIR / "transformer")
    labels = list(range(10))
    images = pipe(labels, generator=torch.Generator().manual_seed(0)).images   # (10, 1, 16, 16) in [0, 1]
    make_grid(images, nrow=10).save("digits.png")
    print(digit_accuracy(images, labels))
"""

from xdit_fx.digits.metric import digit_accuracy, digit_classifier
from xdit_fx.digits.pipeline import CHECKPOINT_DIR, DigitsPipeline, load_pipeline, make_grid

__all__ = ["CHECKPOINT_DIR", "DigitsPipeline", "digit_accuracy", "digit_classifier", "load_pipeline", "make_grid"]
