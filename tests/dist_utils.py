"""spawn_gloo: run a function on N CPU processes joined by a gloo process group; return every rank's result.

The processes meet through a FileStore in a fresh temporary directory (``init_method="file://..."``), so no
TCP port is picked in advance (a port found free and released can be taken by another job before the
store binds it)."""

from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_bytes import DistBytes


def collective_timeout_s(world_size: int) -> float:
    """How long a collective may wait for its peers before gloo gives up.

    The suite runs up to 8 single-threaded processes on 2 shared CPU cores: a rank can wait for a peer that
    is compiling or simply not scheduled for a long while, so the bound grows with the processes per core.
    It only has to end a real hang; a rank that raises stops its peers at once (start_processes terminates them)."""
    return 120.0 * max(1.0, world_size / 2)


def _worker(rank: int, world_size: int, init_file: str, fn, args, out_dir: str, count_bytes: bool,
            environ: dict) -> None:
    # a forked worker starts with the fork server's environment: take the test's, as a spawned one would
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=collective_timeout_s(world_size)))
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
    """Bytes xdit_fx's ops report while the block runs (every `comm.record`, whether or not a counter is
    active), per process group name."""
    from xdit_fx.ops import comm

    tally: dict[str, int] = {}
    real = comm.record

    def record(group_name: str, op: str, nbytes: int) -> None:
        tally[group_name] = tally.get(group_name, 0) + int(nbytes)
        return real(group_name, op, nbytes)

    comm.record = record
    try:
        yield tally
    finally:
        comm.record = real


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
    If a rank raises, the others are terminated and the error re-raised here (no hang). The ranks fork from
    the fork server that conftest.py preloads."""
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "store")  # must not exist yet; the FileStore creates it
        mp.start_processes(_worker, args=(world_size, init_file, fn, args, out_dir, count_bytes, dict(os.environ)),
                           nprocs=world_size, join=True, start_method="forkserver")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def _run_jobs(rank: int, world_size: int, jobs: dict) -> dict:
    """Each job as if it ran first in the process: Dynamo's caches emptied and the default seed back."""
    seed = torch.initial_seed()
    results = {}
    for key, (fn, args) in jobs.items():
        torch._dynamo.reset()
        torch.manual_seed(seed)
        results[key] = fn(rank, world_size, *args)
    return results


class SharedSpawn:
    """Several tests' workers in one spawn of `world_size` processes: the process start-up and imports are
    paid once. `jobs` maps a key to (fn, args); the first `results(key)` runs every job, in order, and keeps
    their per-rank results for the session (read-only: each test reads its own job's results).

    A job that raises fails every test of the spawn, which is what a single spawn per test would report for
    that job's tests too."""

    def __init__(self, world_size: int, jobs: dict) -> None:
        self.world_size, self.jobs = world_size, dict(jobs)
        self._per_rank: list[dict] | None = None

    def results(self, key) -> list:
        """The per-rank results of job `key` (spawn_gloo's list)."""
        if self._per_rank is None:
            self._per_rank = spawn_gloo(self.world_size, _run_jobs, self.jobs)
        return [r[key] for r in self._per_rank]
