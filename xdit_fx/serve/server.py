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


def engine_loop(engine, service, batcher, stop: dict, drain_timeout_s: float) -> int:
    """Rank 0's loop: form batches, run them (a failed merged batch is retried request by request),
    heartbeat while idle, drain on a signal. Returns 0 after a drain, DEAD_EXIT_CODE when the engine died
    (every running and queued request is then answered 503)."""
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
            if stop.get("parent") and os.getppid() != stop["parent"] and stop["signal"] is None:
                stop["signal"] = "the launcher is gone"  # killed outright: drain rather than serve orphaned
            if stop["signal"] is not None and drain_started is None:
                log.info("signal %s: draining %d queued request(s)", stop["signal"], batcher.depth())
                drain_started = time.monotonic()
                service.draining = True
                batcher.stop_accepting()
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
        log.error("%s; answering 503 and exiting", e)
        service.dead = str(e)
        batcher.stop_accepting()
        for job in list(service.running) + batcher.drain_all():
            job.finish(status="failed", error=e)
        return DEAD_EXIT_CODE


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
    engine = Engine(pipe, world, rank)
    t0 = time.perf_counter()
    size = tuple(cfg["size"]) if cfg.get("size") else None
    warm = warmup_spec(pipe, size, cfg.get("num_frames"))
    out = engine.generate(warm)
    for extra in range(2, cfg["warmup_batch"] + 1):  # capture the graphs of larger batches before serving
        engine.generate(dataclasses.replace(warm, texts=warm.texts * extra, seeds=list(range(extra))))
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


def _serve_rank0(cfg: dict[str, Any], engine, plan, world: int, stop: dict) -> int:
    import uvicorn

    from xdit_fx.serve.app import Limits, Service, build_app
    from xdit_fx.serve.batcher import Batcher

    batcher = Batcher(cfg["max_batch"], cfg["batch_window_ms"] / 1000.0, cfg["max_queue"])
    limits = Limits(max_n=cfg["max_n"], max_steps=cfg["max_steps"], max_pixels_side=cfg["max_size"],
                    max_body_bytes=cfg["max_body_bytes"], request_timeout_s=cfg["request_timeout"])
    service = Service(engine.caps, batcher, limits, world, plan.to_string(), api_key=cfg["api_key"],
                      wedged_after_s=cfg["wedged_after"])
    service.busy_since = lambda: engine.busy_since
    service.progress = lambda: engine.progress
    app = build_app(service)

    sock = socket.socket(socket.AF_INET6 if ":" in cfg["host"] else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((cfg["host"], cfg["port"]))
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
