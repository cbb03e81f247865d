"""Start N local processes through torchrun's launcher API (torch.distributed.launcher).

torchrun's agent watches the workers: when one fails, the others are stopped and the error is raised
here with the failing rank, so a crashed rank never leaves its peers waiting in a collective.
"""

from __future__ import annotations

import os
import sys
import uuid
from typing import Any, Callable, Sequence


def launch(entrypoint: Callable[..., Any] | str, nproc: int, args: Sequence[Any] = (),
           env: dict[str, str] | None = None) -> dict[int, Any]:
    """Run `entrypoint(*args)` (a picklable function, or a program path run with `args`) on `nproc`
    local processes with RANK/WORLD_SIZE/MASTER_* set; return {rank: return value}."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if env:
        os.environ.update(env)
    # port 0, as `torchrun --standalone` does: the c10d rendezvous binds its TCPStore to a port the OS picks
    # and the workers join through that same store (TORCHELASTIC_USE_AGENT_STORE), so no port is chosen
    # beforehand and then lost to another process
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"xdit-fx-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
        monitor_interval=0.1, start_method="spawn",
    )
    return elastic_launch(config, entrypoint)(*args)


def run_script(script: str, nproc: int, script_args: Sequence[str]) -> None:
    """`xdit-fx run --nproc N script.py args...`: run a Python script on N local processes."""
    launch(sys.executable, nproc, ["-u", script, *script_args])
