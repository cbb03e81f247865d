"""`xdit-fx generate` and `xdit-fx demo`: flags, launching, errors before any process starts."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from xdit_fx.cli import main
from xdit_fx.cli.generate import digit_labels


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
    (["--negative_prompt", "7"], "--negative_prompt: the digits model has no such input"),
    (["--true_cfg_scale", "2"], "--true_cfg_scale: DigitsPipeline takes no 'true_cfg_scale' argument (use --guidance_scale)"),
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


# ---- pipeline folders: every mistake is one line and exit 2, before any process starts -------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    import tiny_pipelines as tp

    root = tmp_path_factory.mktemp("pipelines")
    return {name: tp.save_folder(name, root) for name in ("sd3", "pixart", "wan")}


def _one_line_error(capsys, argv) -> str:
    assert main(["generate", *argv]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("xdit-fx generate: error:"), captured.err
    return lines[0]


@pytest.mark.parametrize("model, argv, fragment", [
    ("sd3", ["--ulysses_degree", "8", "--nproc", "8"],
     "transformer: 4 attention heads (config.json) do not split over --ulysses_degree 8; use a ulysses degree in [1, 2, 4]"),
    ("sd3", ["--height", "18"], "--height 18: the VAE downsamples by 2 and transformer takes 2x2 patches, so height "
                                "must be a multiple of 4 (e.g. 16 or 20)"),
    ("pixart", ["--height", "16", "--width", "16", "--pipefusion_parallel_degree", "2", "--num_pipeline_patch", "3"],
     "PipeFusion: 16x16 gives 16 image tokens, which do not split into 3 patches"),
    ("sd3", ["--true_cfg_scale", "4"], "--true_cfg_scale: StableDiffusion3Pipeline takes no 'true_cfg_scale' argument "
                                       "(use --guidance_scale)"),
    ("pixart", ["--max_sequence_length", "8", "--num_frames", "3"], "--num_frames: PixArtSigmaPipeline takes no"),
    ("sd3", ["--use_onediff"], "--use_onediff: OneDiff compilation is not built yet"),
    ("sd3", ["--tensor_parallel_degree", "2"], "--tensor_parallel_degree: tensor parallel is not built yet"),
    ("sd3", ["--split_scheme", "row"], "--split_scheme: it chooses tensor parallel's split"),
    ("sd3", ["--attn_layer_num_for_pp", "1", "1"], "--attn_layer_num_for_pp: layers per PipeFusion stage cannot be set"),
    ("sd3", ["--enable_sequential_cpu_offload"], "CPU offload is not built yet"),
    ("sd3", ["--nproc", "2"], "--nproc 2 but every parallel degree is 1: add degrees whose product is 2"),
    ("sd3", ["--ulysses_degree", "2", "--nproc", "4"], "the degrees need 2 processes; pass --nproc 2"),
    ("sd3", ["--use_fbcache", "--cache", "teacache"], "--use_fbcache and --cache teacache ask for two caches"),
    ("sd3", ["--use_parallel_vae", "--no_parallel_vae"], "contradict each other"),
])
def test_folder_mistakes_are_one_line_before_launch(model, argv, fragment, folders, capsys, monkeypatch):
    import xdit_fx.runtime.launch as launch

    monkeypatch.setattr(launch, "launch", lambda *a, **k: pytest.fail("a process was launched"))
    line = _one_line_error(capsys, ["--model", folders[model], *argv])
    assert fragment in line, line


def test_hub_id_that_cannot_be_fetched_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = _one_line_error(capsys, ["--model", "nobody/no-such-pipeline", "--download-dir", str(tmp_path)])
    assert "not a local folder, and fetching it from the hub failed" in line


def test_missing_accelerate_names_the_extra(folders, capsys, monkeypatch):
    import importlib.util

    import xdit_fx.loading as loading

    real = importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    line = _one_line_error(capsys, ["--model", folders["wan"], "--ulysses_degree", "2"])
    assert "component 'transformer' (WanTransformer3DModel) keeps modules in float32" in line
    assert "pip install 'xdit_fx[pipelines]'" in line


def test_error_inside_the_ranks_is_printed_once(folders, capfd, tmp_path):
    """A folder whose transformer weights are missing passes every check before launch; both ranks fail to
    load it, and the user sees one line naming a rank, exit code 2, no traceback."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folders["sd3"], broken)
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.unlink()
    assert main(["generate", "--model", str(broken), "--ulysses_degree", "2", "--num_inference_steps", "1",
                 "--output", str(tmp_path / "x.png")]) == 2
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("xdit-fx generate: error:")]
    assert "Traceback" not in err, err
    assert len(errors) == 1 and re.match(r"xdit-fx generate: error: rank [01]: loading '.*broken' failed: OSError: ",
                                         errors[0]), err
    assert err.count("An error occurred while trying to fetch") <= 1, err  # diffusers' own message: rank 0 only


def test_a_rank_error_is_one_line_and_keeps_the_dump_hint():
    from xdit_fx.errors import UnsupportedGraph, dump_hint
    from xdit_fx.cli.generate import one_line
    from xdit_fx.plan import Plan

    exc = UnsupportedGraph("pipefusion: node 'x' (blocks.0)\n  has no token rule.\n  fix: use ulysses\n"
                           + dump_hint(Plan(pipefusion_degree=2)))
    first, hint = one_line(exc).split("\n")
    assert first == "pipefusion: node 'x' (blocks.0) has no token rule. fix: use ulysses"
    assert hint.strip().startswith("to see every pass's graph: xdit-fx dump MODEL --plan pipefusion=2")
    assert one_line(ValueError("height must be\ndivisible by 16")) == "ValueError: height must be divisible by 16"


def test_help_lists_every_flag_of_the_readme_table(capsys):
    """The README's table maps xDiT's flags to plan fields; every flag in it is one generate accepts."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme[readme.index("| xDiT flag |"):]
    table = table[:table.index("\n\n")]
    flags = set(re.findall(r"`(--[a-z][a-z0-9_-]*)`", table))
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = capsys.readouterr().out
    assert len(flags) >= 35, sorted(flags)
    missing = sorted(f for f in flags if not re.search(rf"{re.escape(f)}\b", help_text))
    assert not missing, missing
