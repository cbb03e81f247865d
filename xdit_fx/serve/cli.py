"""`xdit-fx serve`: flags, checks made before any process starts, and the launch over N ranks."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any

from xdit_fx.errors import PlanError, XditFxError

API_KEY_ENV = "XDIT_FX_API_KEY"
SERVE_DEPS = ("fastapi", "uvicorn", "pydantic", "prometheus_client", "PIL")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a local diffusers pipeline folder (default: the embedded digits model)")
    p.add_argument("--plan", default=None, help="a plan string as parallelize takes it, e.g. 'cfg=2' or "
                                                "'dp=2', or 'auto' with --nproc (the cost model's choice; default: "
                                                "one rank, no plan)")
    p.add_argument("--nproc", type=int, default=None, help="ranks on this node (default: the plan's world size "
                                                           "divided by --nnodes)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port; see --port-file)")
    p.add_argument("--port-file", default=None, help="write the bound port here once the server listens")
    p.add_argument("--max-batch", type=int, default=8, help="most images merged into one pipeline call (under a dp-only plan with "
                                                              "step-level batching: per dp rank)")
    p.add_argument("--batch-window-ms", type=float, default=20.0,
                   help="request-level batching: how long the oldest queued request waits for others to share its "
                        "call (step-level batching starts a request at once; later ones join at step boundaries)")
    p.add_argument("--batching", choices=("step", "request"), default="step",
                   help="step (default): a request joins the running batch at the next denoising step and leaves "
                        "when its own steps end, where the pipeline exposes its steps (the digits model; other "
                        "pipelines fall back to request); request: one pipeline call per batch, all its steps")
    p.add_argument("--max-queue", type=int, default=256, help="queued requests beyond which new ones get 429")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds from arrival after which a request is answered 504")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every endpoint but /health "
                        f"(or set {API_KEY_ENV})")
    p.add_argument("--max-n", type=int, default=8, help="most images per request")
    p.add_argument("--max-steps", type=int, default=100, help="most num_inference_steps per request")
    p.add_argument("--max-size", type=int, default=2048, help="most pixels per image side")
    p.add_argument("--max-body-bytes", type=int, default=65536, help="largest request body (413 above)")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="on SIGTERM, seconds to finish queued requests before answering the rest 503")
    p.add_argument("--size", default=None, help="default WIDTHxHEIGHT of a request without `size`, and of the "
                                               "warm-up generation (default: the pipeline's own)")
    p.add_argument("--num-frames", type=int, default=None,
                   help="video pipelines: default frames of a job without num_frames (default: the pipeline's)")
    p.add_argument("--warmup-batch", type=int, default=1,
                   help="before serving, also run batches of 2..B outputs (graphs are captured per batch size)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: cores / ranks)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes (launcher processes) that share the ranks")
    p.add_argument("--rdzv-endpoint", default=None,
                   help="with --nnodes > 1: host:port of the c10d rendezvous, the same on every node")
    p.add_argument("--rdzv-id", default=None, help="with --nnodes > 1: a job id, the same on every node")


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Check everything that needs no process; return the config every rank receives."""
    from xdit_fx.plan import Plan

    missing = [name for name in SERVE_DEPS if importlib.util.find_spec(name) is None]
    if missing:
        raise XditFxError(f"xdit-fx serve needs {', '.join(missing)}: pip install 'xdit_fx[serve]'")
    if args.plan and args.plan.strip().lower() == "auto":
        from xdit_fx.debug.planning import resolve_auto

        if args.nproc is None:
            raise PlanError("--plan auto needs --nproc N (the ranks per node to plan for)")
        width, height = (int(x) for x in args.size.lower().split("x")) if args.size else (None, None)
        args.plan = resolve_auto(args.model, args.nproc * args.nnodes, height=height, width=width,
                                 frames=args.num_frames, images=args.max_batch)
    plan = Plan.from_string(args.plan) if args.plan else Plan()
    if args.nnodes < 1:
        raise PlanError(f"--nnodes must be >= 1, got {args.nnodes}")
    nproc = args.nproc if args.nproc is not None else max(1, plan.world_size // args.nnodes)
    plan.check_world_size(nproc * args.nnodes)
    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise PlanError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
    if args.model is not None and not (Path(args.model) / "model_index.json").is_file():
        raise PlanError(f"--model {args.model!r}: not a diffusers pipeline folder (no model_index.json there); "
                        "pass a folder saved with save_pretrained, or leave --model out for the digits model")
    for flag in ("max_batch", "max_queue", "max_n", "max_steps", "max_size", "max_body_bytes", "warmup_batch"):
        if getattr(args, flag) < 1:
            raise PlanError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.request_timeout <= 0 or args.batch_window_ms < 0 or args.drain_timeout < 0:
        raise PlanError("--request-timeout must be > 0, --batch-window-ms and --drain-timeout >= 0")
    if not 0 <= args.port < 65536:
        raise PlanError(f"--port must be in [0, 65535], got {args.port}")
    if args.port:
        _check_port(args.host, args.port)
    size = None
    if args.size is not None:
        parts = args.size.lower().split("x")
        if len(parts) != 2 or not all(x.isdigit() and int(x) > 0 for x in parts):
            raise PlanError(f"--size must be WIDTHxHEIGHT such as 1024x1024, got {args.size!r}")
        size = [int(parts[0]), int(parts[1])]
    if args.num_frames is not None and args.num_frames < 1:
        raise PlanError(f"--num-frames must be >= 1, got {args.num_frames}")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    threads = args.threads or max(1, (os.cpu_count() or 1) // nproc)
    return {
        "model": args.model, "plan": plan.to_string(), "nproc": nproc, "host": args.host, "port": args.port,
        "port_file": args.port_file, "max_batch": args.max_batch, "batching": args.batching, "batch_window_ms": args.batch_window_ms,
        "max_queue": args.max_queue, "request_timeout": args.request_timeout, "api_key": api_key,
        "max_n": args.max_n, "max_steps": args.max_steps, "max_size": args.max_size,
        "max_body_bytes": args.max_body_bytes, "drain_timeout": args.drain_timeout,
        "warmup_batch": args.warmup_batch, "threads": threads, "size": size, "num_frames": args.num_frames,
        "wedged_after": max(600.0, 2 * args.request_timeout),
        "nnodes": args.nnodes, "rdzv_endpoint": args.rdzv_endpoint, "rdzv_id": args.rdzv_id,
    }


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise PlanError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port, or --port 0") \
                from None


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with tempfile.TemporaryDirectory(prefix="xdit-fx-serve-") as tmp:
        cfg["status_file"] = os.path.join(tmp, "status")
        config_path = os.path.join(tmp, "config.json")
        with open(os.open(config_path, os.O_WRONLY | os.O_CREAT, 0o600), "w", encoding="utf-8") as f:
            json.dump(cfg, f)  # the API key stays out of the command line
        endpoint = cfg["rdzv_endpoint"] or f"127.0.0.1:{_free_port()}"
        launch = LaunchConfig(
            min_nodes=cfg["nnodes"], max_nodes=cfg["nnodes"], nproc_per_node=cfg["nproc"],
            run_id=cfg["rdzv_id"] or f"xdit-fx-serve-{uuid.uuid4().hex[:8]}", rdzv_backend="c10d",
            rdzv_endpoint=endpoint, max_restarts=0, monitor_interval=0.1, start_method="spawn",
            shutdown_timeout=int(cfg["drain_timeout"] + 30))
        try:
            elastic_launch(launch, sys.executable)("-m", "xdit_fx.serve.worker", config_path)
        except SignalException:
            # SIGTERM/SIGINT reached the launcher, which passed it on to the ranks and waited for them:
            # rank 0 writes "drained" after answering everything it had accepted.
            status = Path(cfg["status_file"])
            return 0 if status.is_file() and status.read_text() == "drained" else 1
        except Exception as e:  # noqa: BLE001 - ChildFailedError: a rank died; torchrun stopped the others
            failures = getattr(e, "failures", None)
            if failures:
                detail = "; ".join(f"rank {r} exited with {f.exitcode}" for r, f in sorted(failures.items()))
            else:
                detail = f"{type(e).__name__}: {e}"
            print(f"xdit-fx serve: stopped: {detail}", flush=True)
            return 1
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
