"""Compare two coverage runs (`xdit-fx coverage --jsonl`) row by row: the verdict-bearing fields of every
(model, plan) result must be equal; errors may move within the tolerance given.

    python scripts/compare_coverage.py coverage/COVERAGE.jsonl .scratch/new.jsonl [--atol 5e-7]

Exit 1 when a row differs (printed), 0 when every row of the older run is matched.
"""

from __future__ import annotations

import argparse
import json
import sys

#: fields that decide a verdict or count what the passes did
FIELDS = ("ok", "graphs", "attention", "sp_attention", "fallback_gathers", "exit_gathers", "mask_gathers",
          "unparallelized_graphs", "token_spaces", "kv_buffers", "pipefusion_stages", "cache_skipped_calls",
          "cache_blocks")


def rows(path: str) -> dict[tuple[str, str], dict]:
    out = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("event") == "result":
                out[(r["model"], r["plan"])] = r
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--atol", type=float, default=5e-7, help="allowed change of max_abs between runs")
    a = ap.parse_args()
    old, new = rows(a.old), rows(a.new)
    bad = 0
    for key, r in sorted(old.items()):
        if key not in new:
            print(f"missing  {key}")
            bad += 1
            continue
        n = new[key]
        diffs = [f"{f}: {r.get(f)} -> {n.get(f)}" for f in FIELDS if r.get(f) != n.get(f)]
        if r.get("ok") and n.get("ok") and abs((r.get("max_abs") or 0) - (n.get("max_abs") or 0)) > a.atol:
            diffs.append(f"max_abs: {r.get('max_abs'):.2e} -> {n.get('max_abs'):.2e}")
        if diffs:
            print(f"differs  {key}: " + "; ".join(diffs))
            bad += 1
    extra = sorted(set(new) - set(old))
    for key in extra:
        print(f"new      {key}")
    print(f"{len(old)} rows compared, {bad} differ, {len(extra)} new")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
