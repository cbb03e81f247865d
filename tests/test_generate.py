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
    image = Image.open(out)
    assert image.size[0] > 3 * 16 and image.size[1] >= 16  # a 3-digit grid, upscaled
