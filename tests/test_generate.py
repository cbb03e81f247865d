"""`xdit-fx generate` and `xdit-fx demo`: flags, launching, errors before any process starts."""

from __future__ import annotations

import pytest
from PIL import Image

from xdit_fx.cli import main
from xdit_fx.generate import digit_labels


def test_digit_prompts():
    assert digit_labels(None) == list(range(10))
    assert digit_labels(["3", "0,1"]) == [3, 0, 1]
    with pytest.raises(ValueError, match="digits 0-9"):
        digit_labels(["cat"])


@pytest.mark.parametrize("argv, fragment", [
    (["--model", "/nonexistent/pipe"], "not a diffusers pipeline folder"),
    (["--ulysses_degree", "2", "--nproc", "3"], "ulysses(2) = 2 != world_size(3)"),
    (["--pipefusion_parallel_degree", "2", "--ulysses_degree", "2", "--ring_degree", "2", "--nproc", "4"],
     "pipefusion(2) * ring(2) * ulysses(2) = 8 != world_size(4)"),
    (["--pipefusion_parallel_degree", "2", "--warmup_steps", "-1"], "pipefusion_warmup_steps must be an integer >= 0"),
    (["--height", "32"], "16x16"),
])
def test_generate_errors_are_one_line(argv, fragment, capsys, tmp_path):
    assert main(["generate", *argv, "--num_inference_steps", "1", "--output", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xdit-fx generate: error:") and fragment in err and "Traceback" not in err


def test_generate_digits_with_cfg_parallel_on_two_processes(tmp_path, capsys):
    out = tmp_path / "digits.png"
    assert main(["generate", "--use_cfg_parallel", "--nproc", "2", "--num_inference_steps", "4",
                 "--prompt", "0,1,2", "--output", str(out)]) == 0
    report = capsys.readouterr().out
    assert "plan cfg=2 on 2 process(es)" in report and str(out) in report
    # the PNG is the grid of the single-process images (same seed, default 42): the serial images are drawn
    # here, rounded to 8 bits and tiled the same way. cfg=2 splits the batch, which changes no arithmetic
    # beyond rounding (~1e-6), so an 8-bit pixel moves by at most one step (measured: 0 pixels differ)
    import numpy as np
    import torch

    from xdit_fx.digits import load_pipeline, make_grid

    with torch.no_grad():
        serial = load_pipeline()([0, 1, 2], num_inference_steps=4, generator=torch.Generator().manual_seed(42),
                                 output_type="pil", progress=False).images
    batch = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)[None] for im in serial])
    want = np.asarray(make_grid(batch, nrow=3), dtype=np.int16)
    got = np.asarray(Image.open(out).convert("L"), dtype=np.int16)
    assert got.shape == want.shape == ((16 + 2) * 4, (3 * 17 + 1) * 4)
    assert np.abs(got - want).max() <= 1
    assert want.std() > 20  # digits on a dark ground, not a flat image (measured std 83)
