"""Video jobs: `xdit-fx serve --model DIR` with a text-to-video pipeline folder (a tiny random Wan with a real
tokenizer and text encoder, saved offline) on 2 ranks under cfg=2 (Wan calls the transformer twice per
step, so this is the paired CFG path). About 40 s: XDIT_FX_SLOW_TESTS=1."""

from __future__ import annotations

import io
import os
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("accelerate")  # diffusers loads Wan's fp32-kept modules through accelerate

from serve_utils import ServerProcess, metric_value, save_tiny_wan_folder  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("XDIT_FX_SLOW_TESTS") != "1", reason="slow: XDIT_FX_SLOW_TESTS=1")

FRAMES = 5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = save_tiny_wan_folder(tmp_path_factory.mktemp("pipelines") / "tiny-wan")
    srv = ServerProcess("--model", str(folder), "--plan", "cfg=2", "--size", "32x32", "--num-frames", str(FRAMES),
                        "--max-steps", "30")
    yield srv
    srv.stop()


def _has_av() -> bool:
    from xdit_fx.serve.app import video_encoder
    return video_encoder()[1] == "video/mp4"


def _wait(srv, video_id, until, timeout=240):
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = httpx.get(f"{srv.url}/v1/videos/{video_id}").json()
        seen.append((body["status"], body["progress"]))
        if until(body):
            return body, seen
        time.sleep(0.02)
    raise AssertionError(f"video {video_id} never reached the state; seen {seen[-5:]}")


def test_video_job_lifecycle_progress_content_and_delete(server):
    from PIL import Image

    batches_before = metric_value(httpx.get(server.url + "/metrics").text, "xdit_fx_batch_size_count")
    created = httpx.post(server.url + "/v1/videos", json={"prompt": "a cat", "seed": 1, "num_inference_steps": 20})
    assert created.status_code == 200, created.text
    job = created.json()
    assert job["object"] == "video" and job["status"] in ("queued", "in_progress") and job["progress"] == 0
    assert job["size"] == "32x32" and job["model"] == "tiny-wan" and isinstance(job["created_at"], int)
    # a job with other settings cannot share the running call: it waits in the queue, and DELETE drops it
    queued = httpx.post(server.url + "/v1/videos", json={"prompt": "a dog", "num_inference_steps": 3}).json()
    assert queued["status"] == "queued"
    deleted = httpx.delete(f"{server.url}/v1/videos/{queued['id']}")
    assert deleted.status_code == 200 and deleted.json() == {"id": queued["id"], "object": "video.deleted",
                                                              "deleted": True}
    assert httpx.get(f"{server.url}/v1/videos/{queued['id']}").status_code == 404

    done, seen = _wait(server, job["id"], lambda b: b["status"] in ("completed", "failed"))
    assert done["status"] == "completed" and done["progress"] == 100, done
    middle = [p for s, p in seen if s == "in_progress" and 0 < p < 100]
    assert middle, seen  # step i of n was visible while it ran
    assert [p for _, p in seen] == sorted(p for _, p in seen)  # progress never goes back

    content = httpx.get(f"{server.url}/v1/videos/{job['id']}/content")
    assert content.status_code == 200
    if _has_av():  # H.264 in MP4: decode it back
        import av
        assert content.headers["content-type"] == "video/mp4"
        with av.open(io.BytesIO(content.content)) as container:
            frames = list(container.decode(video=0))
        assert len(frames) == FRAMES and (frames[0].width, frames[0].height) == (32, 32)
    else:  # the fallback without PyAV
        assert content.headers["content-type"] == "image/gif"
        gif = Image.open(io.BytesIO(content.content))
        assert gif.n_frames == FRAMES and gif.size == (32, 32)

    # a running job that is deleted finishes unseen and is not restarted
    running = httpx.post(server.url + "/v1/videos", json={"prompt": "a bird", "num_inference_steps": 20}).json()
    _wait(server, running["id"], lambda b: b["status"] == "in_progress")
    assert httpx.delete(f"{server.url}/v1/videos/{running['id']}").status_code == 200
    deadline = time.monotonic() + 240
    while httpx.get(server.url + "/health").json().get("running_requests", 1) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)  # a restarted job would be running again by now
    text = httpx.get(server.url + "/metrics").text
    assert metric_value(text, "xdit_fx_batch_size_count") - batches_before == 2  # the first job and the deleted one
    assert metric_value(text, "xdit_fx_running_requests") == 0 and metric_value(text, "xdit_fx_queue_depth") == 0
    assert "step 20/20" in server.output()  # progress in rank 0's log


def test_video_model_errors(server):
    image = httpx.post(server.url + "/v1/images/generations", json={"prompt": "a cat"})
    assert image.status_code == 400 and image.json()["error"]["param"] == "model"
    frames = httpx.post(server.url + "/v1/videos", json={"prompt": "a cat", "num_frames": 100000,
                                                            "num_inference_steps": 2})
    assert frames.status_code == 400 and frames.json()["error"]["param"] == "num_frames"
    missing = httpx.get(server.url + "/v1/videos/video_999999")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    not_ready = httpx.post(server.url + "/v1/videos", json={"prompt": "a cow", "num_inference_steps": 30}).json()
    early = httpx.get(f"{server.url}/v1/videos/{not_ready['id']}/content")
    assert early.status_code == 409 and early.json()["error"]["code"] == "video_not_ready"
