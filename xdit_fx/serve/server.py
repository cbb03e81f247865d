"""`serve_worker`: what every rank runs, and rank 0's engine loop, HTTP thread and shutdown.

Start-up (every rank): load the pipeline, `xdit_fx.parallelize` it with the plan, run one warm-up
generation (graph capture; it also tells the output size and whether the pipeline returns frames). Then
ranks > 0 follow rank 0's broadcasts, and rank 0 starts uvicorn in a thread and runs the engine loop in
its main thread (the thread that receives signals):

* SIGTERM or SIGINT: stop accepting (new requests get 503, /health 503 "draining"), run what is queued and
  running, tell the other ranks to stop, close HTTP after the answers are sent, exit 0. What is still
  queued after `drain_timeout_s` is answered 503.
* a failed collective (a rank died, or timed out): /health 503 "dead", every running and queued request
  answered 503, HTTP closed after a short grace period, exit with status 3 (torchrun's agent then stops
  the other ranks and the command exits non-zero).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

DEAD_EXIT_CODE = 3
DEAD_GRACE_S = 2.0
log = logging.getLogger("xdit_fx.serve")


def _setup_logging(rank: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def load_served_pipeline(model: str | None):
    """The embedded digits model (model None) or a diffusers pipeline folder, with its served name."""
    if model is None:
        from xdit_fx.digits import load_pipeline
        return load_pipeline(), "digits"
    from xdit_fx.loading import load_pipeline, local_device
    return load_pipeline(model, device=local_device()), Path(model).resolve().name


def merge(jobs: list) -> Any:
    """One BatchSpec for jobs of the same key: their texts and seeds concatenated in arrival order."""
    first = jobs[0].payload
    texts = [t for j in jobs for t in j.payload.texts]
    seeds = [s for j in jobs for s in j.payload.seeds]
    return dataclasses.replace(first, texts=texts, seeds=seeds)


def _watch_stop(stop: dict, service, batcher, drain_started: float | None) -> float | None:
    """Start draining on a signal (or when the launcher is gone); returns when the drain started."""
    if stop.get("parent") and os.getppid() != stop["parent"] and stop["signal"] is None:
        stop["signal"] = "the launcher is gone"  # killed outright: drain rather than serve orphaned
    if stop["signal"] is not None and drain_started is None:
        log.info("signal %s: draining %d queued request(s)", stop["signal"], batcher.depth())
        drain_started = time.monotonic()
        service.draining = True
        batcher.stop_accepting()
    return drain_started


def engine_loop(engine, service, batcher, stop: dict, drain_timeout_s: float) -> int:
    """Rank 0's loop: form batches, run them (a failed merged batch is retried request by request),
    heartbeat while idle, drain on a signal. Returns 0 after a drain, DEAD_EXIT_CODE when the engine died
    (every running and queued request is then answered 503). Step-level batching when the engine offers it
    (`step_loop`), else one pipeline call per batch."""
    if getattr(engine, "stepwise", False):
        return step_loop(engine, service, batcher, stop, drain_timeout_s)
    from xdit_fx.serve.batcher import run_batch_with_retry
    from xdit_fx.serve.engine import EngineDead

    def run_jobs(jobs):
        outputs = engine.run(merge(jobs), tuple(j.id for j in jobs))
        split, at = [], 0
        for job in jobs:
            split.append(outputs[at:at + job.n])
            at += job.n
        return split

    def on_retry(jobs):
        service.metrics.retries.inc()
        log.warning("a batch of %d requests failed; retrying each alone", len(jobs))

    drain_started = None
    try:
        while True:
            drain_started = _watch_stop(stop, service, batcher, drain_started)
            if drain_started is not None:
                if batcher.depth() == 0:
                    break
                if time.monotonic() - drain_started > drain_timeout_s:
                    for job in batcher.drain_all():
                        job.finish(status="cancelled")
                    break
            batch = batcher.next_batch(idle_timeout_s=1.0)
            if not batch:
                engine.heartbeat()
                continue
            service.running = batch
            try:
                run_batch_with_retry(batch, run_jobs, service.on_batch, on_retry)
            finally:
                service.running = []
        engine.stop()
        log.info("drained; stopped")
        return 0
    except EngineDead as e:
        return _engine_died(e, service, batcher, list(service.running))


@dataclasses.dataclass
class _Group:
    """Jobs that joined the running batch at the same step boundary (for metrics and progress logs)."""

    jobs: list
    started: float
    images: int = 0              # images of the transformer call they joined
    steps: int = 0               # steps taken since they joined
    done: list = dataclasses.field(default_factory=list)
    pending: int = 0

    @property
    def total(self) -> int:
        return max(j.payload.steps for j in self.jobs)


def _engine_died(error, service, batcher, running: list) -> int:
    """A rank is dead: answer every running and queued request 503, accept no more, exit non-zero."""
    log.error("%s; answering 503 and exiting", error)
    service.dead = str(error)
    batcher.stop_accepting()
    for job in running + batcher.drain_all():
        job.finish(status="failed", error=error)
    return DEAD_EXIT_CODE


def _count_step(running: dict, images: int) -> None:
    """One step of the running set is done: count it per group, log progress (step i of n) at quarters."""
    groups = {id(g): g for _, g in running.values()}
    for job, _ in running.values():
        job.batch_images = max(job.batch_images, images)
    for group in groups.values():
        group.images = group.images or images
        group.steps += 1
        quarter = max(1, group.total // 4)
        if group.steps % quarter == 0 or group.steps == group.total:
            log.info("request(s) %s: step %d/%d (%d image(s) in the call)", [j.id for j in group.jobs],
                     group.steps, group.total, images)


def step_loop(engine, service, batcher, stop: dict, drain_timeout_s: float) -> int:
    """Rank 0's loop under step-level batching (engine.step): one denoising step of the running set per turn.

    At each step boundary, queued jobs that share the running set's key join it (`Batcher.take_joinable`,
    up to --max-batch images); an idle engine starts what is queued at once, without the batch window (a job
    arriving just after joins at the next step boundary, which costs it one step, not a window). A job leaves the set when its own steps end and is answered at once. When a step of a
    merged set raises, the set is dropped and each of its jobs is run again alone from its first step (no
    other job joins meanwhile), so one bad request fails only itself. A job that fails alone is answered
    with its error. Running jobs are never interrupted (a cancelled or timed-out one finishes unseen)."""
    from xdit_fx.serve.engine import EngineDead

    # under dp the ranks are replicas, each with its own call: --max-batch bounds each one's images
    replicas = getattr(engine, "replicas", 1)
    running: dict[int, tuple[Any, _Group]] = {}   # job id -> (job, its group), in admission order
    retry_alone: list = []                          # jobs of a failed merged set, to run one at a time
    alone = False                                   # the running set is one job being retried alone
    key = None
    drain_started = None

    def publish():
        service.running = [job for job, _ in running.values()]

    def leave(job_id: int, finished: bool) -> None:
        job, group = running.pop(job_id)
        group.pending -= 1
        if finished:
            group.done.append(job)
        if group.pending == 0 and group.done:
            service.on_batch(group.done, time.monotonic() - group.started, group.images)

    try:
        while True:
            drain_started = _watch_stop(stop, service, batcher, drain_started)
            if drain_started is not None:
                if time.monotonic() - drain_started > drain_timeout_s:
                    for job in batcher.drain_all():  # what is running still finishes
                        job.finish(status="cancelled")
                if batcher.depth() == 0 and not running and not retry_alone:
                    break
            if running:
                admit = [] if alone else batcher.take_joinable(
                    key, batcher.max_batch * replicas - sum(job.n for job, _ in running.values()))
            elif retry_alone:
                job = retry_alone.pop(0)
                if job.finished:  # timed out or cancelled meanwhile: not run again
                    continue
                admit, alone = [job], True
            else:
                admit, alone = batcher.next_batch(idle_timeout_s=1.0, window_s=0.0), False
                if not admit:
                    engine.heartbeat()
                    continue
                key = admit[0].key
            if admit:
                group = _Group(jobs=admit, started=time.monotonic(), pending=len(admit))
                for job in admit:
                    job.started = job.started or group.started
                    running[job.id] = (job, group)
                publish()
                if len(running) > len(admit):
                    log.info("request(s) %s joined a running batch of %d request(s) at a step boundary",
                             [j.id for j in admit], len(running) - len(admit))
            outcome = engine.step([(job.id, job.payload) for job in admit])
            for job_id, error in outcome.refused.items():
                job = running[job_id][0]
                leave(job_id, finished=False)
                job.finish(error=error, status="failed")
            if outcome.error is not None:
                jobs = [running[j][0] for j in outcome.failed]
                for job_id in outcome.failed:
                    leave(job_id, finished=False)
                if len(jobs) == 1:
                    jobs[0].finish(error=outcome.error, status="failed")
                else:
                    service.metrics.retries.inc()
                    log.warning("a step of %d merged requests failed (%s); retrying each alone", len(jobs),
                                outcome.error)
                    retry_alone.extend(jobs)
                publish()
                alone = alone and bool(running)
                continue
            _count_step(running, outcome.images)
            for job_id, images in outcome.finished.items():
                job = running[job_id][0]
                leave(job_id, finished=True)
                job.finish(result=images)
            publish()
            alone = alone and bool(running)
        engine.stop()
        log.info("drained; stopped")
        return 0
    except EngineDead as e:
        return _engine_died(e, service, batcher, [job for job, _ in running.values()] + retry_alone)


def serve_worker(cfg: dict[str, Any]) -> int:
    import torch

    import xdit_fx
    from xdit_fx.plan import Plan
    from xdit_fx.serve.engine import Engine, warmup_spec

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    _setup_logging(rank)
    stop: dict[str, Any] = {"signal": None, "parent": os.getppid()}
    if rank == 0:
        def on_signal(signum, frame):  # the engine loop notices at its next turn (at most ~1 s)
            stop["signal"] = signum
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    else:  # ranks > 0 stop when rank 0 says so, after the drain; a signal must not kill them mid-batch
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    torch.set_num_threads(cfg["threads"])
    plan = Plan.from_string(cfg["plan"])
    pipe, model_id = load_served_pipeline(cfg["model"])
    if world > 1 or plan.cache is not None:
        pipe = xdit_fx.parallelize(pipe, plan)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)  # rank 0 logs progress instead (engine.Progress)
    engine = Engine(pipe, world, rank, step_batching=cfg.get("batching", "step") == "step")
    t0 = time.perf_counter()
    size = tuple(cfg["size"]) if cfg.get("size") else None
    warm = warmup_spec(pipe, size, cfg.get("num_frames"))
    out = engine.generate(warm)
    for extra in range(1 if engine.stepwise else 2, cfg["warmup_batch"] + 1):
        # capture the graphs of larger batches before serving (under step-level batching, through the steps)
        engine.warm(dataclasses.replace(warm, texts=warm.texts * extra, seeds=list(range(extra))))
    log.info("warm-up done in %.1f s", time.perf_counter() - t0)
    engine.default_extra = dict(warm.extra)  # e.g. the served num_frames: every rank must call alike
    if rank != 0:
        try:
            engine.follow()
        except Exception as e:  # noqa: BLE001 - rank 0 (or another rank) is gone
            log.error("lost rank 0: %s: %s", type(e).__name__, e)
            os._exit(DEAD_EXIT_CODE)
        if cfg.get("status_file"):  # this node's launcher reads it (another node may host rank 0)
            Path(cfg["status_file"]).write_text("drained")
        return 0
    from xdit_fx.serve.engine import read_capabilities
    engine.caps = read_capabilities(pipe, model_id, out, size)
    return _serve_rank0(cfg, engine, plan, world, stop)


def listen_socket(host: str, port: int) -> socket.socket:
    """The bound socket uvicorn serves on. Its protocol is IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on
    the connections of a socket that says it is TCP, and without it a response's header and body writes wait
    for the client's delayed ACK (40 ms per request on Linux)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def _serve_rank0(cfg: dict[str, Any], engine, plan, world: int, stop: dict) -> int:
    import uvicorn

    from xdit_fx.serve.app import Limits, Service, build_app
    from xdit_fx.serve.batcher import Batcher

    batcher = Batcher(cfg["max_batch"], cfg["batch_window_ms"] / 1000.0, cfg["max_queue"])
    limits = Limits(max_n=cfg["max_n"], max_steps=cfg["max_steps"], max_pixels_side=cfg["max_size"],
                    max_body_bytes=cfg["max_body_bytes"], request_timeout_s=cfg["request_timeout"])
    service = Service(engine.caps, batcher, limits, world, plan.to_string(), api_key=cfg["api_key"],
                      wedged_after_s=cfg["wedged_after"])
    service.step_batching = engine.stepwise
    if engine.caps.video and service.video_encoder[1] != "video/mp4":
        log.warning("PyAV (with libx264) is not installed: videos are returned as animated GIF, not MP4 "
                    "(pip install 'xdit_fx[serve]')")
    log.info("batching: %s", "step-level (requests join the running batch at step boundaries)" if engine.stepwise
             else "request-level (one pipeline call per batch)")
    service.busy_since = lambda: engine.busy_since
    service.progress = lambda: engine.progress
    app = build_app(service)

    sock = listen_socket(cfg["host"], cfg["port"])
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                           timeout_graceful_shutdown=10))
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
    http.start()
    while not server.started:
        if not http.is_alive():
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.01)
    url = f"http://{cfg['host']}:{port}"
    print(f"xdit-fx serve: {engine.caps.model_id} on {world} rank(s), plan {plan.to_string()}, "
          f"listening on {url}", flush=True)
    if cfg.get("port_file"):
        tmp = Path(cfg["port_file"] + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(cfg["port_file"])

    exit_code = engine_loop(engine, service, batcher, stop, cfg["drain_timeout"])
    if exit_code:
        time.sleep(DEAD_GRACE_S)  # /health answers 503 meanwhile
    server.should_exit = True
    http.join(timeout=15)
    log.info("HTTP closed")
    if cfg.get("status_file"):
        Path(cfg["status_file"]).write_text("drained" if exit_code == 0 else f"dead: {service.dead}")
    if exit_code:
        sys.stderr.flush()
        os._exit(exit_code)  # peers are gone: do not wait in process-group teardown
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    log.info("exiting")
    return 0
