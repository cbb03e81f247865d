"""Counting the bytes the ops move, per call and per owner, without process-wide state.

Every op that communicates calls `record(group, op, nbytes)` with the bytes *this rank receives from other
ranks*. Those bytes go to the counters active in the current context: `counting()` activates one for the
duration of a `with` block, and blocks nest (a ParallelModule counts its forward while a caller counts the
whole generation around it). Two parallelized models in one process therefore never see each other's
traffic, and nothing is counted outside a `with` block.

A counter keys bytes by mesh axis when it knows the group's axis (`axes`: c10d group name -> axis name),
else by the group name.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from contextvars import ContextVar
from typing import Iterator, Mapping

_ACTIVE: ContextVar[tuple["CommCounter", ...]] = ContextVar("xdit_fx_comm_counters", default=())


class CommCounter:
    """Bytes received per axis and op, and the number of calls, since the last reset."""

    def __init__(self, axes: Mapping[str, str] | None = None) -> None:
        self.axes = dict(axes or {})
        self.reset()

    def reset(self) -> None:
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)

    def add(self, group_name: str, op: str, nbytes: int) -> None:
        axis = self.axes.get(group_name, group_name)
        self.bytes[(axis, op)] += int(nbytes)
        self.calls[(axis, op)] += 1

    def total(self, axis: str | None = None, op: str | None = None) -> int:
        return sum(v for (a, o), v in self.bytes.items() if (axis is None or a == axis) and (op is None or o == op))

    def snapshot(self) -> dict[str, dict[str, int]]:
        """{axis: {op: bytes}}, sorted."""
        out: dict[str, dict[str, int]] = {}
        for (axis, op), v in sorted(self.bytes.items()):
            out.setdefault(axis, {})[op] = v
        return out


def record(group_name: str, op: str, nbytes: int) -> None:
    """Count `nbytes` received by `op` over the group named `group_name` in every active counter."""
    for counter in _ACTIVE.get():
        counter.add(group_name, op, nbytes)


@contextlib.contextmanager
def counting(counter: CommCounter | None = None, axes: Mapping[str, str] | None = None) -> Iterator[CommCounter]:
    """Count what the ops move inside the block (into `counter`, or a new one with `axes`)."""
    counter = counter if counter is not None else CommCounter(axes)
    token = _ACTIVE.set(_ACTIVE.get() + (counter,))
    try:
        yield counter
    finally:
        _ACTIVE.reset(token)


def all_reduce_received(nbytes: int, n: int) -> int:
    """Bytes a rank receives in an all-reduce of `nbytes` over n ranks: 2 (n-1)/n of it (ring algorithm)."""
    return nbytes * 2 * (n - 1) // n
