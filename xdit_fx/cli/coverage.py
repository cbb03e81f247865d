"""`xdit-fx coverage`: run zoo models under sequence-parallel plans on local gloo processes, compare with
the single-process output, and write the coverage matrix (``COVERAGE.md``).

One spawn per world size runs every selected model (plans of the same world size share it: ``ulysses=2``
and ``ring=2`` run in one 2-process spawn, ``ulysses=2,ring=2`` in one 4-process spawn).  Each rank builds
the model, computes the reference output itself (same seed, same weights), then for each plan captures,
rewrites and runs the model and compares.  Rank 0 appends one JSON line per (model, plan) to a results
file as it goes, so a crash or a hang loses only the model in flight: the orchestrator kills the spawn,
marks that model, and starts a new spawn for the rest.

A user's own model: ``--model-class pkg.module:Class --config cfg.json --inputs pkg.module:make_inputs``
(or ``--model-dir DIR`` holding a diffusers ``config.json``; inputs then come from ``--inputs``).
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

DEFAULT_PLANS = ("ulysses=2", "ring=2", "ulysses=2,ring=2")
# fp32 parity of every (model, plan) pair: the worst passing entry of the matrix is 7.2e-7 max abs (lumina_next,
# cosmos, ltx2_video under ring=2; cache reuse 3.6e-7), so 5e-6 is 7x it (see tests/tolerances.py)
PARITY_ATOL = 5e-6
PARITY_RTOL = 0.0


# ------------------------------------------------------------------------------------------------
# what a user points the tool at
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """How a worker process gets a model and its inputs: a zoo name, or a class + config + inputs factory."""

    name: str
    zoo: str | None = None
    model_class: str | None = None  # "pkg.module:Class" or "diffusers.FluxTransformer2DModel"
    config: dict | None = None
    model_dir: str | None = None  # a directory with config.json (diffusers ``from_config``)
    inputs: str | None = None  # "pkg.module:function" returning the forward kwargs
    heads: int | None = None


def _import(path: str) -> Any:
    """``pkg.module:attr.sub`` or ``pkg.module.attr``."""
    mod, attr = path.split(":", 1) if ":" in path else path.rsplit(".", 1)
    obj = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def build_from_spec(spec: ModelSpec) -> tuple[torch.nn.Module, Callable[[], dict]]:
    if spec.zoo is not None:
        from xdit_fx.zoo import get

        entry = get(spec.zoo)
        return entry.build(), entry.inputs
    if spec.inputs is None:
        raise ValueError(f"{spec.name}: a user model needs --inputs pkg.module:function returning its forward kwargs")
    make_inputs = _import(spec.inputs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if spec.model_dir is not None:
            with open(os.path.join(spec.model_dir, "config.json")) as f:
                config = json.load(f)
            cls = _import(spec.model_class) if spec.model_class else _import(f"diffusers:{config['_class_name']}")
            model = cls.from_config(config) if hasattr(cls, "from_config") else cls(**config)
        else:
            model = _import(spec.model_class)(**(spec.config or {}))
    return model.float().eval(), make_inputs


# ------------------------------------------------------------------------------------------------
# one (model, plan) on one rank
# ------------------------------------------------------------------------------------------------


def _flat(o: Any) -> list[torch.Tensor]:
    if isinstance(o, torch.Tensor):
        return [o]
    if isinstance(o, (tuple, list)):
        return [t for x in o for t in _flat(x)]
    if isinstance(o, dict):
        return [t for x in o.values() for t in _flat(x)]
    if hasattr(o, "to_tuple"):
        return _flat(o.to_tuple())
    return []


def _compare(got: list[torch.Tensor], ref: list[torch.Tensor]) -> tuple[float, float, float, str]:
    """Max abs error, the reference's max magnitude, max abs error relative to it, and a mismatch message."""
    inf = float("inf")
    if len(got) != len(ref):
        return inf, 0.0, inf, f"{len(got)} outputs, expected {len(ref)}"
    worst, scale = 0.0, 0.0
    for a, b in zip(got, ref):
        if a.shape != b.shape:
            return inf, 0.0, inf, f"output shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        if b.is_floating_point():
            if b.numel():
                worst = max(worst, (a.float() - b.float()).abs().max().item())
                scale = max(scale, b.float().abs().max().item())
        elif not torch.equal(a, b):
            return inf, 0.0, inf, "integer output differs"
    return worst, scale, worst / max(scale, 1e-12), ""


def _graph_facts(pm) -> dict:
    facts = {"graphs": len(pm.histories), "self": 0, "cross": 0, "joint": 0, "attention": 0, "sp_attention": 0,
             "fallback_gathers": 0, "exit_gathers": 0, "unparallelized_graphs": 0, "token_spaces": 0,
             "normalized_attention": 0, "linear_attention": 0, "mask_gathers": 0, "kv_buffers": 0,
             "pipefusion_stages": 0}
    keys = {"self_sites": "self", "cross_sites": "cross", "joint_sites": "joint", "attention_sites": "attention",
            "sp_attention_sites": "sp_attention", "fallback_gathers": "fallback_gathers",
            "exit_gathers": "exit_gathers", "unparallelized_graphs": "unparallelized_graphs",
            "token_spaces": "token_spaces", "normalized_attention": "normalized_attention",
            "linear_attention_sites": "linear_attention", "mask_gathers": "mask_gathers",
            "kv_buffers": "kv_buffers", "pipefusion_stages": "pipefusion_stages"}
    notes = []
    for h in pm.histories:
        c = h.counts()
        for k, v in keys.items():
            facts[v] += int(c.get(k, 0))
        for s in h.snapshots:
            if s.name in ("shard_sequence",) and c.get("fallback_gathers", 0):
                notes.append(s.summary)
    facts["fallback_notes"] = notes[:3]
    return facts


class _Float32Attention:
    """Context: SDPA on bf16/fp16 inputs computes in float32 and casts back (the second reference for models
    that run their own attention in low precision: ring attention's fp32 chunks are compared with it)."""

    used = False

    def __enter__(self):
        import torch.nn.functional as F

        self._orig = orig = F.scaled_dot_product_attention

        def sdpa32(*args, **kw):
            kw.update(zip(("query", "key", "value", "attn_mask"), args))
            q, m = kw["query"], kw.get("attn_mask")
            if q.dtype not in (torch.bfloat16, torch.float16):
                return orig(**kw)
            self.used = True
            kw.update(query=q.float(), key=kw["key"].float(), value=kw["value"].float(),
                      attn_mask=m.float() if m is not None and m.is_floating_point() else m)
            return orig(**kw).to(q.dtype)

        F.scaled_dot_product_attention = sdpa32
        return self

    def __exit__(self, *exc):
        import torch.nn.functional as F

        F.scaled_dot_product_attention = self._orig


def _run_plan(model, make_inputs, ref, plan_text: str, ref32=None) -> dict:
    import xdit_fx

    rec: dict[str, Any] = {"plan": plan_text}
    torch._dynamo.reset()
    plan = xdit_fx.Plan.from_string(plan_text)
    if plan.pipefusion_degree > 1:  # PipeFusion frees other stages' parameters: keep the model for later plans
        import copy
        model = copy.deepcopy(model)
    with torch.no_grad():
        # the first call of a generation is a PipeFusion warm-up call: whole sequence, exact
        pm = xdit_fx.parallelize(model, plan)
        got = _flat(pm(**make_inputs()))
        # cache plans: the same inputs again must skip the cached blocks and return the same output
        again = _flat(pm(**make_inputs())) if plan.cache is not None else None
    rec["max_abs"], scale, rec["rel"], mismatch = _compare(got, ref)
    rec.update(_graph_facts(pm))
    if getattr(pm, "census", None) is not None:  # the first call's attention calls (eager) vs runs sharded
        rec["eager_attention_calls"] = pm.census.eager_calls
        rec["sharded_attention_runs"] = pm.census.sharded_runs
    rec["ok"] = not mismatch and rec["max_abs"] <= PARITY_ATOL + PARITY_RTOL * scale
    if not mismatch and not rec["ok"] and ref32 is not None:  # the model's attention ran in bf16/fp16
        max32, scale32, rel32, mismatch32 = _compare(got, ref32)
        if not mismatch32 and max32 <= PARITY_ATOL + PARITY_RTOL * scale32:
            rec.update(ok=True, max_abs=max32, rel=rel32, ref="fp32-attention", max_abs_vs_lowp=rec["max_abs"])
    if mismatch:
        rec["error"] = mismatch
    elif not rec["ok"]:
        rec["error"] = f"output differs from the single process: max abs {rec['max_abs']:.2e}"
    if again is not None and rec["ok"]:
        stats = pm.cache_stats
        rec["cache_skipped_calls"] = len(stats.skipped_steps())
        rec["cache_blocks"] = f"{stats.records[-1].blocks_total - stats.records[-1].blocks_run}/{stats.records[-1].blocks_total}"
        rec["cache_reuse_err"], _, _, reuse_mismatch = _compare(again, got)
        regions = [h.snapshots[-1].summary for h in pm.histories if h.snapshots and "skips" in h.snapshots[-1].summary]
        rec["cache_region"] = regions[0] if regions else ""
        if reuse_mismatch or stats.skipped_steps() != [1]:
            rec["ok"] = False
            rec["error"] = f"cache: the repeated call {'was not skipped' if stats.skipped_steps() != [1] else reuse_mismatch}"
        elif rec["cache_reuse_err"] > PARITY_ATOL + PARITY_RTOL * scale:
            rec["ok"] = False
            rec["error"] = f"cache: the skipped call differs from the full one by {rec['cache_reuse_err']:.2e}"
    return rec


def _error_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) < 1500 else text[:1500] + " ..."


def _worker(rank: int, world: int, init_file: str, specs: list[ModelSpec], plans: list[str], out_path: str) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import logging

    logging.getLogger("xdit_fx").setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")
    # a FileStore (no TCP port to pick beforehand and lose to another process); the collective timeout grows
    # with the processes per core (a rank waits for peers still capturing their graph on a shared CPU)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120 * max(1.0, world / 2)))
    try:
        for spec in specs:
            if rank == 0:
                _append(out_path, {"event": "start", "model": spec.name, "world": world})
            t0 = time.time()
            try:
                model, make_inputs = build_from_spec(spec)
                with torch.no_grad():
                    ref = _flat(model(**make_inputs()))
                    with _Float32Attention() as f32:
                        ref32 = _flat(model(**make_inputs()))
                    ref32 = ref32 if f32.used else None
                base_error = None
            except Exception as e:  # the model itself does not run: no plan can
                base_error = f"model does not run eagerly: {_error_text(e)}"
            for plan_text in plans:
                t1 = time.time()
                if base_error:
                    rec = {"plan": plan_text, "ok": False, "error": base_error}
                else:
                    try:
                        rec = _run_plan(model, make_inputs, ref, plan_text, ref32)
                    except Exception as e:
                        rec = {"plan": plan_text, "ok": False, "error": _error_text(e),
                               "error_type": type(e).__name__}
                rec["secs"] = round(time.time() - t1, 2)
                # every rank reports; rank 0 keeps the worst (a rank-dependent failure shows up here)
                recs = [None] * world
                dist.all_gather_object(recs, rec)
                if rank == 0:
                    merged = dict(recs[0])
                    for r in recs[1:]:
                        if not r.get("ok", False) and merged.get("ok", False):
                            merged = dict(r)
                        for k in ("max_abs", "rel"):
                            if k in r and k in merged:
                                merged[k] = max(merged[k], r[k])
                    merged.update(event="result", model=spec.name, world=world)
                    _append(out_path, merged)
            if rank == 0:
                _append(out_path, {"event": "done", "model": spec.name, "world": world, "secs": round(time.time() - t0, 2)})
    finally:
        dist.destroy_process_group()


def _append(path: str, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec, default=str) + "\n")


# ------------------------------------------------------------------------------------------------
# orchestration: spawns per world size, restart after a crash or a hang
# ------------------------------------------------------------------------------------------------


def _read(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def _spawn_until_done(world: int, specs: list[ModelSpec], plans: list[str], out_path: str,
                      model_timeout: float, log: Callable[[str], None]) -> None:
    import torch.multiprocessing as mp

    remaining = list(specs)
    while remaining:
        store_dir = tempfile.mkdtemp(prefix="xdit-fx-coverage-")  # a fresh FileStore per spawn
        ctx = mp.start_processes(_worker, args=(world, os.path.join(store_dir, "store"), remaining, plans, out_path),
                                 nprocs=world, join=False, start_method="spawn")
        last_progress, n_lines = time.time(), len(_read(out_path))
        failure = None
        while True:
            try:
                finished = ctx.join(timeout=2)
            except Exception as e:  # a rank died
                failure = f"worker crashed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
                break
            lines = _read(out_path)
            if len(lines) != n_lines:
                n_lines, last_progress = len(lines), time.time()
            if finished:
                break
            if time.time() - last_progress > model_timeout:
                failure = f"timed out after {model_timeout:.0f}s without progress (hang or too slow)"
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                break
        shutil.rmtree(store_dir, ignore_errors=True)
        done = {r["model"] for r in _read(out_path) if r.get("event") == "done" and r.get("world") == world}
        started = [r["model"] for r in _read(out_path) if r.get("event") == "start" and r.get("world") == world]
        if failure is None:
            remaining = [s for s in remaining if s.name not in done]
            if remaining:  # finished without error but some models missing: should not happen
                failure = "worker exited early"
            else:
                break
        in_flight = next((s for s in remaining if s.name not in done and s.name in started[-1:]), None)
        if in_flight is None:
            in_flight = next((s for s in remaining if s.name not in done), None)
        if in_flight is None:
            break
        have = {(r["model"], r["plan"]) for r in _read(out_path) if r.get("event") == "result" and r.get("world") == world}
        for plan_text in plans:
            if (in_flight.name, plan_text) not in have:
                _append(out_path, {"event": "result", "model": in_flight.name, "plan": plan_text, "world": world,
                                   "ok": False, "error": failure})
        _append(out_path, {"event": "done", "model": in_flight.name, "world": world})
        log(f"  {in_flight.name}: {failure}")
        remaining = [s for s in remaining if s.name not in done and s.name != in_flight.name]


def _world_of(plan_text: str) -> int:
    from xdit_fx.plan import Plan

    return Plan.from_string(plan_text).world_size


def _ulysses_of(plan_text: str) -> int:
    from xdit_fx.plan import Plan

    return Plan.from_string(plan_text).ulysses_degree


def run_coverage(specs: Sequence[ModelSpec], plans: Sequence[str] = DEFAULT_PLANS, out_jsonl: str | None = None,
                 model_timeout: float = 300.0, log: Callable[[str], None] = print) -> list[dict]:
    """Run every spec under every plan; return one record per (model, plan)."""
    out_jsonl = out_jsonl or tempfile.mktemp(suffix=".jsonl", prefix="xdit_fx_coverage_")
    by_world: dict[int, list[str]] = {}
    for p in plans:
        by_world.setdefault(_world_of(p), []).append(p)
    skipped: list[dict] = []
    for world, world_plans in sorted(by_world.items()):
        for plan_text in world_plans:
            u = _ulysses_of(plan_text)
            for s in specs:
                if s.heads and s.heads % u:
                    skipped.append({"event": "result", "model": s.name, "plan": plan_text, "world": world,
                                    "ok": None, "skipped": f"{s.heads} heads not divisible by ulysses={u}"})
        runnable = [s for s in specs if all(not s.heads or s.heads % _ulysses_of(p) == 0 for p in world_plans)]
        t0 = time.time()
        log(f"world size {world}: {len(runnable)} models x {world_plans}")
        _spawn_until_done(world, runnable, world_plans, out_jsonl, model_timeout, log)
        log(f"world size {world}: {time.time() - t0:.0f}s")
    records = [r for r in _read(out_jsonl) if r.get("event") == "result"] + skipped
    secs = {(r["model"], r.get("world")): r.get("secs") for r in _read(out_jsonl) if r.get("event") == "done"}
    for r in records:
        r.setdefault("model_secs", secs.get((r["model"], r.get("world"))))
    return records


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------


def classify(recs: dict[str, dict], required: Sequence[str]) -> str:
    """'parity' (every required plan exact, no fallback gathers in blocks), 'fallback', or 'fail'."""
    got = [recs.get(p) for p in required]
    if any(r is None or not r.get("ok") for r in got):
        return "fail"
    if any(r.get("fallback_gathers", 0) for r in got):
        return "fallback"
    if any(r.get("sp_attention", 0) == 0 and r.get("kv_buffers", 0) == 0 for r in got):
        return "unparallelized"
    return "parity"


def _census_cell(recs: list[dict | None]) -> str:
    """'eager/sharded' attention calls of the required plans' first calls ('-' when none was recorded)."""
    cells = list(dict.fromkeys(f"{r['eager_attention_calls']}/{r['sharded_attention_runs']}" for r in recs
                               if r is not None and r.get("eager_attention_calls") is not None))
    return ", ".join(cells) or "-"


def _fmt_err(r: dict | None) -> str:
    if r is None:
        return "-"
    if r.get("skipped"):
        return "skip"
    if not r.get("ok"):
        return "FAIL"
    if "cache_skipped_calls" in r:  # a cache plan: blocks skipped on the repeated call, and its error
        return f"skips {r['cache_blocks']} blocks, {r['cache_reuse_err']:.1e}"
    dagger = " †" if r.get("ref") == "fp32-attention" else ""
    return f"{r.get('max_abs', 0):.1e} / {r.get('rel', 0):.1e}{dagger}"


def write_report(records: list[dict], entries: dict, excluded: dict[str, str], path: str,
                 required: Sequence[str] = ("ulysses=2", "ring=2"), header: str = "",
                 not_configured: dict[str, str] | None = None) -> dict:
    by_model: dict[str, dict[str, dict]] = {}
    for r in records:
        by_model.setdefault(r["model"], {})[r["plan"]] = r
    plans = list(dict.fromkeys(r["plan"] for r in records))
    rows, verdicts = [], {}
    for name in sorted(by_model, key=lambda n: (not entries.get(n, {}).get("diffusers", True), n)):
        recs = by_model[name]
        info = entries.get(name, {})
        verdict = classify(recs, required)
        verdicts[name] = verdict
        first = next((recs[p] for p in plans if p in recs and recs[p].get("ok") is not None), {})
        best = next((recs[p] for p in plans if recs.get(p, {}).get("ok")), first)
        captured = "yes" if best.get("graphs") == 1 else (f"{best['graphs']} graphs" if best.get("graphs") else "no")
        sites = f"{best.get('self', 0)}/{best.get('cross', 0)}/{best.get('joint', 0)}" if best.get("graphs") else "-"
        fb = max((recs[p].get("fallback_gathers", 0) for p in recs if recs[p].get("ok")), default=0)
        census = _census_cell([recs.get(p) for p in required])
        errs = [recs[p].get("error", "") for p in plans if p in recs and recs[p].get("error")]
        note = info.get("note", "")
        if verdict == "unparallelized":
            note = (note + "; " if note else "") + "runs correct but unparallelized (no attention site sharded)"
        if errs:
            first_line = errs[0].strip().splitlines()[0][:220]
            note = (note + "; " if note else "") + first_line
        rows.append(f"| {name} | {info.get('source', '')} | {captured} | {sites} | {census} | {fb} | "
                    + " | ".join(_fmt_err(recs.get(p)) for p in plans) + f" | {verdict} | {note.replace('|', '/')} |")

    diff_names = [n for n in verdicts if entries.get(n, {}).get("diffusers", True)]
    scratch_names = [n for n in verdicts if not entries.get(n, {}).get("diffusers", True)]
    count = {k: sum(1 for n in diff_names if verdicts[n] == k) for k in ("parity", "fallback", "unparallelized", "fail")}
    # a class counts once: its best entry (several entries may exercise one class in different configs)
    per_class: dict[str, str] = {}
    rank = {"parity": 0, "fallback": 1, "unparallelized": 2, "fail": 3}
    for n in diff_names:
        c = entries.get(n, {}).get("source", n)
        per_class[c] = min(per_class.get(c, "fail"), verdicts[n], key=rank.get)
    for c, why in (not_configured or {}).items():
        per_class.setdefault(c, "fail")
        rows.append(f"| - | {c} | - | - | - | " + " | ".join("-" for _ in plans) + f" | fail | no tiny config: {why} |")
    cls_count = {k: sum(1 for v in per_class.values() if v == k) for k in rank}
    n_cls = len(per_class)
    summary = {"classes": n_cls, **{f"classes_{k}": v for k, v in cls_count.items()}, "entries": len(diff_names),
               **{f"entries_{k}": v for k, v in count.items()},
               "scratch": {n: verdicts[n] for n in scratch_names}, "excluded": len(excluded)}
    pct = 100.0 * cls_count["parity"] / max(n_cls, 1)
    # every other plan (the 4-process one, cache, pipefusion): how many classes it passes, over those it ran on
    other_lines = []
    for p in plans:
        if p in required:
            continue
        ran = {entries.get(n, {}).get("source", n): False for n in diff_names
               if p in by_model[n] and not by_model[n][p].get("skipped")}
        for n in diff_names:
            if by_model[n].get(p, {}).get("ok"):
                ran[entries.get(n, {}).get("source", n)] = True
        failed = sorted(n for n in diff_names if p in by_model[n] and not by_model[n][p].get("skipped")
                        and not by_model[n][p].get("ok"))
        other_lines.append(f"- `{p}`: {sum(ran.values())} / {len(ran)} classes it ran on pass"
                           + (f" (fail: {', '.join(failed)})" if failed else "") + ".")
    lines = [
        "# Coverage: xdit_fx on the transformer classes of diffusers",
        "",
        header,
        "",
        "## Headline",
        "",
        f"- **{n_cls} in-scope diffusers classes** ({len(diff_names)} zoo entries), {len(excluded)} excluded (below).",
        f"- **{cls_count['parity']} / {n_cls} ({pct:.0f}%) reach parity under both {' and '.join(required)} with zero "
        f"fallback gathers inside the block stack.**",
        f"- {cls_count['fallback']} work with fallback gathers; {cls_count['unparallelized']} run correct but "
        f"unparallelized; {cls_count['fail']} fail (error in the table).",
        "- From-scratch DiTs: " + ", ".join(f"{n}: {verdicts[n]}" for n in scratch_names) + ".",
        *(["", "Other plans (reported, not part of the verdict):", ""] + other_lines if other_lines else []),
        "",
        "Verdicts: *parity* = every required plan matches the single-process output (max abs error <= "
        f"{PARITY_ATOL:g} + {PARITY_RTOL:g} x max|ref|) with at least one attention site sharded and no fallback gather "
        "inside a transformer block; *fallback* = matches but gathers inside blocks; *unparallelized* = matches "
        "but nothing was sharded; *fail* = an error or a mismatch. The 4-process plan is reported but not required."
        + (" † = compared with the model run with its bf16/fp16 attention computed in float32: the model casts its "
           "own q, k, v to bf16 before SDPA, and ring attention computes each key chunk and the log-sum-exp merge in "
           "float32, so it matches that reference, not the bf16 kernel's rounding (the error against the bf16 "
           "reference is in the raw results as max_abs_vs_lowp)." if any(r.get("ref") == "fp32-attention"
                                                                         for r in records) else ""),
        "",
        "## Matrix",
        "",
        "Columns: captured = one dynamo graph (or how many); sites = attention sites rewritten, self/cross/joint; "
        "attention eager/sharded = the attention calls one eager forward makes vs the attention runs that were "
        "sequence parallel in the first parallel call (the census of graph breaks; one number when the required "
        "plans agree, '-' when not recorded; the eager count sees attention kernels (SDPA, flash-attn, xformers, "
        "flex_attention), not attention written as matmul + softmax or run by nn.MultiheadAttention's fused "
        "kernel, which the passes do shard: then sharded can exceed eager); "
        "fallbacks = fallback gathers inside the block stack; per plan: max abs / relative error. "
        "A cache plan (`cache=fbc:1e9`, `cache=teacache:1e9`: a threshold no change reaches) runs the model "
        "twice on the same inputs in one process: the first call must match the uncached output, the second "
        "must skip the cached region; shown as blocks skipped / blocks in the stack, and the second call's max abs "
        "difference from the first.",
        "",
        "| model | class | captured | sites s/c/j | attention eager/sharded | fallbacks | " + " | ".join(plans)
        + " | verdict | note |",
        "|" + "---|" * (7 + len(plans) + 1),
        *rows,
        "",
        "## Excluded classes",
        "",
        "| class | reason |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in sorted(excluded.items())],
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return summary


# ------------------------------------------------------------------------------------------------
# CLI entry (registered in cli.py)
# ------------------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument("--models", help="comma-separated zoo names (default: every coverage entry); see --list")
    p.add_argument("--exclude", help="comma-separated zoo names to skip")
    p.add_argument("--plan", action="append", help=f"plan string, repeatable (default: {', '.join(DEFAULT_PLANS)})")
    p.add_argument("--out", default="COVERAGE.md", help="report path (default COVERAGE.md)")
    p.add_argument("--jsonl", help="raw per-(model, plan) results (default: next to --out)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds without progress before a model is killed")
    p.add_argument("--list", action="store_true", help="list the zoo entries and excluded classes, then exit")
    p.add_argument("--note", help="a sentence added to the report header (how and where it was run)")
    p.add_argument("--report-only", nargs="+", metavar="JSONL",
                   help="write the report from earlier raw results (later files override a (model, plan))")
    p.add_argument("--model-class", help="your own model: pkg.module:Class (or diffusers.ClassName)")
    p.add_argument("--config", help="JSON file or inline JSON of constructor kwargs for --model-class")
    p.add_argument("--model-dir", help="a directory with a diffusers config.json")
    p.add_argument("--inputs", help="pkg.module:function returning the forward kwargs of your model")
    p.add_argument("--heads", type=int, help="attention heads of your model (plans whose ulysses degree does not divide are skipped)")


def main(args) -> int:
    from xdit_fx.zoo import coverage_zoo, excluded, not_configured

    zoo = coverage_zoo()
    if args.list:
        for name, m in zoo.items():
            print(f"{name:28s} {m.source:55s} {m.note}")
        print("\nexcluded:")
        for k, v in excluded().items():
            print(f"  {k}: {v}")
        return 0
    plans = args.plan or list(DEFAULT_PLANS)
    if args.report_only:
        merged: dict[tuple, dict] = {}
        for path in args.report_only:
            for r in _read(path):
                if r.get("event") == "result":
                    merged[(r["model"], r["plan"])] = r
        records = list(merged.values())
        names = list(dict.fromkeys(r["model"] for r in records))
        entries = {n: {"source": zoo[n].source.removeprefix("diffusers."), "note": zoo[n].note,
                       "diffusers": zoo[n].source.startswith("diffusers")} for n in names if n in zoo}
        header = (f"Generated by `xdit-fx coverage --report-only` ({len(names)} models, plans "
                  f"{', '.join(dict.fromkeys(r['plan'] for r in records))}; gloo on CPU, torch {torch.__version__}). "
                  f"Raw results: {', '.join('`' + os.path.basename(p) + '`' for p in args.report_only)}."
                  + (f" {args.note}" if args.note else ""))
        summary = write_report(records, entries, excluded(), args.out, required=["ulysses=2", "ring=2"],
                               header=header, not_configured=not_configured())
        print(json.dumps(summary, indent=1))
        return 0
    if args.model_class or args.model_dir:
        config = None
        if args.config:
            config = json.loads(open(args.config).read() if os.path.exists(args.config) else args.config)
        name = (args.model_class or os.path.basename(os.path.normpath(args.model_dir))).split(":")[-1].split(".")[-1]
        specs = [ModelSpec(name, model_class=args.model_class, config=config, model_dir=args.model_dir,
                           inputs=args.inputs, heads=args.heads)]
        entries = {name: {"source": args.model_class or args.model_dir, "diffusers": False}}
    else:
        names = args.models.split(",") if args.models else list(zoo)
        if args.exclude:
            names = [n for n in names if n not in set(args.exclude.split(","))]
        unknown = [n for n in names if n not in zoo]
        if unknown:
            raise SystemExit(f"unknown zoo models {unknown}; see `xdit-fx coverage --list`")
        specs = [ModelSpec(n, zoo=n, heads=zoo[n].heads) for n in names]
        entries = {n: {"source": zoo[n].source.removeprefix("diffusers."), "note": zoo[n].note,
                       "diffusers": zoo[n].source.startswith("diffusers")} for n in names}
    jsonl = args.jsonl or os.path.splitext(args.out)[0] + ".jsonl"
    if os.path.exists(jsonl):
        os.remove(jsonl)
    t0 = time.time()
    records = run_coverage(specs, plans, jsonl, args.timeout, log=lambda s: print(s, flush=True))
    elapsed = time.time() - t0
    import diffusers

    header = (f"Generated by `xdit-fx coverage` ({len(specs)} models, plans {', '.join(plans)}; gloo on CPU, "
              f"torch {torch.__version__}, diffusers {diffusers.__version__}; {elapsed / 60:.1f} min on this machine). "
              f"Raw results: `{os.path.basename(jsonl)}`.")
    required = [p for p in ("ulysses=2", "ring=2") if p in plans] or plans[:1]
    summary = write_report(records, entries, excluded() if not (args.model_class or args.model_dir) else {},
                           args.out, required=required, header=header,
                           not_configured=not_configured() if not (args.model_class or args.model_dir) else None)
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out} ({elapsed:.0f}s)")
    return 0
