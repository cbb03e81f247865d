"""The HTTP side of `xdit-fx serve`: an OpenAI-compatible FastAPI app on rank 0.

Handlers validate a request completely (schema, caps, what the model can make) before it is queued, so
a bad request never reaches the ranks. Errors use OpenAI's envelope
``{"error": {"message", "type", "param", "code"}}``; ``param`` names the offending field.

The app does not run the pipeline: it puts `Job`s in the `Batcher` and awaits them. The engine thread
finishes each job exactly once; a timeout (504) or a client disconnect (cancelled) finishes it first when it
is still queued, and the engine then skips it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import secrets
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError, confloat
from starlette.exceptions import HTTPException as StarletteHTTPException

from xdit_fx.serve.batcher import Batcher, Job, NotAccepting, QueueFull
from xdit_fx.serve.engine import BatchSpec, Capabilities

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Limits:
    """Server-side caps: no single request can take the service down."""

    max_n: int = 8
    max_steps: int = 100
    max_pixels_side: int = 2048
    max_body_bytes: int = 64 * 1024
    max_prompt_chars: int = 4000
    max_frames: int = 256
    request_timeout_s: float = 300.0


class ApiError(Exception):
    """An error answered with OpenAI's envelope."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class ImageRequest(BaseModel):
    """`POST /v1/images/generations`: OpenAI's fields plus seed, steps, guidance and a negative prompt."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: StrictStr
    model: StrictStr | None = None
    n: StrictInt = 1
    size: StrictStr | None = None
    response_format: Literal["b64_json", "url"] | None = None
    seed: StrictInt | None = None
    num_inference_steps: StrictInt | None = None
    guidance_scale: confloat(strict=False, allow_inf_nan=False) | None = None  # type: ignore[valid-type]
    negative_prompt: StrictStr | None = None
    user: StrictStr | None = None


class VideoRequest(BaseModel):
    """`POST /v1/videos`: a text-to-video job."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: StrictStr
    model: StrictStr | None = None
    size: StrictStr | None = None
    num_frames: StrictInt | None = None
    seed: StrictInt | None = None
    num_inference_steps: StrictInt | None = None
    guidance_scale: confloat(strict=False, allow_inf_nan=False) | None = None  # type: ignore[valid-type]
    negative_prompt: StrictStr | None = None
    user: StrictStr | None = None


@dataclass
class VideoJob:
    """A video job as the job API reports it; the work itself is a `Job` in the batcher."""

    job: Job
    created_at: int
    model: str
    size: str
    content: bytes | None = None
    deleted: bool = False

    def status(self) -> str:
        return {"queued": "queued", "running": "in_progress", "done": "completed", "failed": "failed",
                "cancelled": "cancelled"}[self.job.status]


MAX_VIDEO_JOBS = 256  # finished jobs kept for GET; the oldest finished ones are forgotten first


class Metrics:
    """Prometheus metrics of one service (own registry, so several apps can live in one process)."""

    def __init__(self, batcher: Batcher, running: Callable[[], int]) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("xdit_fx_requests", "Generation requests answered, by HTTP status",
                                ["status"], registry=r)
        self.latency = Histogram("xdit_fx_request_latency_seconds", "Arrival to answer, successful requests",
                                 buckets=(.05, .1, .25, .5, 1, 2, 5, 10, 30, 60, 120, 300), registry=r)
        self.queue_time = Histogram("xdit_fx_queue_time_seconds", "Arrival to the start of its batch",
                                    buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2, 5, 10, 30, 60), registry=r)
        self.batch_size = Histogram("xdit_fx_batch_size", "Images per pipeline call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.batch_seconds = Histogram("xdit_fx_batch_seconds", "Seconds per pipeline call",
                                       buckets=(.05, .1, .25, .5, 1, 2, 5, 10, 30, 60, 120), registry=r)
        self.images = Counter("xdit_fx_images_generated", "Images (or videos) the pipeline generated",
                              registry=r)
        self.retries = Counter("xdit_fx_batch_retries", "Merged batches that failed and were retried "
                               "request by request", registry=r)
        g = Gauge("xdit_fx_queue_depth", "Requests waiting in the queue", registry=r)
        g.set_function(batcher.depth)
        g = Gauge("xdit_fx_running_requests", "Requests in the running batch", registry=r)
        g.set_function(running)


def _parse_size(text: str, caps: Capabilities, limits: Limits) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ApiError(400, f"size must be 'WIDTHxHEIGHT' such as '{caps.default_size[0]}x{caps.default_size[1]}', "
                            f"got {text!r}", param="size", code="invalid_size")
    w, h = int(parts[0]), int(parts[1])
    if caps.sizes is not None:
        if (w, h) != caps.sizes:
            raise ApiError(400, f"size {text!r}: this model makes {caps.sizes[0]}x{caps.sizes[1]} images only",
                           param="size", code="invalid_size")
        return w, h
    if w > limits.max_pixels_side or h > limits.max_pixels_side:
        raise ApiError(400, f"size {text!r} is over this server's limit of {limits.max_pixels_side} pixels a side",
                       param="size", code="limit_exceeded")
    m = caps.size_multiple
    if w < m or h < m or w % m or h % m:
        raise ApiError(400, f"size {text!r}: width and height must be multiples of {m} (at least {m})",
                       param="size", code="invalid_size")
    return w, h


def _pydantic_error(e: ValidationError) -> ApiError:
    first = e.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        message = f"unknown field {param!r}"
        code = "unknown_parameter"
    elif kind == "missing":
        message = f"{param!r} is required"
        code = "missing_required_parameter"
    else:
        message = f"{param}: {first.get('msg', 'invalid value')}"
        code = "invalid_type" if "type" in kind or kind.endswith("_parsing") else "invalid_value"
    return ApiError(400, message, param=param, code=code)


def encode_gif(frames, fps: int = 8) -> bytes:
    """A video's PIL frames as an animated GIF (Pillow only: the fallback when PyAV is not installed)."""
    buf = io.BytesIO()
    frames = [f.convert("RGB") for f in frames]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return buf.getvalue()


def encode_mp4(frames, fps: int = 8) -> bytes:
    """A video's PIL frames as H.264 in MP4 (PyAV, whose wheels bundle FFmpeg and libx264). yuv420p needs even
    sides: an odd width or height is padded by repeating the last column or row."""
    import av
    import numpy as np

    arrays = [np.asarray(f.convert("RGB")) for f in frames]
    h, w = arrays[0].shape[:2]
    pad = ((0, h % 2), (0, w % 2), (0, 0))
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w + w % 2, h + h % 2, "yuv420p"
        stream.options = {"crf": "18"}
        for array in arrays:
            frame = av.VideoFrame.from_ndarray(np.pad(array, pad, mode="edge"), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buf.getvalue()


def video_encoder() -> tuple[Callable[[list], bytes], str]:
    """(encode, media type) of video content: MP4 when PyAV with libx264 is installed, else animated GIF."""
    try:
        import av
        if "libx264" in av.codecs_available:
            return encode_mp4, "video/mp4"
    except ImportError:
        pass
    return encode_gif, "image/gif"


def encode_png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class Service:
    """The state the HTTP handlers share with the engine thread."""

    def __init__(self, caps: Capabilities, batcher: Batcher, limits: Limits, world_size: int, plan: str,
                 api_key: str | None = None, wedged_after_s: float = 600.0) -> None:
        self.caps, self.batcher, self.limits = caps, batcher, limits
        self.world_size, self.plan, self.api_key = world_size, plan, api_key
        self.wedged_after_s = wedged_after_s
        self.dead: str | None = None            # why the engine is gone
        self.draining = False
        self.running: list[Job] = []
        self.busy_since: Callable[[], float | None] = lambda: None
        self.progress: Callable[[], Any] = lambda: None   # the engine's Progress of the running batch
        self.videos: dict[int, VideoJob] = {}
        self.step_batching = False              # requests join a running batch at step boundaries (engine.py)
        self.video_encoder = video_encoder() if caps.video else (encode_gif, "image/gif")
        self.metrics = Metrics(batcher, lambda: len(self.running))
        self.created = int(time.time())

    # ---- called from the engine thread ----------------------------------------------------------------
    def on_batch(self, jobs: list[Job], seconds: float, call_images: int | None = None) -> None:
        """`jobs` finished together after `seconds`. `call_images`: the images of the pipeline call they ran
        in, when it held more than theirs (step-level batching: the running batch they joined)."""
        images = sum(j.n for j in jobs)
        self.metrics.batch_size.observe(call_images or images)
        self.metrics.images.inc(images)
        self.metrics.batch_seconds.observe(seconds)
        prev = self.batcher.seconds_per_image
        per_image = seconds / max(call_images or images, 1)
        self.batcher.seconds_per_image = per_image if prev == 0 else 0.8 * prev + 0.2 * per_image
        for job in jobs:
            if job.started is not None:
                self.metrics.queue_time.observe(job.started - job.arrival)

    def health(self) -> tuple[int, dict[str, Any]]:
        if self.dead:
            return 503, {"status": "dead", "error": self.dead}
        if self.draining:
            return 503, {"status": "draining"}
        since = self.busy_since()
        if since is not None and time.monotonic() - since > self.wedged_after_s:
            return 503, {"status": "wedged", "error": f"one pipeline call has run for over {self.wedged_after_s:.0f} s"}
        return 200, {"status": "ok", "ranks": self.world_size, "plan": self.plan, "model": self.caps.model_id,
                     "batching": "step" if self.step_batching else "request", "queue_depth": self.batcher.depth(), "running_requests": len(self.running)}

    # ---- request validation ---------------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key",
                           type="authentication_error")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "incorrect API key", code="invalid_api_key", type="authentication_error")

    async def read_json(self, request: Request) -> Any:
        cap = self.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            raise ApiError(413, f"request body of {length} bytes is over this server's limit of {cap} bytes",
                           code="body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > cap:
                raise ApiError(413, f"request body is over this server's limit of {cap} bytes", code="body_too_large")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None

    def image_spec(self, data: Any) -> tuple[ImageRequest, BatchSpec]:
        req = self._validate(ImageRequest, data)
        if self.caps.video:
            raise ApiError(400, f"{self.caps.model_id!r} makes videos: use POST /v1/videos", param="model",
                           code="unsupported_model")
        if req.response_format == "url":
            raise ApiError(400, "response_format 'url' is not supported: this server keeps no files; use 'b64_json'",
                           param="response_format", code="unsupported_response_format")
        return req, self._spec(req, req.n)

    def video_spec(self, data: Any) -> tuple[VideoRequest, BatchSpec]:
        req = self._validate(VideoRequest, data)
        if not self.caps.video:
            raise ApiError(400, f"{self.caps.model_id!r} makes images: use POST /v1/images/generations",
                           param="model", code="unsupported_model")
        spec = self._spec(req, 1)
        if req.num_frames is not None:
            if not self.caps.accepts_num_frames:
                raise ApiError(400, "this model takes no num_frames", param="num_frames", code="unsupported_parameter")
            if not 1 <= req.num_frames <= self.limits.max_frames:
                raise ApiError(400, f"num_frames must be in [1, {self.limits.max_frames}], got {req.num_frames}",
                               param="num_frames", code="invalid_value")
            spec.extra["num_frames"] = req.num_frames
        return req, spec

    def _validate(self, model: type, data: Any):
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        try:
            req = model.model_validate(data)
        except ValidationError as e:
            raise _pydantic_error(e) from None
        if req.model is not None and req.model != self.caps.model_id:
            raise ApiError(404, f"model {req.model!r} is not served here; this server serves {self.caps.model_id!r}",
                           param="model", code="model_not_found", type="not_found_error")
        return req

    def _spec(self, req, n: int) -> BatchSpec:
        caps, limits = self.caps, self.limits
        prompt = req.prompt
        if not prompt.strip():
            raise ApiError(400, "prompt must not be empty", param="prompt", code="invalid_value")
        if len(prompt) > limits.max_prompt_chars:
            raise ApiError(400, f"prompt has {len(prompt)} characters, over this server's limit of "
                                f"{limits.max_prompt_chars}", param="prompt", code="limit_exceeded")
        if caps.text_arg == "class_labels" and prompt.strip().lower() not in caps.labels:
            shown = ", ".join(repr(x) for x in caps.labels[:20])
            raise ApiError(400, f"prompt {prompt!r} is not a label of this model; use one of {shown}",
                           param="prompt", code="invalid_value")
        if n < 1:
            raise ApiError(400, f"n must be at least 1, got {n}", param="n", code="invalid_value")
        if n > limits.max_n:
            raise ApiError(400, f"n={n} is over this server's limit of {limits.max_n}", param="n",
                           code="limit_exceeded")
        steps = caps.default_steps if req.num_inference_steps is None else req.num_inference_steps
        if steps < 1:
            raise ApiError(400, f"num_inference_steps must be at least 1, got {steps}", param="num_inference_steps",
                           code="invalid_value")
        if steps > limits.max_steps:
            raise ApiError(400, f"num_inference_steps={steps} is over this server's limit of {limits.max_steps}",
                           param="num_inference_steps", code="limit_exceeded")
        guidance = caps.default_guidance if req.guidance_scale is None else float(req.guidance_scale)
        if req.guidance_scale is not None:
            if caps.default_guidance is None:
                raise ApiError(400, "this model takes no guidance_scale", param="guidance_scale",
                               code="unsupported_parameter")
            if not 0.0 <= guidance <= 100.0:
                raise ApiError(400, f"guidance_scale must be in [0, 100], got {guidance}", param="guidance_scale",
                               code="invalid_value")
        if req.negative_prompt is not None and not caps.accepts_negative_prompt:
            raise ApiError(400, "this model takes no negative_prompt", param="negative_prompt",
                           code="unsupported_parameter")
        size = _parse_size(req.size, caps, limits) if req.size is not None else caps.default_size
        seed = req.seed if req.seed is not None else secrets.randbelow(2**62)
        if not 0 <= seed <= MAX_SEED - limits.max_n:
            raise ApiError(400, f"seed must be in [0, {MAX_SEED - limits.max_n}], got {seed}", param="seed",
                           code="invalid_value")
        return BatchSpec(texts=[prompt] * n, seeds=[seed + i for i in range(n)], steps=steps,
                         guidance=guidance if caps.default_guidance is not None else None,
                         size=size if caps.sizes is None else None, negative_prompt=req.negative_prompt)

    def batch_key(self, spec: BatchSpec) -> tuple:
        """Requests with equal keys can share pipeline calls. Under step-level batching each request carries its
        own schedule, so the step count is not part of the key."""
        steps = None if self.step_batching else spec.steps
        return (steps, spec.guidance, spec.size, spec.negative_prompt, tuple(sorted(spec.extra.items())))

    # ---- video jobs -----------------------------------------------------------------------------------
    def video_object(self, video: VideoJob) -> dict[str, Any]:
        job = video.job
        progress = 100 if job.status == "done" else 0
        current = self.progress()
        if job.status == "running" and current is not None and job.id in current.jobs and current.total:
            progress = int(100 * current.step / current.total)
        body = {"id": f"video_{job.id}", "object": "video", "status": video.status(), "progress": progress,
                "created_at": video.created_at, "model": video.model, "size": video.size}
        if job.status == "failed":
            err = self.job_error(job)
            body["error"] = {"message": err.message, "code": err.code}
        return body

    def add_video(self, video: VideoJob) -> None:
        self.videos[video.job.id] = video
        finished = [k for k, v in self.videos.items() if v.job.finished]
        for key in finished[:max(0, len(self.videos) - MAX_VIDEO_JOBS)]:
            del self.videos[key]

    def get_video(self, video_id: str) -> VideoJob:
        number = video_id.removeprefix("video_")
        video = self.videos.get(int(number)) if number.isdigit() else None
        if video is None or video.deleted:
            raise ApiError(404, f"no video job {video_id!r}", param="video_id", code="not_found",
                           type="not_found_error")
        return video

    # ---- waiting for a job ----------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        if self.dead:
            raise ApiError(503, f"the engine is down: {self.dead}", type="server_error", code="engine_unavailable")
        try:
            self.batcher.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: its queue holds {self.batcher.max_queue} requests; retry "
                                f"after {math.ceil(e.retry_after_s)} s", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(math.ceil(e.retry_after_s))}) from None
        except NotAccepting:
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down",
                           headers={"Retry-After": "5"}) from None

    async def submit_and_wait(self, request: Request, key: Any, n: int, payload: Any) -> Job:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def on_done(job: Job) -> None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(job))

        job = Job(key=key, n=n, payload=payload, on_done=on_done)
        self.submit(job)
        disconnect = asyncio.ensure_future(_wait_disconnect(request))
        try:
            finished, _ = await asyncio.wait({done, disconnect}, timeout=self.remaining(job),
                                             return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnect.cancel()
        if done in finished:
            return job
        if disconnect in finished:  # nobody will read the answer: drop the job if it has not started
            self.batcher.cancel(job, status="cancelled") or job.finish(status="cancelled")
            raise ApiError(499, "the client closed the connection", code="client_closed_request")
        err = ApiError(504, f"the request did not finish within {self.limits.request_timeout_s:g} s "
                            "(--request-timeout)", type="server_error", code="timeout")
        self.batcher.cancel(job, status="failed", error=err) or job.finish(status="failed", error=err)
        raise err

    def remaining(self, job: Job) -> float:
        return max(0.0, job.arrival + self.limits.request_timeout_s - time.monotonic())

    def job_error(self, job: Job) -> ApiError:
        from xdit_fx.serve.engine import EngineDead, GenerationError
        e = job.error
        if isinstance(e, ApiError):
            return e
        if isinstance(e, EngineDead) or self.dead:
            return ApiError(503, f"the engine is down: {self.dead or e}", type="server_error",
                            code="engine_unavailable")
        if isinstance(e, GenerationError) and e.bad_input:
            return ApiError(400, f"the pipeline refused the request: {e}", code="invalid_value")
        if job.status == "cancelled":
            return ApiError(503, "the request was dropped: the server is shutting down", type="server_error",
                            code="shutting_down")
        return ApiError(500, f"generation failed: {e}", type="server_error", code="generation_failed")


async def _wait_disconnect(request: Request) -> None:
    """Return when the client goes away (the body has been read; the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def build_app(service: Service) -> FastAPI:
    app = FastAPI(title="xdit-fx serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    metrics = service.metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return ApiError(e.status_code, message, type=kind).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return ApiError(400, f"{param}: {first.get('msg', 'invalid value')}", param=param).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").response()

    @app.get("/health")
    async def health():
        status, body = service.health()
        return JSONResponse(body, status_code=status)

    @app.get("/v1/models")
    async def models(request: Request):
        service.check_auth(request)
        return {"object": "list", "data": [{"id": service.caps.model_id, "object": "model", "created": service.created,
                                            "owned_by": "xdit_fx"}]}

    @app.get("/metrics")
    async def prometheus(request: Request):
        service.check_auth(request)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8"))

    @app.post("/v1/images/generations")
    async def images(request: Request):
        t0 = time.monotonic()
        try:
            service.check_auth(request)
            data = await service.read_json(request)
            req, spec = service.image_spec(data)
            key = ("image", *service.batch_key(spec))
            job = await service.submit_and_wait(request, key, req.n, spec)
            if job.status != "done":
                raise service.job_error(job)
            data_out = await asyncio.to_thread(lambda: [{"b64_json": encode_png(im)} for im in job.result])
        except ApiError as e:
            metrics.requests.labels(status=str(e.status)).inc()
            raise
        metrics.requests.labels(status="200").inc()
        metrics.latency.observe(time.monotonic() - t0)
        return JSONResponse({"created": int(time.time()), "data": data_out},
                            headers={"X-Batch-Images": str(job.batch_images)})

    @app.post("/v1/videos")
    async def create_video(request: Request):
        try:
            service.check_auth(request)
            req, spec = service.video_spec(await service.read_json(request))
            job = Job(key=("video", *service.batch_key(spec)), n=1, payload=spec)
            size = f"{spec.size[0]}x{spec.size[1]}" if spec.size else \
                f"{service.caps.default_size[0]}x{service.caps.default_size[1]}"
            video = VideoJob(job=job, created_at=int(time.time()), model=service.caps.model_id, size=size)
            service.submit(job)
        except ApiError as e:
            metrics.requests.labels(status=str(e.status)).inc()
            raise
        service.add_video(video)
        metrics.requests.labels(status="200").inc()
        return service.video_object(video)

    @app.get("/v1/videos/{video_id}")
    async def get_video(video_id: str, request: Request):
        service.check_auth(request)
        return service.video_object(service.get_video(video_id))

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(video_id: str, request: Request):
        service.check_auth(request)
        video = service.get_video(video_id)
        if video.job.status != "done":
            raise ApiError(404 if video.job.finished else 409,
                           f"video {video_id!r} is {video.status()}; its content exists once it is completed",
                           param="video_id", code="video_not_ready")
        encode, media_type = service.video_encoder
        if video.content is None:
            frames = video.job.result[0]
            video.content = await asyncio.to_thread(encode, frames)
        return Response(video.content, media_type=media_type)

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(video_id: str, request: Request):
        service.check_auth(request)
        video = service.get_video(video_id)
        # a queued job is dropped; a running one finishes, unseen (a generation cannot be interrupted)
        service.batcher.cancel(video.job)
        video.deleted = True
        service.videos.pop(video.job.id, None)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    return app
