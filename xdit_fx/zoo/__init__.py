"""A registry of tiny, randomly initialised diffusion transformers with dummy inputs.

* ``ZOO`` (``core.py``, ``scratch.py``): the models the fast tests run under every plan — a few
  diffusers classes and DiTs written from scratch in different styles;
* ``COVERAGE_ZOO`` (``diffusers_zoo.py``): one entry per in-scope transformer class of diffusers 0.42.x
  plus the from-scratch DiTs, run by ``xdit-fx coverage``; ``EXCLUDED`` lists the classes left out, with why.

``get(name)`` looks a name up in both.
"""

from __future__ import annotations

from xdit_fx.zoo.core import ZOO, ScratchDiT, ZooModel, build_flux, flux_inputs
from xdit_fx.zoo.scratch import SCRATCH_ENTRIES, ManualVideoDiT, MHAUViT

ZOO.update({m.name: m for m in SCRATCH_ENTRIES})

__all__ = ["ZooModel", "ZOO", "get", "ScratchDiT", "MHAUViT", "ManualVideoDiT", "build_flux", "flux_inputs", "coverage_zoo", "excluded"]


def coverage_zoo() -> dict[str, ZooModel]:
    """Every entry of the coverage matrix: the in-scope diffusers classes, then the from-scratch DiTs."""
    from xdit_fx.zoo.diffusers_zoo import COVERAGE_ZOO

    scratch = {name: m for name, m in ZOO.items() if m.source.startswith("xdit_fx")}
    return {**COVERAGE_ZOO, **scratch}


def excluded() -> dict[str, str]:
    from xdit_fx.zoo.diffusers_zoo import EXCLUDED

    return dict(EXCLUDED)


def not_configured() -> dict[str, str]:
    """In-scope diffusers classes without a tiny config yet (reported as failing), with why."""
    from xdit_fx.zoo.diffusers_zoo import NOT_CONFIGURED

    return dict(NOT_CONFIGURED)


def get(name: str) -> ZooModel:
    if name in ZOO:
        return ZOO[name]
    table = coverage_zoo()
    try:
        return table[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; available: {sorted(table)}") from None
