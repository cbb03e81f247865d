"""`xdit-fx serve --model DIR`: a diffusers pipeline folder (a tiny random Stable Diffusion 3 with real
tokenizer and text encoders, saved offline) on 2 ranks under cfg=2, against the same pipeline in one
process."""

from __future__ import annotations

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from serve_utils import ServerProcess, decode_png, save_tiny_sd3_folder  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_sd3_folder(tmp_path_factory.mktemp("pipelines") / "tiny-sd3")


@pytest.fixture(scope="module")
def server(folder):
    srv = ServerProcess("--model", str(folder), "--plan", "cfg=2", "--max-steps", "10", "--max-size", "64")
    yield srv
    srv.stop()


def test_pipeline_folder_served_under_cfg2_matches_one_process(server, folder):
    import torch

    from xdit_fx.loading import load_pipeline

    models = httpx.get(server.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny-sd3"]
    body = {"prompt": "a red cat", "n": 2, "size": "32x16", "seed": 3, "num_inference_steps": 3,
            "negative_prompt": "blurry", "guidance_scale": 4.0}
    r = httpx.post(server.url + "/v1/images/generations", json=body, timeout=300)
    assert r.status_code == 200, r.text
    served = [decode_png(d["b64_json"]) for d in r.json()["data"]]
    assert [a.shape for a in served] == [(16, 32, 3)] * 2  # height x width x RGB
    assert not np.array_equal(served[0], served[1])  # seeds 3 and 4

    pipe = load_pipeline(str(folder))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=["a red cat"] * 2, negative_prompt=["blurry"] * 2, num_inference_steps=3, guidance_scale=4.0,
               width=32, height=16, output_type="pil",
               generator=[torch.Generator().manual_seed(s) for s in (3, 4)])
    # cfg=2 splits the batched call over 2 ranks (float reassociation only) and the VAE decode by rows;
    # after 8-bit rounding the images differ by at most one level
    worst = max(int(np.abs(np.asarray(im).astype(int) - a.astype(int)).max()) for im, a in zip(out.images, served))
    assert worst <= 1, worst

    default = httpx.post(server.url + "/v1/images/generations", json={"prompt": "a dog", "num_inference_steps": 2},
                         timeout=300)
    assert default.status_code == 200 and decode_png(default.json()["data"][0]["b64_json"]).shape == (16, 16, 3)


@pytest.mark.parametrize("size, code", [("30x30", "invalid_size"), ("128x128", "limit_exceeded"),
                                        ("0x16", "invalid_size")])
def test_pipeline_folder_refuses_sizes_it_cannot_make(server, size, code):
    body = {"prompt": "a cat", "size": size, "num_inference_steps": 2}
    r = httpx.post(server.url + "/v1/images/generations", json=body, timeout=60)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "size" and r.json()["error"]["code"] == code
