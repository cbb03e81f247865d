"""The one table of numeric tolerances, with the reason for each row (fp32 unless stated).

Measured on this machine's CPU (torch 2.13, 2 cores), tiny zoo models, outputs of magnitude ~1:
ulysses max abs error <= 3e-7, ring <= 5e-7, ulysses+ring <= 5e-7 (see the closing note of the change
that set them). The bounds leave ~4x headroom over the measured worst case, no more.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float
    why: str


TOLERANCES = {
    # GEMMs see fewer rows per rank, so their blocking (and float summation order) changes; the SDPA
    # kernel runs on H/N heads over the same keys. Data movement itself is exact.
    "ulysses": Tol(2e-6, 0.0, "GEMM row blocking differs on the shorter local sequence; a2a is exact"),
    # Partial softmaxes over key chunks are merged through their log-sum-exp: a different summation order.
    "ring": Tol(2e-6, 0.0, "log-sum-exp merge of per-chunk softmaxes reorders the sums"),
    "ulysses+ring": Tol(2e-6, 0.0, "both of the above"),
}


def tolerance(plan) -> Tol:
    key = "+".join(a for a, d in (("ulysses", plan.ulysses_degree), ("ring", plan.ring_degree)) if d > 1)
    return TOLERANCES[key]
