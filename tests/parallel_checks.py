"""Evidence that a plan really ran in parallel, for tests whose main check is parity with the single process.

A plan that silently ran the whole model on every rank would match the serial images too; these records say
what each rank computed. `instrument(pm)` hooks a ParallelModule (per rank, before its first call):

* rows_called / rows_run: the batch rows of every call made to the module, and the rows this rank's graph
  actually ran (the batch after the cfg/dp split; 0 for a paired call computed by the other cfg rank);
* comm: bytes received per mesh axis, summed over every call (`last_comm` after each one);
* sp_sites: attention sites the passes made sequence parallel, over every captured graph.

`check(record, plan)` asserts what the plan implies.
"""

from __future__ import annotations

from typing import Any

from xdit_fx.plan import Plan


def instrument(pm) -> dict[str, Any]:
    from xdit_fx.runtime.batch import batch_size

    rec: dict[str, Any] = {"rows_called": 0, "rows_run": 0, "calls": 0, "runs": [], "comm": {}}
    run = pm._run

    def counting_run(*args, **kwargs):
        b = batch_size(args, kwargs)
        rec["runs"].append(b)
        rec["rows_run"] += b
        return run(*args, **kwargs)

    def pre(module, args, kwargs):
        rec["calls"] += 1
        rec["rows_called"] += batch_size(args, kwargs)

    def post(module, args, kwargs, out):
        for axis, ops in module.last_comm.items():
            rec["comm"][axis] = rec["comm"].get(axis, 0) + sum(ops.values())

    pm._run = counting_run  # forward calls self._run: the instance attribute wins
    pm.register_forward_pre_hook(pre, with_kwargs=True)
    pm.register_forward_hook(post, with_kwargs=True)
    rec["_pm"] = pm
    return rec


def finish(rec: dict[str, Any]) -> dict[str, Any]:
    """A picklable snapshot of the record so far, with the sequence-parallel site count."""
    out = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
           for k, v in rec.items() if k != "_pm"}
    out["sp_sites"] = sum(h.counts().get("sp_attention_sites", 0) for h in rec["_pm"].histories)
    return out


def check(rec: dict[str, Any], plan: str | Plan) -> None:
    plan = Plan.from_string(plan) if isinstance(plan, str) else plan
    assert rec["calls"] > 0, rec
    if plan.sequence_parallel_degree > 1:
        assert rec["sp_sites"] > 0, f"{plan.to_string()}: no attention site was made sequence parallel: {rec}"
        for axis in ("ulysses", "ring"):
            if plan.degree(axis) > 1:
                assert rec["comm"].get(axis, 0) > 0, f"{plan.to_string()}: nothing received on {axis}: {rec}"
    else:
        assert rec["sp_sites"] == 0, rec
    if plan.batch_degree > 1:
        # this rank computed a share of the rows, not all of them (split calls run a chunk; paired calls
        # alternate between the cfg ranks after the first step) and the rest came over the batch axes
        assert rec["rows_run"] < rec["rows_called"], f"{plan.to_string()}: every rank ran every row: {rec}"
        assert sum(rec["comm"].get(a, 0) for a in ("batch", "cfg", "dp")) > 0, rec
    else:
        assert rec["rows_run"] == rec["rows_called"], rec
