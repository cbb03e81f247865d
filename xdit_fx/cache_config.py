"""Cache acceleration settings: `Plan(cache=FirstBlockCache(...))` or `Plan(cache=TeaCache(...))`.

Both skip the transformer block stack on denoising steps where its input barely changed since the step
that last ran it, and reuse that step's residual (stack output minus stack input) instead:

* **First-Block-Cache** runs the first block every step and compares its residual with the one of the last
  step that ran the full stack: if the relative L1 change is below ``threshold``, the other blocks are
  skipped.
* **TeaCache** runs only the start of the first block, up to its first linear layer: the normalised and
  timestep-modulated input. It adds up a rescaled relative L1 change of that tensor from step to step
  (``coefficients``: a polynomial fitted per model by ``xdit-fx calibrate-cache``); while the sum stays below
  ``threshold`` the whole stack is skipped, and when the stack runs the sum restarts from zero.

Where the stack is, what its first block is and which tensor is the modulated input are found in the
captured graph (passes/cache.py), never from the model's name. The decision is taken on every rank from
sums reduced over the ranks that share the call, so all ranks skip the same steps.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

from xdit_fx.errors import PlanError


def _check_common(name: str, threshold: Any, warmup_steps: Any) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
            or threshold < 0:
        raise PlanError(f"{name}.threshold must be a finite number >= 0 (0 disables skipping), got {threshold!r}.")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
        raise PlanError(f"{name}.warmup_steps must be an integer >= 1 (the first step always runs the whole "
                        f"stack: there is nothing to compare it with), got {warmup_steps!r}.")


@dataclass(frozen=True)
class FirstBlockCache:
    """Skip blocks 2..L when the first block's residual changed by less than `threshold` (relative L1)
    since the last step that ran them. The first `warmup_steps` calls always run the whole stack."""

    threshold: float = 0.08
    warmup_steps: int = 1

    kind = "fbc"

    def __post_init__(self) -> None:
        _check_common("FirstBlockCache", self.threshold, self.warmup_steps)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "threshold": self.threshold, "warmup_steps": self.warmup_steps}

    def to_string(self) -> str:
        return f"fbc:{self.threshold:g}"


@dataclass(frozen=True)
class TeaCache:
    """Skip the whole block stack while the accumulated, rescaled change of the first block's modulated
    input stays below `threshold`.

    `coefficients` are a polynomial, highest power first (numpy.polyval order), that maps the relative L1
    change of the modulated input to an estimate of the relative change of the stack's output. None means
    uncalibrated: the raw relative change is used (``[1, 0]``); fit them with ``xdit-fx calibrate-cache``.
    Negative estimates count as 0."""

    threshold: float = 0.2
    coefficients: tuple[float, ...] | None = None
    warmup_steps: int = 1

    kind = "teacache"

    def __post_init__(self) -> None:
        _check_common("TeaCache", self.threshold, self.warmup_steps)
        if self.coefficients is not None:
            coeffs = tuple(self.coefficients)
            if not coeffs or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c)
                                     for c in coeffs):
                raise PlanError(f"TeaCache.coefficients must be a non-empty sequence of finite numbers "
                                f"(highest power first), got {self.coefficients!r}.")
            object.__setattr__(self, "coefficients", tuple(float(c) for c in coeffs))

    @property
    def polynomial(self) -> tuple[float, ...]:
        return self.coefficients if self.coefficients is not None else (1.0, 0.0)

    def rescale(self, x: float) -> float:
        y = 0.0
        for c in self.polynomial:
            y = y * x + c
        return max(y, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "threshold": self.threshold, "warmup_steps": self.warmup_steps,
                "coefficients": list(self.coefficients) if self.coefficients is not None else None}

    def to_string(self) -> str:
        return f"teacache:{self.threshold:g}"


CacheConfig = FirstBlockCache | TeaCache
_KINDS = {"fbc": FirstBlockCache, "first_block_cache": FirstBlockCache, "teacache": TeaCache}


def cache_from_dict(data: Any) -> CacheConfig | None:
    """The inverse of ``to_dict`` (what Plan.to_dict / plan.json hold)."""
    if data is None or isinstance(data, (FirstBlockCache, TeaCache)):
        return data
    if not isinstance(data, dict) or data.get("kind") not in _KINDS:
        raise PlanError(f"Plan.cache: expected a dict with 'kind' in {sorted(set(_KINDS))}, got {data!r}.")
    fields = {k: v for k, v in data.items() if k != "kind"}
    if "coefficients" in fields and fields["coefficients"] is not None:
        fields["coefficients"] = tuple(fields["coefficients"])
    try:
        return _KINDS[data["kind"]](**fields)
    except TypeError as e:
        raise PlanError(f"Plan.cache {data!r}: {e}") from None


def cache_from_string(text: str) -> CacheConfig:
    """'fbc:0.08', 'teacache:0.3', 'fbc' (default threshold). Coefficients come from a file (see
    `load_coefficients`) or Plan(cache=TeaCache(coefficients=...))."""
    kind, _, value = text.partition(":")
    cls = _KINDS.get(kind.strip().lower())
    if cls is None:
        raise PlanError(f"cache={text!r}: use cache=fbc:THRESHOLD (First-Block-Cache) or cache=teacache:THRESHOLD.")
    if not value.strip():
        return cls()
    try:
        return cls(threshold=float(value))
    except ValueError:
        raise PlanError(f"cache={text!r}: the threshold must be a number, e.g. cache={kind}:0.1") from None


def load_coefficients(path: str) -> tuple[float, ...]:
    """Coefficients from a file written by `xdit-fx calibrate-cache` (or a JSON list)."""
    with open(path) as f:
        data = json.load(f)
    coeffs: Sequence[Any] = data["coefficients"] if isinstance(data, dict) else data
    return tuple(float(c) for c in coeffs)
