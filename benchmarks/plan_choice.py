"""The plan cost model against measurement: every candidate plan of 2 ranks, predicted and timed, per model.

Run by hand (about 10-20 minutes on 2 CPU cores; an idle machine gives steadier numbers):

    .venv/bin/python benchmarks/plan_choice.py                         # all models
    .venv/bin/python benchmarks/plan_choice.py --models flux1k,digits --repeats 3
    .venv/bin/python benchmarks/plan_choice.py --render benchmarks/results/plan_choice.json

For each model the candidates are what `xdit_fx.compiler.plan_search.candidate_plans` returns for 2 ranks
(the search itself, not a hand-picked list). Each plan runs in 2 fresh gloo processes (one torch thread each,
as `xdit-fx run` starts them): a first call (capture, rewrite; under PipeFusion the warm-up call), one more
call, then `--repeats` timed calls, each between barriers; a call's time is the slowest rank's, the plan's
time the fastest call (the median is reported too). The prediction is `plan_cost.predict(...).step_s` (a steady-state step: PipeFusion's
patched call, not its warm-up) with the hardware profile given by `--hardware` (default: the calibrated
cpu-gloo profile shipped in xdit_fx/compiler/profiles/). Per model: Spearman's rank correlation between
predicted and measured times and each plan's error (predicted / measured - 1). The machine's load average
(`os.getloadavg`) is recorded before and after each model: the cores are shared with other jobs.

Models (random weights, fp32):
  flux1k   Flux architecture, 2 double + 6 single blocks, hidden 512 (8 x 64), 1024 image + 64 text tokens
  flux4k   the same at 4096 image tokens
  digits   the embedded digits DiT (4 blocks, 4 heads, 64 tokens), 10 images with batched CFG (batch 20)
  wan      a Wan 2.1-architecture video DiT: 4 blocks, hidden 512 (8 x 64), 4 x 32 x 32 latent (1024 tokens),
           64 text tokens of cross-attention
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


# ---- models --------------------------------------------------------------------------------------------------

def build(name: str, device: str = "cpu"):
    """(model, inputs, guidance) of a benchmark model."""
    torch.manual_seed(0)
    with torch.device(device):
        if name in ("flux1k", "flux4k"):
            from xdit_fx.zoo import build_flux, flux_inputs

            model = build_flux(num_layers=2, num_single_layers=6, heads=8, head_dim=64, text_dim=64,
                               axes_dims_rope=(16, 24, 24))
            side = 32 if name == "flux1k" else 64
            inputs = flux_inputs(side, side, 64, text_dim=64)
            guidance = "none"
        elif name == "digits":
            from diffusers import DiTTransformer2DModel

            from xdit_fx.digits.pipeline import load_pipeline

            cfg = load_pipeline().transformer.config
            model = DiTTransformer2DModel.from_config(dict(cfg))
            g = torch.Generator().manual_seed(0)
            inputs = {"hidden_states": torch.randn(20, 1, 16, 16, generator=g),
                      "timestep": torch.full((20,), 500.0), "class_labels": torch.arange(20) % 11,
                      "return_dict": False}
            guidance = "batched"
        elif name == "wan":
            from diffusers import WanTransformer3DModel

            model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=8, attention_head_dim=64,
                                          in_channels=16, out_channels=16, text_dim=64, freq_dim=64, ffn_dim=1536,
                                          num_layers=4, rope_max_seq_len=64)
            g = torch.Generator().manual_seed(0)
            inputs = {"hidden_states": torch.randn(1, 16, 4, 32, 32, generator=g),
                      "timestep": torch.full((1,), 500.0), "encoder_hidden_states": torch.randn(1, 64, 64, generator=g),
                      "return_dict": False}
            guidance = "none"
        else:
            raise SystemExit(f"unknown model {name!r}")
    if device == "meta":
        inputs = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return model.eval(), inputs, guidance


# ---- measurement ----------------------------------------------------------------------------------------------

def time_worker(name: str, plans: list[str], repeats: int) -> dict:
    """On each of 2 ranks: every plan, timed; returns {plan: [seconds per call (slowest rank)]}."""
    import torch.distributed as dist

    import xdit_fx

    torch.set_num_threads(1)
    xdit_fx.init_distributed()
    out: dict[str, list[float]] = {}
    for text in plans:
        model, inputs, _ = build(name)
        torch._dynamo.reset()
        pm = xdit_fx.parallelize(model, text)
        times = []
        with torch.no_grad():
            for i in range(2 + repeats):
                dist.barrier()
                t0 = time.perf_counter()
                pm(**inputs)
                t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                if i >= 2:
                    times.append(float(t))
        out[text] = times
        del pm, model
    return out


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return num / den if den else float("nan")


def predictions(name: str, hardware: str):
    from xdit_fx.compiler.hardware import load_profile
    from xdit_fx.compiler.plan_cost import Workload, predict
    from xdit_fx.compiler.plan_facts import model_facts
    from xdit_fx.compiler.plan_search import candidate_plans

    model, inputs, guidance = build(name, "meta")
    facts = model_facts(model, inputs, name)
    work = Workload(guidance=guidance)
    hw = load_profile(hardware).with_nodes(1, 2)
    plans, rejected = candidate_plans(facts, 2, work)
    return facts, plans, rejected, {p.to_string(): predict(facts, p, hw, work) for p in plans}, guidance


def tabulate(name: str, hardware: str, measured: dict[str, list[float]]) -> dict:
    """Rows (predicted vs measured) of one model from its measured times per plan."""
    facts, plans, rejected, preds, guidance = predictions(name, hardware)
    rows = []
    for p in plans:
        pred = preds[p.to_string()]
        m = min(measured[p.to_string()])
        rows.append({"plan": p.to_string(), "predicted_s": pred.step_s, "measured_s": m,
                     "measured_median_s": statistics.median(measured[p.to_string()]),
                     "measured_all_s": measured[p.to_string()], "error": pred.step_s / m - 1,
                     "parts": pred.parts, "bottleneck": pred.bottleneck})
    rho = spearman([r["predicted_s"] for r in rows], [r["measured_s"] for r in rows])
    rho_median = spearman([r["predicted_s"] for r in rows], [r["measured_median_s"] for r in rows])
    best_pred = min(rows, key=lambda r: r["predicted_s"])["plan"]
    best_meas = min(rows, key=lambda r: r["measured_s"])["plan"]
    return {"model": name, "tokens": facts.tokens, "batch": facts.batch, "guidance": guidance, "rows": rows,
            "spearman": rho, "spearman_median": rho_median, "predicted_best": best_pred, "measured_best": best_meas,
            "rejected": [r.__dict__ for r in rejected]}


def run_model(name: str, hardware: str, repeats: int) -> dict:
    from xdit_fx.runtime.launch import launch

    _, plans, _, _, _ = predictions(name, hardware)
    load_before = os.getloadavg()
    measured = launch(time_worker, 2, (name, [p.to_string() for p in plans], repeats))[0]
    load_after = os.getloadavg()
    return {**tabulate(name, hardware, measured), "loadavg_before": load_before, "loadavg_after": load_after}


def render(results: dict) -> str:
    lines = ["# Plan choice: predicted vs measured, 2 ranks (gloo, 1 thread each)", "",
             f"Hardware profile: `{results['hardware']}`; {results['repeats']} timed calls per plan; "
             f"started {results['started']}. Written by `benchmarks/plan_choice.py`.", "",
             "Prediction: `plan_cost.predict(...).step_s` (steady-state call; PipeFusion's patched call). Error = "
             "predicted / measured - 1, where measured is the fastest of the timed calls: the 2 cores are shared "
             "with other jobs, whose load only ever adds time (the calibration takes the fastest call too); the "
             "median and Spearman against it are given as well. The load average (1/5/15 min) before and after "
             "each model is given.", ""]
    for m in results["models"]:
        within = sum(abs(r["error"]) <= 0.25 for r in m["rows"])
        lines += [f"## {m['model']} ({m['tokens']} tokens, batch {m['batch']}, guidance {m['guidance']})", "",
                  f"Spearman {m['spearman']:.2f} (against the medians {m.get('spearman_median', float('nan')):.2f}); {within} of {len(m['rows'])} plans within +-25%; predicted best "
                  f"`{m['predicted_best']}`, measured best `{m['measured_best']}`; load "
                  f"{'/'.join(f'{x:.1f}' for x in m['loadavg_before'])} -> "
                  f"{'/'.join(f'{x:.1f}' for x in m['loadavg_after'])}", "",
                  "| plan | predicted ms | measured ms (fastest) | error | measured ms (median) | predicted bottleneck |",
                  "|---|---|---|---|---|---|"]
        for r in m["rows"]:
            lines.append(f"| `{r['plan']}` | {r['predicted_s'] * 1e3:.1f} | {r['measured_s'] * 1e3:.1f} | "
                         f"{r['error']:+.0%} | {r.get('measured_median_s', float('nan')) * 1e3:.1f} | "
                         f"{r['bottleneck']} |")
        if m["rejected"]:
            lines += ["", "Refused by the search: " + "; ".join(f"`{r['plan']}` ({r['reason']})" for r in m["rejected"])]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="flux1k,digits,wan,flux4k")
    ap.add_argument("--hardware", default="cpu-gloo")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--render", help="re-render the markdown of a JSON results file")
    ap.add_argument("--repredict", help="a JSON results file: keep its measurements, predict again with --hardware")
    args = ap.parse_args(argv)
    if args.render:
        results = json.load(open(args.render))
    elif args.repredict:
        results = json.load(open(args.repredict))
        results["hardware"] = args.hardware
        for i, m in enumerate(results["models"]):
            new = tabulate(m["model"], args.hardware, {r["plan"]: r["measured_all_s"] for r in m["rows"]})
            results["models"][i] = {**m, **new}
    else:
        results = {"hardware": args.hardware, "repeats": args.repeats,
                   "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "models": []}
        for name in args.models.split(","):
            print(f"{name} ...", flush=True)
            results["models"].append(run_model(name, args.hardware, args.repeats))
            m = results["models"][-1]
            print(f"  spearman {m['spearman']:.2f}: " + ", ".join(
                f"{r['plan']} {r['predicted_s'] * 1e3:.0f}/{r['measured_s'] * 1e3:.0f}" for r in m["rows"]), flush=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan_choice.json").write_text(json.dumps(results, indent=1))
    (out / "plan_choice.md").write_text(render(results))
    print(f"wrote {out / 'plan_choice.md'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
