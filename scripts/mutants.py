#!/usr/bin/env python3
"""Plant one small semantic bug at a time in a copy of the repository and run the tests that must catch it.

    .venv/bin/python scripts/mutants.py                 # every mutant; a table on stdout
    .venv/bin/python scripts/mutants.py --only ring_chunk_owner --out mutants.md
    .venv/bin/python scripts/mutants.py --list

Each mutant is a text substitution (or a few) in one file of `xdit_fx/`, with the default-run tests that
must fail on it. The copy holds the working tree's tracked and untracked files (not .venv, not .git); its
tests run with `PYTHONPATH` pointing at the copy and without `XDIT_FX_SLOW_TESTS`, so a mutant is killed
only by what `make test` runs. A mutant whose text no longer occurs exactly once is reported as `stale`
(update the list with the code). Exit status: 0 when every mutant was killed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    edits: tuple[tuple[str, str], ...]   # (text that occurs exactly once, its replacement)
    tests: tuple[str, ...]               # pytest arguments: the tests that must catch it
    why: str


MUTANTS = [
    Mutant("ring_chunk_owner", "xdit_fx/ops/collectives.py",
           (("        src = (rank - step) % n\n", "        src = (rank + step) % n\n"),),
           ("tests/test_four_ranks.py",),
           "ring attention slices the mask for the wrong chunk owner (invisible with 2 ranks)"),
    Mutant("ring_lse_merge", "xdit_fx/ops/collectives.py",
           (("    w_new = torch.exp(o_lse - new)", "    w_new = torch.exp(o_lse - lse)"),),
           ("tests/test_equivalence.py", "-k", "ring"),
           "the log-sum-exp merge weights a new chunk against the old total"),
    Mutant("uneven_padding_off_by_one", "xdit_fx/ops/attention.py",
           (("offset + r * c + i if r * c + i < length else -1", "offset + r * c + i if r * c + i <= length else -1"),),
           ("tests/test_equivalence.py", "-k", "uneven"),
           "the first padded key of an uneven split counts as a real token"),
    Mutant("dropped_mask_reindex", "xdit_fx/ops/attention.py",
           (("        m = _index_rows(m, -1, k_runs)",
             "        m = m[..., :sum(run[2] for run in k_runs)]"),),
           ("tests/test_equivalence.py", "-k", "scratch_mmdit"),
           "the key mask is applied in global order to keys that arrive in rank order"),
    Mutant("swapped_ulysses_dims", "xdit_fx/ops/attention.py",
           (("    return all_to_all(out.contiguous(), 2, 1, group)",
             "    return all_to_all(out.contiguous(), 1, 2, group)"),),
           ("tests/test_equivalence.py", "-k", "ulysses"),
           "Ulysses' last all-to-all scatters heads and gathers tokens instead of the reverse"),
    Mutant("a2a_bytes_misreported", "xdit_fx/ops/collectives.py",
           (('comm.record(group, "all_to_all", _nbytes(send) * (n - 1) // n)',
             'comm.record(group, "all_to_all", _nbytes(send) // n)'),),
           ("tests/test_four_ranks.py",),
           "the all-to-all reports 1/N of the tensor instead of (N-1)/N (equal at N=2)"),
    Mutant("hidden_collective", "xdit_fx/ops/collectives.py",
           (("    n, r = dist.get_world_size(pg), dist.get_rank(pg)\n    chunk = padded_len // n\n",
             "    n, r = dist.get_world_size(pg), dist.get_rank(pg)\n"
             "    dist.broadcast(x.contiguous(), src=dist.get_global_rank(pg, 0), group=pg)\n"
             "    chunk = padded_len // n\n"),),
           ("tests/test_comm.py",),
           "a collective that moves bytes without counting them (outputs unchanged)"),
    Mutant("vae_skipped_halo_row", "xdit_fx/runtime/vae.py",
           (("x.narrow(-2, h - top, top).contiguous(), shard.global_rank(r + 1)",
             "x.narrow(-2, h - top - 1, top).contiguous(), shard.global_rank(r + 1)"),),
           ("tests/test_parallel_vae.py",),
           "the halo sent down skips the last row"),
    Mutant("cache_output_not_residual", "xdit_fx/runtime/cache.py",
           (("outs = tuple(c if j is None else live_ins[j] + c for j, c in zip(st.partners, st.cached))",
             "outs = tuple(c for j, c in zip(st.partners, st.cached))"),
            ("st.cached.append(o - live_ins[j] if residual else", "st.cached.append(o if residual else")),
           ("tests/test_cache.py", "-k", "reference"),
           "a skipped call reuses the stack's output instead of adding its residual to the new input"),
    Mutant("cache_decision_one_rank", "xdit_fx/runtime/cache.py",
           (("        for name in self._groups:\n", "        for name in self._groups[:0]:\n"),),
           ("tests/test_cache.py", "-k", "ulysses_and_ring"),
           "each rank decides on the metric of its own shard"),
    Mutant("inductor_off", "xdit_fx/runtime/module.py",
           (("            return compile_fx(gm, example_inputs)", "            return gm"),),
           ("tests/test_compile.py",),
           "compile=True runs the rewritten graph eagerly"),
    Mutant("kv_never_refreshed", "xdit_fx/ops/pipefusion.py",
           (("    kbuf.index_copy_(2, kidx, k)\n    vbuf.index_copy_(2, kidx, v)\n    bias = None\n",
             "    if st.patches == 1:\n        kbuf.index_copy_(2, kidx, k)\n        vbuf.index_copy_(2, kidx, v)\n"
             "    kbuf, vbuf = kbuf.index_copy(2, kidx, k), vbuf.index_copy(2, kidx, v)\n    bias = None\n"),),
           ("tests/test_pipefusion.py", "-k", "stale"),
           "PipeFusion's K/V buffers keep the warm-up's keys: later calls never write theirs"),
    Mutant("cfg_branches_not_swapped", "xdit_fx/runtime/batch.py",
           (("        b.copy_(parts[1 - cfg_rank])", "        b.copy_(parts[cfg_rank])"),),
           ("tests/test_digits_parallel.py",),
           "two-call CFG: each rank keeps its own branch instead of the peer's"),
    Mutant("pipeline_denoiser_whole", "xdit_fx/pipeline.py",
           (("            setattr(pipe, name, pm)\n", "            setattr(pipe, name, original)\n"),),
           ("tests/test_pipelines.py", "tests/test_digits_parallel.py"),
           "a parallelized pipeline silently runs its denoiser whole on every rank"),
]


def _files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


def _copy(dest: Path) -> None:
    for f in _files():
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, target)


def _apply(copy: Path, mutant: Mutant) -> str | None:
    """Apply the mutant's edits in the copy; the reason it cannot, or None."""
    path = copy / mutant.file
    text = path.read_text()
    for old, new in mutant.edits:
        if text.count(old) != 1:
            return f"{old.strip()!r} occurs {text.count(old)} times in {mutant.file}"
        text = text.replace(old, new)
    path.write_text(text)
    return None


def run_one(mutant: Mutant, python: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        copy = Path(tmp)
        _copy(copy)
        reason = _apply(copy, mutant)
        if reason is not None:
            return {"name": mutant.name, "verdict": "stale", "detail": reason, "seconds": 0.0}
        env = {k: v for k, v in os.environ.items() if k != "XDIT_FX_SLOW_TESTS"}
        env["PYTHONPATH"] = str(copy)
        t0 = time.monotonic()
        try:
            proc = subprocess.run([python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
                                  cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"name": mutant.name, "verdict": "killed", "detail": f"timeout after {timeout:.0f} s",
                    "seconds": time.monotonic() - t0}
        seconds = time.monotonic() - t0
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
        if proc.returncode == 1 and failed:
            return {"name": mutant.name, "verdict": "killed", "detail": failed[0], "seconds": seconds}
        if proc.returncode == 0:
            return {"name": mutant.name, "verdict": "survived", "detail": proc.stdout.strip().splitlines()[-1],
                    "seconds": seconds}
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        return {"name": mutant.name, "verdict": "error", "detail": f"pytest exit {proc.returncode}: {' | '.join(tail)}",
                "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", help="run only this mutant (repeatable)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--out", help="also write the table to this file")
    p.add_argument("--python", default=sys.executable, help="the interpreter that runs pytest (default: this one)")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per mutant")
    args = p.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(set(args.only)):
        p.error(f"unknown mutant in {args.only}; known: {[m.name for m in MUTANTS]}")
    if args.list:
        for m in chosen:
            print(f"{m.name:28} {m.file:34} {' '.join(m.tests)}\n{'':28} {m.why}")
        return 0
    rows = ["| mutant | what it breaks | verdict | caught by | s |", "|---|---|---|---|---|"]
    results = []
    for m in chosen:
        r = run_one(m, args.python, args.timeout)
        results.append(r)
        rows.append(f"| {m.name} | {m.why} | {r['verdict']} | {r['detail']} | {r['seconds']:.0f} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0 if all(r["verdict"] == "killed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
