"""The request queue and dynamic batching, independent of HTTP and of torch.

Requests (`Job`s) wait in one FIFO. The engine takes the oldest job, then keeps collecting jobs that can
share its forward (the same `Job.key`: size, steps, guidance, ...) until the batch holds `max_batch` images
or `window_s` has passed since the oldest job arrived. Jobs that do not fit stay queued, in order, for the
next batch; the oldest job always goes first, so none waits behind a stream of others.

With step-level batching (engine.py) a batch keeps running while requests leave it, and `take_joinable`
hands the engine, at each step boundary, the queued jobs that can join it: jobs of its key, in arrival
order, as long as the running images stay within `max_batch`. There the window is not waited for (the
engine passes ``window_s=0``): a job that finds the engine idle starts at once, and jobs arriving just
after it join at the next step boundary, one step later, where a window would have held the first one
back for the whole window. It stops at the first queued job that cannot
join (another key, or too many images), so that job is not overtaken: once the running batch has drained,
it goes first.

A job's outcome is delivered through a callback (the HTTP side wraps an asyncio future in it). A job is
answered exactly once: `Job.finish` ignores every call after the first, so a timeout, a disconnect and the
engine can race without sending two answers.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

_ids = itertools.count(1)


class QueueFull(Exception):
    """The queue holds `max_queue` requests; retry after `retry_after_s`."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"the queue is full; retry after {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


class NotAccepting(Exception):
    """The service is draining (SIGTERM) or its engine is down."""


@dataclass
class Job:
    """One request: `n` images of the same generation settings."""

    key: Hashable                      # requests with equal keys can share one pipeline call
    n: int                             # images in this request
    payload: Any                       # what the engine needs to run it (prompts, seeds, settings)
    on_done: Callable[["Job"], None] = lambda job: None
    id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.monotonic)
    started: float | None = None       # when its batch started running
    batch_images: int = 0              # images in the pipeline call that produced its result
    result: Any = None                 # list of images on success
    error: BaseException | None = None
    status: str = "queued"             # queued | running | done | failed | cancelled
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def finish(self, *, result: Any = None, error: BaseException | None = None, status: str = "done") -> bool:
        """Record the outcome and call `on_done`, once; returns False if the job was already finished."""
        with self._lock:
            if self.status in ("done", "failed", "cancelled"):
                return False
            self.result, self.error, self.status = result, error, status
        self.on_done(self)
        return True

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed", "cancelled")


class Batcher:
    """FIFO of jobs + the batch-forming rule. Thread-safe: HTTP threads submit, the engine thread takes."""

    def __init__(self, max_batch: int, window_s: float, max_queue: int) -> None:
        if max_batch < 1 or max_queue < 1 or window_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and window_s >= 0")
        self.max_batch, self.window_s, self.max_queue = max_batch, window_s, max_queue
        self._queue: list[Job] = []
        self._cond = threading.Condition()
        self._accepting = True
        self.seconds_per_image = 0.0     # running estimate, for Retry-After
        self.running_images = 0

    # ---- producer side --------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cond:
            if not self._accepting:
                raise NotAccepting("the service is not accepting requests")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(self.retry_after_s())
            self._queue.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job, status: str = "cancelled", error: BaseException | None = None) -> bool:
        """Drop a queued job (a running one is not interrupted); True if it was still queued."""
        with self._cond:
            if job not in self._queue:
                return False
            self._queue.remove(job)
        job.finish(status=status, error=error)
        return True

    def retry_after_s(self) -> float:
        images = sum(j.n for j in self._queue) + self.running_images
        return max(1.0, images * self.seconds_per_image)

    # ---- consumer side --------------------------------------------------------------------------------
    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False
            self._cond.notify_all()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def drain_all(self) -> list[Job]:
        """Remove and return every queued job."""
        with self._cond:
            jobs, self._queue = self._queue, []
            return jobs

    def next_batch(self, idle_timeout_s: float, window_s: float | None = None) -> list[Job]:
        """The next batch, in arrival order; [] if nothing arrived within `idle_timeout_s`.

        Waits for the oldest job's window (`window_s`, default the batcher's) to close unless the batch fills
        first. While not accepting (draining) it does not wait for the window: what is queued runs at once."""
        window = self.window_s if window_s is None else window_s
        with self._cond:
            if not self._queue:
                self._cond.wait(idle_timeout_s)
                if not self._queue:
                    return []
            while True:
                first = self._queue[0]
                batch = self._compatible(first)
                full = sum(j.n for j in batch) >= self.max_batch
                remaining = first.arrival + window - time.monotonic()
                if full or remaining <= 0 or not self._accepting:
                    break
                self._cond.wait(remaining)
                if not self._queue:  # everything was cancelled while waiting
                    return []
            for job in batch:
                self._queue.remove(job)
                job.status = "running"
            return batch

    def take_joinable(self, key: Hashable, capacity: int) -> list[Job]:
        """Queued jobs that join a running batch of `key` now (no window wait): from the head of the queue, in
        order, while they have `key` and their images fit in `capacity`."""
        taken: list[Job] = []
        with self._cond:
            for job in self._queue:
                if job.key != key or job.n > capacity:
                    break
                taken.append(job)
                capacity -= job.n
            for job in taken:
                self._queue.remove(job)
                job.status = "running"
        return taken

    def _compatible(self, first: Job) -> list[Job]:
        batch, images = [first], first.n
        for job in self._queue[1:]:
            if job.key == first.key and images + job.n <= self.max_batch:
                batch.append(job)
                images += job.n
                if images >= self.max_batch:
                    break
        return batch


def run_batch_with_retry(batch: list[Job], run: Callable[[list[Job]], list[Any]],
                         on_batch: Callable[[list[Job], float], None] = lambda jobs, s: None,
                         on_retry: Callable[[list[Job]], None] = lambda jobs: None) -> None:
    """Run `batch` through `run` (one list of images per job, in order) and finish every job.

    If the merged batch raises, each job is run alone, so one request that makes the pipeline fail does not
    fail the requests it was merged with. An exception marked `fatal` (a dead rank) is not retried: it
    propagates after failing the jobs of the batch."""
    t0 = time.monotonic()
    for job in batch:
        job.started = job.started or t0
    try:
        results = run(batch)
    except BaseException as e:  # noqa: BLE001 - any pipeline error; fatal ones are re-raised below
        if getattr(e, "fatal", False) or len(batch) == 1:
            for job in batch:
                job.finish(error=e, status="failed")
            if getattr(e, "fatal", False) or not isinstance(e, Exception):
                raise
            return
        on_retry(batch)
        for job in batch:
            if not job.finished:  # a job that timed out meanwhile is not run again
                run_batch_with_retry([job], run, on_batch, on_retry)
        return
    on_batch(batch, time.monotonic() - t0)
    total = sum(job.n for job in batch)
    for job, images in zip(batch, results):
        job.batch_images = total
        job.finish(result=images)
