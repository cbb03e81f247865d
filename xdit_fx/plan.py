"""`Plan`: how to spread one DiT over ranks. Frozen, validated, serialisable; no torch.distributed here.

Mesh axes, outer to inner: ``dp, cfg, pipefusion, ring, ulysses``. Ulysses is innermost because it is the
most communication-hungry axis (four all-to-alls per attention); keep it inside a node.

Choosing between the two sequence-parallel axes:

* **Ulysses** (``ulysses=N``) swaps the sequence split for a head split around each attention with
  all-to-alls. Cheap in bytes ((N-1)/N of q, k, v and the output per site) and exact, but the number of
  attention heads must be divisible by N.
* **Ring** (``ring=N``) keeps queries local and passes key/value chunks around a ring, merging partial
  softmaxes with their log-sum-exp. No head constraint; moves (N-1) local K/V chunks per site, and the
  merge changes the summation order (close, not bit-exact).
* **USP** (both) uses Ulysses inside groups of ``ulysses`` ranks and ring across them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from xdit_fx.cache_config import CacheConfig, FirstBlockCache, TeaCache, cache_from_dict, cache_from_string
from xdit_fx.errors import PlanError

#: Mesh axes from outermost to innermost.
AXES = ("dp", "cfg", "pipefusion", "ring", "ulysses")
#: Axes whose passes exist; the others are accepted and validated, then refused until implemented.

_SHORT_NAMES = {
    "dp": "dp_degree",
    "cfg": "cfg_degree",
    "pipefusion": "pipefusion_degree",
    "ring": "ring_degree",
    "ulysses": "ulysses_degree",
}
#: other integer keys of the plan string
_INT_KEYS = {"patches": "pipefusion_patches", "warmup": "pipefusion_warmup_steps"}


@dataclass(frozen=True)
class Plan:
    """How to parallelize one diffusion transformer.

    The product ``dp * cfg * pipefusion * ring * ulysses`` must equal the number of ranks the module runs
    on. Validation that needs no model happens here; validation that needs the graph (heads divisible by
    ``ulysses_degree``) happens in the pass that needs it, naming the attention node.

    Args:
        ulysses_degree: ranks that split attention heads with all-to-alls (needs heads % degree == 0).
        ring_degree: ranks that pass key/value chunks around a ring (no head constraint).
        cfg_degree: 1 or 2: ranks that share the two classifier-free-guidance branches (the conditional
            and unconditional halves of a batched call, or the two calls of a two-call pipeline).
        pipefusion_degree: pipeline stages over the block stack (PipeFusion): each rank holds a cost-balanced
            share of the blocks and the token sequence flows through them in patches (see
            xdit_fx/compiler/passes/pipefusion.py).
        pipefusion_patches: M, the number of patches the token sequence is split into under PipeFusion
            (0: one per stage). Every token segment must be divisible by M (by M * ulysses with ulysses).
        pipefusion_warmup_steps: calls per generation (and per CFG branch) that run the whole sequence
            synchronously (exact) and fill the stale-K/V buffers before patches use them.
        dp_degree: data-parallel replicas; each takes a share of the images of every batched call.
        compile: run the rewritten graph through ``torch.compile`` (Inductor).
        parallel_vae: on a pipeline, decode the latent split by rows over all ranks (halo exchange).
        cache: skip the block stack on steps where it would change little: ``FirstBlockCache(threshold)`` or
            ``TeaCache(threshold, coefficients)`` (see xdit_fx/cache_config.py); None: run every block every step.
        debug_dump_dir: if set, every pass writes a snapshot of the graph there.
    """

    ulysses_degree: int = 1
    ring_degree: int = 1
    cfg_degree: int = 1
    pipefusion_degree: int = 1
    dp_degree: int = 1
    pipefusion_patches: int = 0
    pipefusion_warmup_steps: int = 1
    compile: bool = False
    parallel_vae: bool = True
    cache: CacheConfig | None = None
    debug_dump_dir: str | None = None

    def __post_init__(self) -> None:
        for axis, field in _SHORT_NAMES.items():
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PlanError(f"Plan.{field} must be an integer >= 1, got {value!r}.")
        for flag in ("compile", "parallel_vae"):
            if not isinstance(getattr(self, flag), bool):
                raise PlanError(f"Plan.{flag} must be a bool, got {getattr(self, flag)!r}.")
        for name, low in (("pipefusion_patches", 0), ("pipefusion_warmup_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise PlanError(f"Plan.{name} must be an integer >= {low}, got {value!r}"
                                + (" (0 means one patch per pipeline stage)." if name == "pipefusion_patches" else "."))
        if self.cfg_degree > 2:
            raise PlanError(
                f"Plan.cfg_degree={self.cfg_degree}: classifier-free guidance has two branches, so cfg_degree "
                "is 1 or 2. Put the other ranks on dp, ulysses or ring.")
        if self.cache is not None and not isinstance(self.cache, (FirstBlockCache, TeaCache)):
            object.__setattr__(self, "cache", cache_from_dict(self.cache))
        if self.cache is not None and self.pipefusion_degree > 1:
            raise PlanError(
                f"Plan.cache={self.cache.to_string()} with pipefusion_degree={self.pipefusion_degree}: refused. "
                "PipeFusion keeps per-patch K/V from the previous step, and each stage would have to agree on "
                "which steps skip its blocks; a skipped step would leave every stage's K/V buffers two steps "
                "stale. Use cache with ulysses/ring/cfg/dp, or PipeFusion without cache.")
        if self.debug_dump_dir is not None and not isinstance(self.debug_dump_dir, str):
            raise PlanError(f"Plan.debug_dump_dir must be a path string or None, got {self.debug_dump_dir!r}.")

    @property
    def patches(self) -> int:
        """M: how many patches the token sequence is split into under PipeFusion."""
        return self.pipefusion_patches or self.pipefusion_degree

    # ---- sizes --------------------------------------------------------------------------------------
    def degree(self, axis: str) -> int:
        return getattr(self, _SHORT_NAMES[axis])

    @property
    def world_size(self) -> int:
        size = 1
        for axis in AXES:
            size *= self.degree(axis)
        return size

    @property
    def batch_degree(self) -> int:
        """Ranks that split the batch of each transformer call: dp * cfg."""
        return self.dp_degree * self.cfg_degree

    @property
    def sequence_parallel_degree(self) -> int:
        """Ranks that share one token sequence: ring * ulysses."""
        return self.ring_degree * self.ulysses_degree

    def check_world_size(self, world_size: int) -> None:
        """Raise PlanError, showing the arithmetic, if the plan does not fill exactly `world_size` ranks."""
        if self.world_size != world_size:
            product = " * ".join(f"{axis}({self.degree(axis)})" for axis in AXES)
            if self.world_size == 1:
                raise PlanError(
                    f"{product} = 1 != world_size({world_size}): every degree is 1, so the plan fills one "
                    f"process. Set degrees whose product is {world_size} (e.g. 'ulysses={world_size}'), or run "
                    f"one process.")
            raise PlanError(
                f"{product} = {self.world_size} != world_size({world_size}). The plan needs "
                f"{self.world_size} processes: launch with `xdit-fx run --nproc {self.world_size} SCRIPT` or "
                f"`torchrun --nproc_per_node {self.world_size} SCRIPT`, or change the degrees."
            )

    # ---- serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["cache"] = self.cache.to_dict() if self.cache is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(f"Unknown Plan field(s) {unknown}; known fields: {sorted(known)}.")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_string(cls, text: str) -> "Plan":
        """Parse ``"ulysses=2,ring=2"``. Keys are axis names (or full field names), ``compile``, ``parallel_vae``,
        ``cache`` (``cache=fbc:0.08`` or ``cache=teacache:0.2``)."""
        if text.strip().lower() == "serial":
            return cls()
        fields: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not value:
                raise PlanError(f"Plan string item {item!r} is not of the form key=value (e.g. 'ulysses=2').")
            name = _SHORT_NAMES.get(key, _INT_KEYS.get(key, key))
            if name in fields:
                raise PlanError(f"Plan string {text!r} sets {key!r} twice.")
            if name in ("compile", "parallel_vae"):
                if value.lower() not in ("0", "1", "true", "false"):
                    raise PlanError(f"{name}={value!r}: use {name}=1 or {name}=0.")
                fields[name] = value.lower() in ("1", "true")
            elif name == "cache":
                fields[name] = cache_from_string(value)
            elif name in _SHORT_NAMES.values() or name in _INT_KEYS.values():
                try:
                    fields[name] = int(value)
                except ValueError:
                    raise PlanError(f"{key}={value!r}: a degree must be an integer.") from None
            else:
                raise PlanError(
                    f"Unknown plan key {key!r}; use one of {', '.join(AXES)}, patches, warmup, compile, parallel_vae, cache "
                    "(e.g. 'ulysses=2,ring=2' or 'cfg=2,cache=fbc:0.1')."
                )
        return cls(**fields)

    def to_string(self) -> str:
        parts = [f"{axis}={self.degree(axis)}" for axis in AXES if self.degree(axis) > 1]
        if self.pipefusion_patches:
            parts.append(f"patches={self.pipefusion_patches}")
        if self.pipefusion_warmup_steps != 1:
            parts.append(f"warmup={self.pipefusion_warmup_steps}")
        if self.compile:
            parts.append("compile=1")
        if not self.parallel_vae:
            parts.append("parallel_vae=0")
        if self.cache is not None:
            parts.append(f"cache={self.cache.to_string()}")
        return ",".join(parts) or "serial"
