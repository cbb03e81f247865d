"""The one table of numeric tolerances, with the reason for each row (fp32 unless stated).

Measured on this machine's CPU (torch 2.13, 2 cores), the 7 zoo models, even and odd token counts,
outputs of magnitude ~1-3: worst max abs error ulysses=2 3.6e-7, ring=2 4.8e-7, ulysses=2,ring=2 4.8e-7;
the 8-block hidden-512 benchmark model: 7.2e-7; ring=4 and ulysses=4 (tests/test_four_ranks.py) 4.8e-7.
The bound 2e-6 is ~3-4x the worst measured case.
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
