"""CFG and data parallel: the batch of each transformer call is shared by the "batch" ranks (dp x cfg).

Two ways to share it, chosen per call from shapes alone (no knowledge of the pipeline or the model):

* **Split** (batched calls): a call with batch B runs on k = min(B, dp*cfg) chunks of ``tensor_split``; each
  batch rank computes one chunk and the chunks are all-gathered back into the full output. This covers
  pipelines that batch the conditional and unconditional branches into one call (SD3, PixArt, DiT), several
  prompts, and ``num_images_per_prompt``. Batch elements are independent, so the result is the serial one.
* **Paired** (two-call pipelines, batch too small to split): pipelines such as Flux's true CFG or Wan call
  the transformer twice per step (conditional, then unconditional). During the first denoising step every
  rank runs every call and the step's calls are counted (`PairState`, fed by a hook on ``scheduler.step``).
  If the step made exactly two calls of the same shape, later steps alternate: cfg rank 0 computes the first
  call of each pair, cfg rank 1 the second, and the ranks that skip a call return a NaN-filled buffer of the
  recorded shape. When the second call ends, the two results are exchanged over the cfg group and written
  *in place* into the buffers already handed out, so both ranks hold both branches before the pipeline
  combines them. A pipeline that read the first result before making the second call would see NaN; the
  scheduler hook checks for exactly that and raises instead of producing a wrong image.

Which inputs are batched: every tensor (also inside lists, tuples and dicts) whose first dimension equals
the batch size, which is the first dimension of ``hidden_states`` (or of the first tensor argument).
Scalars and tensors whose first dimension differs (timesteps of shape [1], rotary ids, ...) are passed
whole.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from xdit_fx.errors import XditFxError
from xdit_fx.plan import Plan
from xdit_fx.ops import comm
from xdit_fx.ops.collectives import _group
from xdit_fx.runtime.groups import ProcessGroups

log = logging.getLogger(__name__)


# ---- pytrees of call arguments and outputs ---------------------------------------------------------------

def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Apply fn to every tensor in nested tuples, lists, dicts and diffusers ``BaseOutput`` objects."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):  # BaseOutput is an OrderedDict subclass built from its fields
        mapped = {k: map_tensors(v, fn) for k, v in obj.items()}
        return mapped if type(obj) is dict else type(obj)(**mapped)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def tensors_of(obj: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    map_tensors(obj, found.append)
    return found


def batch_size(args: tuple, kwargs: dict) -> int | None:
    """The batch of a call: the first dimension of ``hidden_states`` or of the first tensor argument."""
    hidden = kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        tensors = tensors_of(args) or tensors_of(kwargs)
        hidden = tensors[0] if tensors else None
    return int(hidden.shape[0]) if isinstance(hidden, torch.Tensor) and hidden.dim() > 0 else None


def chunk_sizes(total: int, k: int) -> list[int]:
    """Sizes of ``torch.tensor_split(x, k)`` along a dimension of length `total`."""
    return [total // k + (1 if i < total % k else 0) for i in range(k)]


def take_chunk(obj: Any, batch: int, k: int, index: int) -> Any:
    def take(t: torch.Tensor) -> torch.Tensor:
        if t.dim() > 0 and t.shape[0] == batch:
            return torch.tensor_split(t, k, dim=0)[index]
        return t
    return map_tensors(obj, take)


# ---- collectives over the batch axes ---------------------------------------------------------------------

def gather_chunks(out: Any, group: str, sizes: list[int], index: int) -> Any:
    """All-gather each batched output tensor over `group` and concatenate chunks 0..len(sizes)-1.

    Every rank of the group contributes its chunk padded to the largest size; ranks whose chunk index
    repeats one already taken (when the batch is smaller than the group) are dropped."""
    pg = _group(group)
    n = dist.get_world_size(pg)
    width = max(sizes)

    def gather(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0 or t.shape[0] != sizes[index]:
            return t
        padded = t.contiguous()
        if t.shape[0] < width:
            padded = torch.cat([t, t.new_zeros((width - t.shape[0], *t.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in range(n)]
        dist.all_gather(parts, padded, group=pg)
        comm.record(group, "all_gather", (n - 1) * padded.numel() * padded.element_size())
        return torch.cat([parts[i][: sizes[i]] for i in range(len(sizes))])
    return map_tensors(out, gather)


def exchange_branches(mine: Any, theirs_buffer: Any, group: str, cfg_rank: int) -> None:
    """Over the 2-rank cfg group: send my branch's tensors, write the peer's into `theirs_buffer`."""
    pg = _group(group)
    for a, b in zip(tensors_of(mine), tensors_of(theirs_buffer), strict=True):
        parts = [torch.empty_like(a), torch.empty_like(a)]
        dist.all_gather(parts, a.contiguous(), group=pg)
        comm.record(group, "all_gather", a.numel() * a.element_size())
        b.copy_(parts[1 - cfg_rank])


# ---- pairing state (one per pipeline) --------------------------------------------------------------------

@dataclass
class PairState:
    """What the pipeline-level hooks tell the transformers about denoising steps."""

    step: int = 0
    calls_in_step: int = 0
    first_step_calls: list[tuple[int, Any]] = field(default_factory=list)  # (batch, output) of step 0
    paired: bool = False
    templates: list[Any] = field(default_factory=list)  # the two outputs of step 0, when paired
    pending: Any = None  # output handed out for the first call of the current pair

    def reset(self) -> None:
        self.__init__()

    def end_step(self, model_output: Any, cfg_degree: int, batch_degree: int) -> None:
        """Called by the scheduler.step hook: decide pairing after step 0; catch early reads of a pair."""
        if self.paired and any(torch.isnan(t).any() for t in tensors_of(model_output)):
            raise XditFxError(
                "cfg parallel (two-call mode): the scheduler received NaN, which means the pipeline used the "
                "first transformer output of a step before making the second call, so the branch computed "
                "on the other rank was not there yet. Use a pipeline that batches both branches, or "
                "cfg_degree=1 for this pipeline.")
        if self.step == 0 and cfg_degree == 2:
            calls = self.first_step_calls
            same = len(calls) == 2 and calls[0][0] == calls[1][0] and [
                (t.shape, t.dtype) for t in tensors_of(calls[0][1])] == [
                (t.shape, t.dtype) for t in tensors_of(calls[1][1])]
            self.paired = same and calls[0][0] < batch_degree
            self.templates = [calls[0][1], calls[1][1]] if self.paired else []
            if not self.paired and calls and calls[0][0] < batch_degree:
                log.warning("cfg_degree=2 but the pipeline made %d transformer call(s) of batch %d in its first "
                            "step: nothing to split or pair, so the cfg ranks duplicate the work. Is guidance "
                            "enabled (guidance_scale, or true_cfg_scale with a negative prompt, above 1; in "
                            "xdit-fx generate: --guidance_scale, or --true_cfg_scale with --negative_prompt)?",
                            len(calls), calls[0][0])
        self.first_step_calls = []
        self.step += 1
        self.calls_in_step = 0
        self.pending = None


# ---- the per-call splitter -------------------------------------------------------------------------------

class BatchSplitter:
    """Runs one transformer call over the batch ranks: split (or pair) the inputs, gather the outputs."""

    def __init__(self, plan: Plan, groups: ProcessGroups) -> None:
        self.plan = plan
        self.groups = groups
        self.dp_rank = groups.coords["dp"]
        self.cfg_rank = groups.coords["cfg"]
        self.batch_rank = self.dp_rank * plan.cfg_degree + self.cfg_rank
        self.state: PairState | None = None  # set by the pipeline wrapper; None for a bare module
        self.split_group: str | None = None  # c10d name of the group sharing the running call's batch
        self._warned_duplicates = False

    def __call__(self, run: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        batch = batch_size(args, kwargs)
        if batch is None:
            raise XditFxError("cfg/dp parallel needs a tensor argument whose first dimension is the batch; "
                              "this call has none.")
        state = self.state
        if state is not None and state.paired and batch < self.plan.batch_degree:
            return self._paired(run, args, kwargs, batch, state)
        out = self._split(run, args, kwargs, batch, "batch", self.plan.batch_degree, self.batch_rank)
        if state is not None:
            if state.step == 0:
                state.first_step_calls.append((batch, out))
            state.calls_in_step += 1
        if batch < self.plan.batch_degree and (state is None or state.step > 0) and not self._warned_duplicates:
            self._warned_duplicates = True
            log.warning("a transformer call of batch %d is shared by %d batch ranks (dp x cfg): %d of them "
                        "duplicate work. Generate more images per call, or lower dp/cfg.",
                        batch, self.plan.batch_degree, self.plan.batch_degree - batch)
        return out

    def _split(self, run, args, kwargs, batch: int, group: str, degree: int, rank: int) -> Any:
        if degree == 1:
            self.split_group = None
            return run(*args, **kwargs)
        self.split_group = self.groups.names[group]
        k = min(batch, degree)
        index = rank % k
        out = run(*take_chunk(args, batch, k, index), **take_chunk(kwargs, batch, k, index))
        return gather_chunks(out, self.groups.names[group], chunk_sizes(batch, k), index)

    def _paired(self, run, args, kwargs, batch: int, state: PairState) -> Any:
        parity = state.calls_in_step % 2
        template = state.templates[parity]
        if self.cfg_rank == parity:
            mine = self._split(run, args, kwargs, batch, "dp", self.plan.dp_degree, self.dp_rank)
            if [t.shape for t in tensors_of(mine)] != [t.shape for t in tensors_of(template)]:
                raise XditFxError("cfg parallel (two-call mode): this call's output shapes differ from those of "
                                  "the first step; the pipeline's calls are not pairs of the same shape.")
        else:
            mine = map_tensors(template, lambda t: torch.full_like(t, math.nan))
        state.calls_in_step += 1
        if parity == 0:
            state.pending = mine
            return mine
        first, second = state.pending, mine
        if self.cfg_rank == 0:  # I computed the first call: send it, receive the second into its buffer
            exchange_branches(first, second, self.groups.names["cfg"], self.cfg_rank)
        else:
            exchange_branches(second, first, self.groups.names["cfg"], self.cfg_rank)
        state.pending = None
        return second

