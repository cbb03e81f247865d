"""spawn_gloo: run a function on N CPU processes joined by a gloo process group; return rank 0's result."""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_bytes import DistBytes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn, args, out_dir: str, count_bytes: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        if count_bytes:
            with DistBytes() as counted, reported_bytes() as reported:
                result = fn(rank, world_size, *args)
            check_counts(counted, reported)
        else:
            result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        # every rank done before any tears its gloo pairs down: a rank that destroys the group while a peer
        # still has traffic in flight can abort that peer ("terminate called without an active exception")
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def reported_bytes():
    """Bytes xdit_fx's wrappers report while the block runs (every `CommCounter.add`, whichever counter and
    whatever resets it), per process group name."""
    from xdit_fx.runtime.collectives import CommCounter

    tally: dict[str, int] = {}
    real = CommCounter.add

    def add(self, group_name: str, op: str, nbytes: int) -> None:
        tally[group_name] = tally.get(group_name, 0) + int(nbytes)
        return real(self, group_name, op, nbytes)

    CommCounter.add = add
    try:
        yield tally
    finally:
        CommCounter.add = real


def check_counts(counted: DistBytes, reported: dict[str, int]) -> None:
    """The bytes xdit_fx reported moving equal the bytes received through torch.distributed, per process
    group: nothing moves uncounted, nothing is counted twice."""
    reported = {g: b for g, b in reported.items() if b}
    moved = {g: b for g, b in counted.bytes.items() if b}
    assert not counted.unsupported, f"torch.distributed calls the byte check cannot count: {counted.unsupported}"
    assert reported == moved, f"bytes reported by xdit_fx {reported} != bytes received through torch.distributed {moved}"


def spawn_gloo(world_size: int, fn, *args, count_bytes: bool = True):
    """Run fn(rank, world_size, *args) on `world_size` processes; return the list of per-rank results.

    With `count_bytes` (the default), every torch.distributed call of the worker is counted (`DistBytes`) and
    must equal what xdit_fx reported; a test whose own code calls torch.distributed turns it off.
    If a rank raises, mp.spawn terminates the others and re-raises here (no hang)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world_size, free_port(), fn, args, out_dir, count_bytes), nprocs=world_size, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
