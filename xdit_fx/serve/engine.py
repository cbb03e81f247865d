"""The generation engine: the same parallelized pipeline on every rank, batches sent from rank 0.

Rank 0 forms batches (batcher.py) and sends each one to every rank: a message is a broadcast header (a small
int tensor: the operation, and whether arguments follow), then its arguments with ``broadcast_object_list``
when it has any. The commonest message, "take the next step of the running set" with nobody joining, is
the header alone: one collective per step, no pickling. All ranks then call the pipeline with the same
arguments (that is how `parallelize` expects to be driven) and reduce or gather a success flag, so a failure
on any rank is known on rank 0. While idle, rank 0 broadcasts a heartbeat every second: the other ranks
never sit in a collective long enough to time out, and a dead rank is noticed within a second even when no
request is running.

What the pipeline can do is read from its call signature and from one warm-up generation, never from its
class: `prompt` or `class_labels` (with ``get_label_ids`` turning text into labels), `height`/`width`,
`negative_prompt`, the default steps and guidance, and whether it returns `.images` or `.frames`.
Every image gets its own ``torch.Generator`` seeded from the request, so a seeded request gives the same
image whether it runs alone or merged with others.

Two ways to run requests:

* **step-level** (`Engine.step`), when the pipeline exposes its loop one step at a time (``start_denoising``,
  ``denoise_step``, ``finish_denoising``: the digits pipeline) and the plan keeps no state across steps (no
  cache, no PipeFusion): every rank holds the same set of running requests, each with its own latents,
  step index and schedule. Rank 0 broadcasts one message per denoising step naming the requests that join
  at this step boundary; all ranks take one step of every running request in one transformer call, and a
  request leaves the set when its own steps end. So a request that arrives while others run starts at the
  next step, not after them.

  Under a data-parallel-only plan (``dp=N``, every other degree 1) the ranks are replicas: splitting each
  transformer call over them gains little when a call holds few images (a small model's call costs about
  the same at batch 1 as at 2), so instead each running request belongs to one replica (`assign_replicas`:
  the one with the fewest running images when it joins), every rank takes the step of its own requests
  with its unsplit model and only counts the others' step, and a request that ends on a rank other than 0
  sends its latents to rank 0 (one broadcast). --max-batch then bounds each replica's call. The steps stay in lockstep (the same messages and status
  all-reduce); a request's image is the one a single rank gives.
* **request-level** (`Engine.run`), for every other pipeline (diffusers pipelines run their own loop inside
  ``__call__``): one pipeline call per batch of requests, all their steps.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from xdit_fx.errors import XditFxError

log = logging.getLogger("xdit_fx.serve")

HEARTBEAT_S = 1.0
OPS = ("ping", "stop", "step", "run")   # message header codes (index = code)


class EngineDead(XditFxError):
    """A rank is gone or a collective failed: the engine cannot run anything any more."""

    fatal = True


class GenerationError(XditFxError):
    """The pipeline raised on some rank while running a batch."""

    def __init__(self, message: str, bad_input: bool) -> None:
        super().__init__(message)
        self.bad_input = bad_input  # a ValueError/TypeError from the pipeline: the request's fault


@dataclass(frozen=True)
class Capabilities:
    """What the served pipeline accepts and returns (read by rank 0 at start-up, for validating requests)."""

    model_id: str
    text_arg: str                       # "prompt", or "class_labels" (prompts mapped by get_label_ids)
    sizes: tuple[int, int] | None       # None: any (width, height) the caps allow; else the only size
    default_size: tuple[int, int]       # (width, height)
    size_multiple: int
    accepts_negative_prompt: bool
    default_steps: int
    default_guidance: float | None      # None: the pipeline takes no guidance_scale
    video: bool                         # returns .frames (text-to-video) rather than .images
    accepts_num_frames: bool = False
    labels: tuple[str, ...] = ()        # for class-label pipelines: the accepted prompts, for messages


def call_parameters(pipe: Any) -> dict[str, inspect.Parameter]:
    """Parameters of the pipeline's ``__call__`` (of the wrapped pipeline for a ParallelPipeline)."""
    inner = getattr(pipe, "pipe", pipe)
    return dict(inspect.signature(type(inner).__call__).parameters)


def text_argument(pipe: Any) -> str:
    """How a text prompt reaches the pipeline: as `prompt`, or as `class_labels` through get_label_ids."""
    params = call_parameters(pipe)
    if "prompt" in params:
        return "prompt"
    if "class_labels" in params and hasattr(pipe, "get_label_ids"):
        return "class_labels"
    raise XditFxError(f"{type(getattr(pipe, 'pipe', pipe)).__name__} takes neither `prompt` nor `class_labels` "
                      "(with get_label_ids): the service cannot turn a text prompt into its input.")


def read_capabilities(pipe: Any, model_id: str, probe_output: Any,
                      default_size: tuple[int, int] | None = None) -> Capabilities:
    params = call_parameters(pipe)
    text_arg = text_argument(pipe)
    video = getattr(probe_output, "frames", None) is not None and getattr(probe_output, "images", None) is None
    first = first_image(probe_output)
    made = (first.width, first.height)
    sizes = None if ("height" in params and "width" in params) else made
    default_size = default_size if default_size is not None and sizes is None else made
    steps = params.get("num_inference_steps")
    guidance = params.get("guidance_scale")
    labels: tuple[str, ...] = ()
    if text_arg == "class_labels":
        labels = tuple(getattr(pipe, "labels", ()) or ())
    scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    return Capabilities(
        model_id=model_id, text_arg=text_arg, sizes=sizes, default_size=default_size,
        size_multiple=max(scale * 2, 16) if sizes is None else 1,
        accepts_negative_prompt="negative_prompt" in params,
        default_steps=int(steps.default) if steps is not None and isinstance(steps.default, int) else 20,
        default_guidance=float(guidance.default) if guidance is not None and guidance.default is not None else None,
        video=video, labels=labels, accepts_num_frames="num_frames" in params)


def output_items(out: Any) -> list[Any]:
    """One entry per requested output: a PIL image, or (video) a list of PIL frames."""
    images = getattr(out, "images", None)
    if images is not None:
        return list(images)
    frames = getattr(out, "frames", None)
    if frames is None:
        raise XditFxError(f"the pipeline returned {type(out).__name__} with neither .images nor .frames")
    return [list(video) for video in frames]


def first_image(out: Any):
    item = output_items(out)[0]
    return item[0] if isinstance(item, list) else item


@dataclass
class BatchSpec:
    """What every rank needs to run one pipeline call: arguments and one seed per output."""

    texts: list[str]                    # one per output (a request's prompt repeated n times)
    seeds: list[int]
    steps: int
    guidance: float | None
    size: tuple[int, int] | None        # (width, height) when the pipeline takes it
    negative_prompt: str | None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Progress:
    """The running batch's denoising progress (rank 0), fed by a hook on ``scheduler.step``."""

    batch_id: int = 0
    step: int = 0
    total: int = 0
    started: float = 0.0
    jobs: tuple = ()


STEP_API = ("start_denoising", "denoise_step", "finish_denoising")


def supports_step_batching(pipe: Any) -> bool:
    """Whether requests can join and leave the running batch at step boundaries: the pipeline exposes its loop
    one step at a time (see STEP_API) and the plan keeps no per-generation state across steps (a cache's
    residuals or PipeFusion's stale activations belong to one fixed batch)."""
    inner = getattr(pipe, "pipe", pipe)
    if not all(callable(getattr(inner, name, None)) for name in STEP_API):
        return False
    if not getattr(inner, "supports_step_batching", False):
        return False
    if "class_labels" not in inspect.signature(inner.start_denoising).parameters:
        return False
    plan = getattr(pipe, "plan", None)
    return plan is None or (plan.cache is None and plan.pipefusion_degree == 1)


@dataclass
class StepOutcome:
    """Rank 0's view of one denoising step of the running set."""

    images: int = 0                                   # images stepped together (the call; under dp, all replicas)
    finished: dict[int, list[Any]] = field(default_factory=dict)   # job id -> its output items
    refused: dict[int, GenerationError] = field(default_factory=dict)  # jobs whose start raised (not admitted)
    failed: list[int] = field(default_factory=list)   # the running set, dropped because the step raised
    error: GenerationError | None = None              # why the step raised


def replica_count(pipe: Any, world_size: int) -> int:
    """How many replicas run different requests under step-level batching: the dp degree of a plan whose only
    parallel axis is dp (without cache or compile), else 1 (every rank shares each call)."""
    plan = getattr(pipe, "plan", None)
    if plan is None or world_size == 1 or plan.dp_degree != world_size or plan.cache is not None or plan.compile:
        return 1
    return plan.dp_degree


def assign_replicas(loads: list[int], sizes: list[int]) -> list[int]:
    """The replica of each joining request (`sizes`: its images, in admission order), given the images each
    replica runs now (`loads`): the least loaded one, the lowest index on a tie; `loads` is updated. The step
    loop admits up to --max-batch images per replica in all, so a request of n images can take a replica at
    most n - 1 past --max-batch, when every replica is that full."""
    owners = []
    for n in sizes:
        owner = min(range(len(loads)), key=lambda r: (loads[r], r))
        loads[owner] += n
        owners.append(owner)
    return owners


class Engine:
    """Runs BatchSpecs on the pipeline, on every rank in lockstep."""

    def __init__(self, pipe: Any, world_size: int, rank: int, step_batching: bool = True) -> None:
        self.pipe, self.world_size, self.rank = pipe, world_size, rank
        self.caps: Capabilities | None = None
        self.text_arg = text_argument(pipe)
        self.stepwise = step_batching and supports_step_batching(pipe)
        self._inner = getattr(pipe, "pipe", pipe)
        self.replicas = replica_count(pipe, world_size) if self.stepwise else 1
        if self.replicas > 1:  # each rank steps its own requests with the whole model: no split of the calls
            self._inner = pipe.unwrap()
            if hasattr(self._inner, "set_progress_bar_config"):
                self._inner.set_progress_bar_config(disable=True)  # rank 0 logs progress instead
        self._active: list[tuple[int, Any]] = []   # (job id, DenoisingState) of the running set, every rank
        self._owner: dict[int, int] = {}           # job id -> the replica (rank) that steps it (replicas > 1)
        self.output_type = "pil"                   # of step-level outputs ("pt" in tests that compare floats)
        self.default_extra: dict[str, Any] = {}   # served defaults for pipeline-specific arguments
        self.progress = Progress()
        self.busy_since: float | None = None    # monotonic start of the running call (rank 0)
        self._batches = 0
        self._hook_progress()

    # ---- arguments ------------------------------------------------------------------------------------
    def call_kwargs(self, spec: BatchSpec) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"num_inference_steps": spec.steps, "output_type": "pil"}
        if self.text_arg == "prompt":
            kwargs["prompt"] = list(spec.texts)
        else:
            kwargs["class_labels"] = self.pipe.get_label_ids(list(spec.texts))
        if spec.guidance is not None:
            kwargs["guidance_scale"] = spec.guidance
        if spec.size is not None:
            kwargs["width"], kwargs["height"] = spec.size
        if spec.negative_prompt is not None:
            kwargs["negative_prompt"] = [spec.negative_prompt] * len(spec.texts)
        kwargs["generator"] = [torch.Generator().manual_seed(s) for s in spec.seeds]
        kwargs.update(self.default_extra)
        kwargs.update(spec.extra)
        return kwargs

    def _hook_progress(self) -> None:
        """Count denoising steps by wrapping the scheduler's step (works for any diffusers loop)."""
        scheduler = getattr(self.pipe, "scheduler", None)
        if scheduler is None or self.rank != 0:
            return
        inner = scheduler.step
        engine = self

        def step(*args, **kwargs):
            out = inner(*args, **kwargs)
            progress = engine.progress
            progress.step += 1
            if not progress.total:
                progress.total = len(getattr(scheduler, "timesteps", ())) or progress.step
            quarter = max(1, progress.total // 4)
            if progress.jobs and (progress.step % quarter == 0 or progress.step == progress.total):
                log.info("batch %d (%d request(s)): step %d/%d", progress.batch_id, len(progress.jobs),
                         progress.step, progress.total)
            return out

        scheduler.step = step

    # ---- one call on this rank ------------------------------------------------------------------------
    def generate(self, spec: BatchSpec) -> Any:
        with torch.no_grad():
            return self.pipe(**self.call_kwargs(spec))

    def warm(self, spec: BatchSpec) -> None:
        """One start-up generation the way requests will run (captures the graphs of its batch size)."""
        if not self.stepwise:
            self.generate(spec)
            return
        state = self._start(spec)
        while not state.done:
            self._denoise([state])

    # ---- step-level batching ---------------------------------------------------------------------------
    def _start(self, spec: BatchSpec) -> Any:
        kwargs: dict[str, Any] = {"class_labels": self.pipe.get_label_ids(list(spec.texts)),
                                  "num_inference_steps": spec.steps,
                                  "generator": [torch.Generator().manual_seed(s) for s in spec.seeds]}
        if spec.guidance is not None:
            kwargs["guidance_scale"] = spec.guidance
        kwargs.update(self.default_extra)
        kwargs.update(spec.extra)
        return self._inner.start_denoising(**kwargs)

    def _denoise(self, states: list[Any]) -> None:
        pair_state = getattr(self.pipe, "pair_state", None)
        if pair_state is not None:  # no scheduler.step hook runs here: every step is a first step
            pair_state.reset()
        with torch.no_grad():
            self._inner.denoise_step(states)

    def step(self, admit: list[tuple[int, BatchSpec]]) -> StepOutcome:
        """Rank 0: admit `admit` (job id, spec) into the running set at this step boundary, send the step to every
        rank, take one denoising step of the whole set; finished requests leave it with their images."""
        owners = None
        if self.replicas > 1 and admit:
            loads = [0] * self.replicas
            for job_id, state in self._active:
                loads[self._owner[job_id]] += len(state.labels)
            owners = assign_replicas(loads, [len(spec.texts) for _, spec in admit])
        self._send("step", {"admit": admit, "owners": owners} if admit else None)
        self.busy_since = time.monotonic()
        try:
            return self._step_local(admit, owners)
        finally:
            self.busy_since = None

    def _step_local(self, admit: list[tuple[int, BatchSpec]], owners: list[int] | None = None) -> StepOutcome:
        refused: dict[int, tuple[str, bool]] = {}
        for i, (job_id, spec) in enumerate(admit):
            try:
                self._active.append((job_id, self._start(spec)))
                self._owner[job_id] = owners[i] if owners else 0
            except Exception as e:  # noqa: BLE001 - this request's own fault (bad label, ...); the set goes on
                refused[job_id] = (f"{type(e).__name__}: {e}", isinstance(e, (ValueError, TypeError)))
        # every rank must step the same set: one flag says whether any rank refused, the refusals only then
        if admit and self.world_size > 1 and self._any_rank(bool(refused)):
            for other in self._gather(refused):
                for job_id, why in other.items():
                    refused.setdefault(job_id, why)
            self._active = [(j, s) for j, s in self._active if j not in refused]
            for job_id in refused:
                self._owner.pop(job_id, None)
        outcome = StepOutcome(refused={j: GenerationError(m, bad_input=b) for j, (m, b) in refused.items()})
        if not self._active:
            return outcome
        outcome.images = sum(len(s.labels) for _, s in self._active)
        err, bad, finished = None, False, {}
        # known alike on every rank before the step, whatever it raises: who ends now (their latents move)
        ending = [(j, s) for j, s in self._active if s.step + 1 >= s.total]
        try:
            if self.replicas > 1:
                mine = [s for j, s in self._active if self._owner[j] == self.rank]
                if mine:
                    self._denoise(mine)
                for j, s in self._active:  # the other replicas' requests: count the step they take there
                    if self._owner[j] != self.rank:
                        s.step += 1
            else:
                self._denoise([s for _, s in self._active])
        except Exception as e:  # noqa: BLE001 - reported to rank 0, which retries each request alone
            err, bad = f"{type(e).__name__}: {e}", isinstance(e, (ValueError, TypeError))
        if self.replicas > 1:
            self._collect_latents(ending)
        try:
            for job_id, state in ending:
                if self.rank == 0 and err is None:
                    finished[job_id] = list(self._inner.finish_denoising(state, self.output_type))
        except Exception as e:  # noqa: BLE001
            err, bad = f"{type(e).__name__}: {e}", isinstance(e, (ValueError, TypeError))
        errors = self._step_status(err, bad)
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            rank, (message, bad) = failed[0]
            where = "" if rank == 0 else f" (on rank {rank})"
            outcome.failed = [j for j, _ in self._active]
            outcome.error = GenerationError(f"{message}{where}", bad_input=bad)
            self._active = []
            self._owner.clear()
            return outcome
        outcome.finished = finished
        for job_id, _ in ending:
            self._owner.pop(job_id, None)
        ended = {j for j, _ in ending}
        self._active = [(j, s) for j, s in self._active if j not in ended]
        return outcome

    def _collect_latents(self, ending: list[tuple[int, Any]]) -> None:
        """Replicas: the latents of each request ending at this step, from its replica to every rank (rank 0
        makes its images). In the running set's order, so every rank makes the same broadcasts."""
        import torch.distributed as dist
        for job_id, state in ending:
            owner = self._owner[job_id]
            if owner == 0:
                continue
            latents = state.latents.contiguous()
            try:
                dist.broadcast(latents, src=owner)
            except Exception as e:  # noqa: BLE001
                raise EngineDead(f"a rank stopped answering ({type(e).__name__}: {e})") from e
            state.latents = latents

    def _step_status(self, err: str | None, bad_input: bool) -> list[tuple[str, bool] | None]:
        """Every rank's error of this step: one small all-reduce, and the messages only when one failed."""
        if self.world_size == 1:
            return [None if err is None else (err, bad_input)]
        if not self._any_rank(err is not None):
            return [None] * self.world_size
        return self._gather_status(err, bad_input)

    def _any_rank(self, flag: bool) -> bool:
        """Whether `flag` is set on any rank (one small all-reduce)."""
        import torch.distributed as dist
        value = torch.tensor([int(flag)], dtype=torch.int32)
        try:
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        except Exception as e:  # noqa: BLE001
            raise EngineDead(f"a rank stopped answering ({type(e).__name__}: {e})") from e
        return bool(value.item())

    def _gather(self, value: Any) -> list[Any]:
        import torch.distributed as dist
        gathered: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(gathered, value)
        except Exception as e:  # noqa: BLE001
            raise EngineDead(f"a rank stopped answering ({type(e).__name__}: {e})") from e
        return gathered

    def _run_local(self, spec: BatchSpec) -> tuple[Any, str | None, bool]:
        try:
            return self.generate(spec), None, False
        except (ValueError, TypeError) as e:
            return None, f"{type(e).__name__}: {e}", True
        except Exception as e:  # noqa: BLE001 - reported to rank 0, which answers the requests
            return None, f"{type(e).__name__}: {e}", False

    # ---- rank 0 ---------------------------------------------------------------------------------------
    def run(self, spec: BatchSpec, jobs: tuple = ()) -> list[Any]:
        """Rank 0: send `spec` to every rank, run it, return one output item per text (raises on failure)."""
        self._batches += 1
        self.progress = Progress(batch_id=self._batches, started=time.monotonic(), jobs=jobs)
        self._send("run", {"spec": spec})
        self.busy_since = time.monotonic()
        try:
            out, err, bad_input = self._run_local(spec)
            errors = self._gather_status(err, bad_input)
        finally:
            self.busy_since = None
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            rank, (message, bad) = failed[0]
            where = "" if rank == 0 else f" (on rank {rank})"
            raise GenerationError(f"{message}{where}", bad_input=bad)
        return output_items(out)

    def heartbeat(self) -> None:
        if self.world_size > 1:
            self._send("ping")

    def stop(self) -> None:
        if self.world_size > 1:
            self._send("stop")

    def _send(self, op: str, args: dict[str, Any] | None = None) -> None:
        """Rank 0: the header (operation, whether `args` follow), then `args` when there are any."""
        if self.world_size == 1:
            return
        import torch.distributed as dist
        try:
            dist.broadcast(torch.tensor([OPS.index(op), args is not None], dtype=torch.int64), src=0)
            if args is not None:
                dist.broadcast_object_list([args], src=0)
        except Exception as e:  # noqa: BLE001 - a peer died or the group timed out
            raise EngineDead(f"a rank stopped answering ({type(e).__name__}: {e})") from e

    @staticmethod
    def _receive() -> tuple[str, dict[str, Any]]:
        """Ranks > 0: the next message from rank 0, as (operation, arguments)."""
        import torch.distributed as dist
        header = torch.zeros(2, dtype=torch.int64)
        dist.broadcast(header, src=0)
        op, has_args = OPS[int(header[0])], bool(header[1])
        if not has_args:
            return op, {}
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        return op, box[0]

    def _gather_status(self, err: str | None, bad_input: bool) -> list[tuple[str, bool] | None]:
        status = None if err is None else (err, bad_input)
        if self.world_size == 1:
            return [status]
        return self._gather(status)

    # ---- ranks > 0 ------------------------------------------------------------------------------------
    def follow(self) -> None:
        """Ranks > 0: run what rank 0 sends until it says stop (returns) or a collective fails (raises)."""
        import torch.distributed as dist
        while True:
            op, args = self._receive()
            if op == "stop":
                return
            if op == "step":
                self._step_local(args.get("admit", []), args.get("owners"))
            elif op == "run":
                _, err, bad = self._run_local(args["spec"])
                gathered: list[Any] = [None] * self.world_size
                dist.all_gather_object(gathered, None if err is None else (err, bad))


def warmup_spec(pipe: Any, size: tuple[int, int] | None = None, num_frames: int | None = None) -> BatchSpec:
    """The start-up generation: one output, few steps, the served defaults (captures graphs, reads the size)."""
    params = call_parameters(pipe)
    text = "0"
    labels = getattr(pipe, "labels", None)
    if "prompt" not in params and labels:
        text = next(iter(labels))
    elif "prompt" in params:
        text = "a photo"
    steps = params.get("num_inference_steps")
    default = steps.default if steps is not None and isinstance(steps.default, int) else 2
    takes_size = "height" in params and "width" in params
    extra = {"num_frames": num_frames} if num_frames is not None and "num_frames" in params else {}
    return BatchSpec(texts=[text], seeds=[0], steps=min(2, default), guidance=None,
                     size=size if takes_size else None, negative_prompt=None, extra=extra)
