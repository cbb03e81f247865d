"""Start N local processes through torchrun's launcher API (torch.distributed.launcher).

torchrun's agent watches the workers: when one fails, the others are stopped and the error is raised
here with the failing rank, so a crashed rank never leaves its peers waiting in a collective.

Like torchrun, each rank gets OMP_NUM_THREADS=1 unless the caller's environment sets it: N ranks with every
core's threads each would oversubscribe the cores N times.

Ranks start as fresh interpreters ("spawn") unless XDIT_FX_START_METHOD=forkserver: then they fork from
multiprocessing's fork server, which imports the modules named with `multiprocessing.set_forkserver_preload`
once, so a process that launches many times (the test suite) pays torch's and diffusers' imports (~6 s of CPU
per rank) once instead of per rank and launch. A forked rank gets the launching process's environment as it
is at the launch (plus the launcher's rank variables), as a spawned one would.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import uuid
from typing import Any, Callable, Sequence


def launch(entrypoint: Callable[..., Any] | str, nproc: int, args: Sequence[Any] = (),
           env: dict[str, str] | None = None) -> dict[int, Any]:
    """Run `entrypoint(*args)` (a picklable function, or a program path run with `args`) on `nproc`
    local processes with RANK/WORLD_SIZE/MASTER_* set; return {rank: return value}."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    start_method = os.environ.get("XDIT_FX_START_METHOD", "spawn")
    if start_method not in ("spawn", "forkserver"):
        raise ValueError(f"XDIT_FX_START_METHOD={start_method!r}: use 'spawn' (the default) or 'forkserver'")
    if start_method == "forkserver" and not callable(entrypoint):
        start_method = "spawn"  # a program path runs as a subprocess either way
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the workers inherit this process's environment
    # port 0, as `torchrun --standalone` does: the c10d rendezvous binds its TCPStore to a port the OS picks
    # and the workers join through that same store (TORCHELASTIC_USE_AGENT_STORE), so no port is chosen
    # beforehand and then lost to another process
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"xdit-fx-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
        monitor_interval=0.1, start_method=start_method,
    )
    if start_method == "forkserver":
        entrypoint, args = _in_environ, (dict(os.environ), entrypoint, *args)
    try:
        return elastic_launch(config, entrypoint)(*args)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


#: what torch's elastic agent sets per rank (local_elastic_agent.py), kept over the launching environment
_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "LOCAL_WORLD_SIZE", "WORLD_SIZE",
                  "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCH_NCCL_ASYNC_ERROR_HANDLING")


def _in_environ(environ: dict[str, str], fn: Callable[..., Any], *args: Any) -> Any:
    """A forked rank: the fork server's environment replaced by the launching process's, rank variables kept."""
    rank_vars = {k: v for k, v in os.environ.items() if k in _LAUNCHER_VARS or k.startswith("TORCHELASTIC_")}
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(rank_vars)
    if environ.get("OMP_NUM_THREADS"):  # a spawned rank's torch reads it at start; the forked one started already
        import torch

        torch.set_num_threads(int(environ["OMP_NUM_THREADS"]))
    return fn(*args)


@contextlib.contextmanager
def quiet_launcher():
    """The agent's own report of a failed rank, and of the ranks it then stops, off inside the block: the
    caller says what failed, once."""
    loggers = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.multiprocessing")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def run_script(script: str, nproc: int, script_args: Sequence[str]) -> int:
    """`xdit-fx run --nproc N script.py args...`: run a Python script on N local processes. A rank that fails
    stops the others; its traceback is what it printed, and one line says which rank and exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    with quiet_launcher():
        try:
            launch(sys.executable, nproc, ["-u", script, *script_args])
        except ChildFailedError as e:
            rank, failure = e.get_first_failure()
            print(f"xdit-fx run: error: rank {rank} of {nproc} exited with code {failure.exitcode} "
                  f"(its output is above); the other ranks were stopped.", file=sys.stderr)
            return 1
    return 0
