"""Bytes a rank receives, counted at the torch.distributed primitives themselves.

xdit_fx's own counter (`pm.last_comm`) is filled by its wrappers around the collectives, so a direct
`torch.distributed` call somewhere in the runtime would move bytes that no test sees. `DistBytes` patches the
primitives for the duration of a block and counts, per process group name, what this rank receives:

  all_to_all_single        (N-1)/N of the output (equal splits)
  all_gather / _into_tensor (N-1) x the input
  gather                   (N-1) x the input on the destination, 0 elsewhere
  broadcast                the tensor on every rank but the source
  all_reduce               2 (N-1)/N of the tensor (a ring all-reduce: reduce-scatter, then all-gather)
  recv, batch_isend_irecv  the receive buffers
  barrier, send, isend     nothing

`spawn_gloo` runs every test worker inside one and fails the test when its totals differ from xdit_fx's.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

_PATCHED = ("all_to_all_single", "all_gather", "all_gather_into_tensor", "gather", "broadcast", "all_reduce",
            "recv", "batch_isend_irecv", "all_gather_object", "broadcast_object_list", "scatter", "reduce_scatter",
            "reduce_scatter_tensor", "reduce", "all_to_all")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _group_of(group) -> tuple[str, int, int]:
    pg = group if group is not None else c10d._get_default_group()
    return c10d._get_process_group_name(pg), dist.get_world_size(pg), dist.get_rank(pg)


class DistBytes:
    """Counts the bytes this rank receives through torch.distributed while the block runs (see the module)."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)
        self.unsupported: list[str] = []
        self._saved: dict[str, object] = {}

    def total(self) -> int:
        return sum(self.bytes.values())

    def _add(self, group, nbytes: int) -> None:
        self.bytes[_group_of(group)[0]] += int(nbytes)

    def _wrap(self, name: str):
        real = getattr(dist, name)

        def all_to_all_single(output, input, *args, group=None, **kw):
            _, n, _ = _group_of(group)
            self._add(group, _nbytes(output) * (n - 1) // n)
            return real(output, input, *args, group=group, **kw)

        def all_gather(tensor_list, tensor, group=None, async_op=False):
            self._add(group, _nbytes(tensor) * (_group_of(group)[1] - 1))
            return real(tensor_list, tensor, group=group, async_op=async_op)

        def all_gather_into_tensor(output, input, group=None, async_op=False):
            self._add(group, _nbytes(input) * (_group_of(group)[1] - 1))
            return real(output, input, group=group, async_op=async_op)

        def gather(tensor, gather_list=None, dst=None, group=None, async_op=False, **kw):
            _, n, _ = _group_of(group)
            if dist.get_rank() == dst:
                self._add(group, _nbytes(tensor) * (n - 1))
            return real(tensor, gather_list, dst=dst, group=group, async_op=async_op, **kw)

        def broadcast(tensor, src=None, group=None, async_op=False, **kw):
            if dist.get_rank() != src:
                self._add(group, _nbytes(tensor))
            return real(tensor, src=src, group=group, async_op=async_op, **kw)

        def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            _, n, _ = _group_of(group)
            self._add(group, _nbytes(tensor) * 2 * (n - 1) // n)
            return real(tensor, op=op, group=group, async_op=async_op)

        def recv(tensor, src=None, group=None, tag=0, **kw):
            self._add(group, _nbytes(tensor))
            return real(tensor, src=src, group=group, tag=tag, **kw)

        def batch_isend_irecv(p2p_op_list):
            for op in p2p_op_list:
                if op.op is c10d.irecv:
                    self._add(op.group, _nbytes(op.tensor))
            return real(p2p_op_list)

        def not_counted(*args, **kw):
            self.unsupported.append(name)
            return real(*args, **kw)

        return locals().get(name, not_counted)

    def __enter__(self) -> "DistBytes":
        for name in _PATCHED:
            self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
