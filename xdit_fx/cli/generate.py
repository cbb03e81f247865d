"""`xdit-fx generate`: run a diffusers pipeline folder (or the embedded digits model) over N ranks.

The flags are xDiT's, flag for flag (``--ulysses_degree``, ``--use_cfg_parallel``, ``--download-dir``, ...),
so commands carry over; a flag whose feature is not built yet is accepted and refused with the reason
(`NOT_BUILT`), never ignored. With ``--nproc N`` the command launches N local processes itself (torchrun's
launcher, one thread per rank unless OMP_NUM_THREADS is set); under ``torchrun`` it joins the running job.

What can be checked without a process is checked first (`preflight`): the plan against the process count,
the flags against the pipeline class's call signature, and against the folder's config.json files the head
count under Ulysses, the image size against the VAE factor and patch size, and PipeFusion's token split.
Anything a worker raises later reaches the user as one line and exit code 2, once (`run`).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from xdit_fx.errors import DUMP_HINT_MARK, PlanError, XditFxError
from xdit_fx.loading import DIGITS, first_line, pipeline_index, resolve_model
from xdit_fx.plan import AXES, Plan

#: xDiT flags whose feature is not built: dest -> (is it set?, the one-line reason)
NOT_BUILT: dict[str, tuple[Any, str]] = {
    "tensor_parallel_degree": (lambda v: v > 1, "--tensor_parallel_degree: tensor parallel is not built yet; "
                               "use --ulysses_degree/--ring_degree/--pipefusion_parallel_degree"),
    "split_scheme": (lambda v: v is not None, "--split_scheme: it chooses tensor parallel's split, and tensor "
                     "parallel is not built yet; drop the flag"),
    "attn_layer_num_for_pp": (lambda v: v is not None, "--attn_layer_num_for_pp: layers per PipeFusion stage "
                              "cannot be set yet; the stages are cut by cost (see `xdit-fx dump MODEL --plan "
                              "pipefusion=N`); drop the flag"),
    "use_onediff": (bool, "--use_onediff: OneDiff compilation is not built yet; use --use_torch_compile "
                    "(Inductor)"),
    "enable_sequential_cpu_offload": (bool, "--enable_sequential_cpu_offload: CPU offload is not built yet; "
                                      "every rank keeps its pipeline on its device (PipeFusion frees the "
                                      "blocks of other stages)"),
    "enable_model_cpu_offload": (bool, "--enable_model_cpu_offload: CPU offload is not built yet; every rank "
                                 "keeps its pipeline on its device"),
    "enable_tiling": (bool, "--enable_tiling: tiled VAE decode is not built yet; the parallel VAE splits the "
                      "decode by rows over the ranks"),
    "enable_slicing": (bool, "--enable_slicing: sliced VAE decode is not built yet; the parallel VAE splits "
                       "the decode by rows over the ranks"),
    "use_fp8_t5_encoder": (bool, "--use_fp8_t5_encoder: fp8 text encoders are not built yet; use --dtype "
                           "bf16"),
    "use_fast_attn": (bool, "--use_fast_attn: DiTFastAttn is not built yet; use --cache fbc or teacache"),
    "use_ray": (bool, "--use_ray: Ray workers are not built; processes come from --nproc or torchrun"),
    "ray_world_size": (lambda v: v is not None, "--ray_world_size: Ray workers are not built; use --nproc"),
    "img_file_path": (lambda v: v is not None, "--img_file_path: image inputs are not built yet; generate "
                      "runs text-to-image and text-to-video pipelines"),
}

#: call arguments set from flags: dest -> pipeline __call__ parameter
CALL_FLAGS = {"num_inference_steps": "num_inference_steps", "guidance_scale": "guidance_scale",
              "true_cfg_scale": "true_cfg_scale", "max_sequence_length": "max_sequence_length",
              "height": "height", "width": "width", "num_frames": "num_frames",
              "num_images_per_prompt": "num_images_per_prompt"}
OUTPUT_TYPES = ("pil", "pt", "np", "latent")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DIGITS,
                   help="a local diffusers pipeline folder, a hub id already in --download-dir's cache, or "
                        "'digits' (the embedded model; default)")
    g.add_argument("--download-dir", "--download_dir", dest="download_dir", default=None,
                   help="hub cache folder for a hub id (from_pretrained's cache_dir)")
    g.add_argument("--trust-remote-code", "--trust_remote_code", dest="trust_remote_code", action="store_true",
                   help="allow a folder's custom pipeline code")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="weights and compute dtype (auto: bf16 on CUDA, fp32 on CPU)")

    g = p.add_argument_group("parallel")
    g.add_argument("--ulysses_degree", type=int, default=1)
    g.add_argument("--ring_degree", type=int, default=1)
    g.add_argument("--pipefusion_parallel_degree", type=int, default=1,
                   help="PipeFusion: pipeline stages over the block stack (cost-balanced)")
    g.add_argument("--num_pipeline_patch", type=int, default=None,
                   help="PipeFusion: patches the token sequence is split into (default: one per stage)")
    g.add_argument("--attn_layer_num_for_pp", type=int, nargs="*", default=None, help="(not built yet)")
    g.add_argument("--use_cfg_parallel", action="store_true", help="split the two CFG branches over 2 ranks")
    g.add_argument("--data_parallel_degree", type=int, default=1)
    g.add_argument("--tensor_parallel_degree", type=int, default=1, help="(not built yet)")
    g.add_argument("--split_scheme", default=None, help="(tensor parallel: not built yet)")
    g.add_argument("--use_ray", action="store_true", help="(not built)")
    g.add_argument("--ray_world_size", type=int, default=None, help="(not built)")
    g.add_argument("--nproc", type=int, default=None,
                   help="launch this many local processes (default: the product of the degrees)")
    g.add_argument("--plan", default=None, help="'auto': the cost model picks the degrees for --nproc ranks "
                                                "(xdit-fx plan shows its ranking); or a plan string")

    g = p.add_argument_group("runtime")
    g.add_argument("--warmup_steps", type=int, default=1,
                   help="PipeFusion: denoising steps that run the whole sequence synchronously (exact) before "
                        "patches use stale K/V")
    g.add_argument("--use_parallel_vae", action="store_true",
                   help="split the VAE decode by rows over all ranks (the default; --no_parallel_vae turns it off)")
    g.add_argument("--no_parallel_vae", action="store_true", help="decode the VAE on every rank whole")
    g.add_argument("--use_torch_compile", action="store_true", help="compile the parallel graph with Inductor")
    g.add_argument("--use_onediff", action="store_true", help="(not built yet)")
    g.add_argument("--use_teacache", action="store_true", help="the same as --cache teacache")
    g.add_argument("--use_fbcache", action="store_true", help="the same as --cache fbc")
    g.add_argument("--cache", choices=["fbc", "teacache"], default=None,
                   help="skip the block stack on steps where it changes little: First-Block-Cache or TeaCache")
    g.add_argument("--cache_threshold", type=float, default=None,
                   help="skip threshold (default: 0.08 for fbc, 0.2 for teacache; 0 never skips)")
    g.add_argument("--cache_coefficients", default=None,
                   help="TeaCache rescaling coefficients: a JSON file written by `xdit-fx calibrate-cache`")
    g.add_argument("--cache_warmup_steps", type=int, default=1, help="steps that always run the whole stack")
    g.add_argument("--enable_sequential_cpu_offload", action="store_true", help="(not built yet)")
    g.add_argument("--enable_model_cpu_offload", action="store_true", help="(not built yet)")
    g.add_argument("--enable_tiling", action="store_true", help="(not built yet)")
    g.add_argument("--enable_slicing", action="store_true", help="(not built yet)")
    g.add_argument("--use_fp8_t5_encoder", action="store_true", help="(not built yet)")
    g.add_argument("--use_fast_attn", action="store_true", help="(not built yet)")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--output_type", default="pil", choices=OUTPUT_TYPES,
                   help="pil: image files; pt/np/latent: the pipeline's tensor saved with torch.save")
    g.add_argument("--warmup", action="store_true",
                   help="run once before the timed run (the first run includes graph capture)")
    g.add_argument("--output", default="output.png",
                   help="image path (several images: a grid for digits, else NAME_i.png); a .pt file for "
                        "tensor output types")

    g = p.add_argument_group("input")
    g.add_argument("--prompt", nargs="+", action="extend",
                   help="prompt(s); for 'digits': digits such as '3' or '0,1,2' (default: all ten)")
    g.add_argument("--negative_prompt", nargs="+", action="extend", default=None)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--num_frames", type=int, default=None, help="video pipelines")
    g.add_argument("--img_file_path", default=None, help="(not built yet)")
    g.add_argument("--no_use_resolution_binning", action="store_true",
                   help="keep the asked size (pipelines with resolution binning)")
    g.add_argument("--num_inference_steps", type=int, default=None)
    g.add_argument("--guidance_scale", type=float, default=None)
    g.add_argument("--true_cfg_scale", type=float, default=None,
                   help="true CFG with a negative prompt (Flux-style pipelines)")
    g.add_argument("--max_sequence_length", type=int, default=None)
    g.add_argument("--num_images_per_prompt", type=int, default=None)


# ---- before any process -------------------------------------------------------------------------------

def refuse_not_built(args: argparse.Namespace) -> None:
    for dest, (is_set, reason) in NOT_BUILT.items():
        if is_set(getattr(args, dest, None)):
            raise PlanError(reason)


def plan_from_args(args: argparse.Namespace) -> Plan:
    if getattr(args, "use_parallel_vae", False) and args.no_parallel_vae:
        raise PlanError("--use_parallel_vae and --no_parallel_vae contradict each other; keep one")
    return Plan(ulysses_degree=args.ulysses_degree, ring_degree=args.ring_degree,
                pipefusion_degree=args.pipefusion_parallel_degree, cfg_degree=2 if args.use_cfg_parallel else 1,
                pipefusion_patches=args.num_pipeline_patch or 0, pipefusion_warmup_steps=args.warmup_steps,
                dp_degree=args.data_parallel_degree, compile=args.use_torch_compile,
                parallel_vae=not args.no_parallel_vae, cache=cache_from_args(args))


def apply_plan_flag(args: argparse.Namespace) -> None:
    """--plan auto|STRING: set the degree flags from it (the workers rebuild the plan from the flags)."""
    text = args.plan
    if text.strip().lower() == "auto":
        from xdit_fx.debug.planning import resolve_auto

        model = None if args.model == DIGITS else resolve_model(args.model, args.download_dir)
        images = max(1, len(args.prompt or [None])) * (getattr(args, "num_images_per_prompt", None) or 1)
        text = resolve_auto(model, args.nproc, height=args.height, width=args.width, frames=args.num_frames,
                            images=images, steps=args.num_inference_steps or 20)
    plan = Plan.from_string(text)
    args.ulysses_degree, args.ring_degree = plan.ulysses_degree, plan.ring_degree
    args.pipefusion_parallel_degree, args.use_cfg_parallel = plan.pipefusion_degree, plan.cfg_degree == 2
    args.num_pipeline_patch, args.data_parallel_degree = plan.pipefusion_patches or None, plan.dp_degree
    args.plan = None


def cache_from_args(args: argparse.Namespace):
    from xdit_fx.cache_config import FirstBlockCache, TeaCache, load_coefficients

    kind = getattr(args, "cache", None)
    for flag, name in (("use_teacache", "teacache"), ("use_fbcache", "fbc")):
        if getattr(args, flag, False):
            if kind not in (None, name):
                raise PlanError(f"--{flag} and --cache {kind} ask for two caches; keep one")
            kind = name
    if kind is None:
        if getattr(args, "cache_threshold", None) is not None or getattr(args, "cache_coefficients", None):
            raise PlanError("--cache_threshold / --cache_coefficients need --cache fbc or --cache teacache")
        return None
    fields: dict[str, Any] = {"warmup_steps": args.cache_warmup_steps}
    if args.cache_threshold is not None:
        fields["threshold"] = args.cache_threshold
    if args.cache_coefficients:
        if kind != "teacache":
            raise PlanError("--cache_coefficients are TeaCache's; use --cache teacache")
        try:
            fields["coefficients"] = load_coefficients(args.cache_coefficients)
        except (OSError, ValueError, KeyError) as e:
            raise PlanError(f"--cache_coefficients {args.cache_coefficients!r}: {e}; pass the JSON file "
                            "`xdit-fx calibrate-cache --out FILE` wrote.") from None
    return (FirstBlockCache if kind == "fbc" else TeaCache)(**fields)


def check_process_count(plan: Plan, nproc: int) -> None:
    """The degrees against --nproc, said in generate's flags."""
    if plan.world_size == nproc:
        return
    if plan.world_size == 1:
        raise PlanError(f"--nproc {nproc} but every parallel degree is 1: add degrees whose product is {nproc} "
                        f"(e.g. --ulysses_degree {nproc}, or --use_cfg_parallel with --nproc 2), or drop --nproc.")
    product = " * ".join(f"{axis}({plan.degree(axis)})" for axis in AXES)
    raise PlanError(f"{product} = {plan.world_size} != world_size({nproc}): the degrees need {plan.world_size} "
                    f"processes; pass --nproc {plan.world_size} (or leave --nproc out), or change the degrees.")


def call_kwargs(opts: dict[str, Any]) -> dict[str, Any]:
    """The pipeline call's arguments from the flags (only flags that were given, so defaults stay the
    pipeline's)."""
    kwargs: dict[str, Any] = {}
    for dest, param in CALL_FLAGS.items():
        if opts.get(dest) is not None:
            kwargs[param] = opts[dest]
    if opts["model"] == DIGITS:
        if opts["height"] is not None or opts["width"] is not None:
            raise PlanError("the digits model makes 16x16 images; drop --height/--width")
        kwargs.pop("height", None), kwargs.pop("width", None)
        for flag in ("negative_prompt", "no_use_resolution_binning"):
            if opts.get(flag):
                raise PlanError(f"--{flag}: the digits model has no such input (its prompts are class labels); "
                                "drop the flag")
        kwargs["class_labels"] = digit_labels(opts["prompt"]) * kwargs.pop("num_images_per_prompt", 1)
    else:
        prompts = opts["prompt"] or ["a photo of a cat"]
        kwargs["prompt"] = prompts[0] if len(prompts) == 1 else prompts
        negative = opts.get("negative_prompt")
        if negative is not None:
            kwargs["negative_prompt"] = negative[0] if len(negative) == 1 else negative
        if opts.get("no_use_resolution_binning"):
            kwargs["use_resolution_binning"] = False
    kwargs["output_type"] = opts["output_type"]
    return kwargs


_FLAG_OF = {param: dest for dest, param in CALL_FLAGS.items()} | {
    "negative_prompt": "negative_prompt", "use_resolution_binning": "no_use_resolution_binning",
    "output_type": "output_type", "prompt": "prompt", "class_labels": "prompt"}


def pipeline_class(opts: dict[str, Any]):
    if opts["model"] == DIGITS:
        from xdit_fx.digits import DigitsPipeline
        return DigitsPipeline
    import diffusers

    from xdit_fx.loading import quiet_libraries

    with quiet_libraries():  # importing the class imports its libraries; rank 0 prints their messages later
        return getattr(diffusers, str(pipeline_index(opts["model"]).get("_class_name")), None)


def check_call_signature(cls, kwargs: dict[str, Any]) -> None:
    """Every call argument a flag sets is a named parameter of the pipeline class's __call__ (a pipeline's
    ``**kwargs`` takes deprecated names and would ignore the flag)."""
    if cls is None:
        return  # a custom pipeline (trust_remote_code): its signature is only known after loading
    params = inspect.signature(cls.__call__).parameters
    for name in kwargs:
        if name not in params:
            flag = _FLAG_OF.get(name, name)
            extra = " (use --guidance_scale)" if name == "true_cfg_scale" and "guidance_scale" in params else ""
            raise PlanError(f"--{flag}: {cls.__name__} takes no '{name}' argument{extra}; drop the flag.")


def _read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_config(model: str, plan: Plan, kwargs: dict[str, Any], has_frames: bool) -> None:
    """Checks that need only config.json files (diffusers' field names, no model's name): heads under
    Ulysses, the image size against the VAE's downsampling and the patch size, PipeFusion's token split."""
    from xdit_fx.pipeline import DENOISER_PREFIXES

    root = Path(model)
    index = pipeline_index(model)
    denoisers = [name for name in index if name.startswith(DENOISER_PREFIXES) and isinstance(index[name], list)]
    vae = _read_config(root / "vae" / "config.json")
    factor = vae.get("scale_factor_spatial")
    if factor is None and isinstance(vae.get("block_out_channels"), list):
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
    for name in denoisers:
        cfg = _read_config(root / name / "config.json")
        heads = cfg.get("num_attention_heads")
        u = plan.ulysses_degree
        if isinstance(heads, int) and u > 1 and heads % u:
            fits = [d for d in _divisors(heads) if d <= plan.sequence_parallel_degree]
            raise PlanError(f"{name}: {heads} attention heads (config.json) do not split over --ulysses_degree {u}; "
                            f"use a ulysses degree in {fits} and put the rest on --ring_degree (no head constraint).")
        patch = cfg.get("patch_size", 1)
        patch = max(patch[-2:]) if isinstance(patch, (list, tuple)) else patch
        if not isinstance(factor, int) or not isinstance(patch, int):
            continue
        unit = factor * patch
        for side in ("height", "width"):
            size = kwargs.get(side)
            if size is not None and (size <= 0 or size % unit):
                low, high = max(unit, size // unit * unit), (size // unit + 1) * unit
                raise PlanError(f"--{side} {size}: the VAE downsamples by {factor} and {name} takes {patch}x{patch} "
                                f"patches, so {side} must be a multiple of {unit} (e.g. {low} or {high}).")
        split = plan.patches * plan.sequence_parallel_degree if plan.pipefusion_degree > 1 else 1
        if split > 1 and not has_frames and kwargs.get("height") and kwargs.get("width"):
            tokens = (kwargs["height"] // unit) * (kwargs["width"] // unit)
            if tokens % split:
                raise PlanError(f"PipeFusion: {kwargs['height']}x{kwargs['width']} gives {tokens} image tokens, which "
                                f"do not split into {plan.patches} patches x {plan.sequence_parallel_degree} "
                                f"sequence-parallel ranks ({split} chunks); change the size or "
                                f"--num_pipeline_patch.")


def preflight(args: argparse.Namespace) -> tuple[Plan, int, dict[str, Any]]:
    """Everything that needs no process: returns the plan, the process count and the worker's options."""
    refuse_not_built(args)
    if getattr(args, "plan", None):
        apply_plan_flag(args)
    plan = plan_from_args(args)
    nproc = args.nproc if args.nproc is not None else plan.world_size
    if "RANK" not in os.environ:
        check_process_count(plan, nproc)
    options = vars(args).copy()
    options.pop("fn", None)
    options["model"] = resolve_model(args.model, args.download_dir)  # a hub id: fetched once, here
    kwargs = call_kwargs(options)  # bad prompts or sizes fail here, before any process starts
    cls = pipeline_class(options)
    check_call_signature(cls, kwargs)
    if options["model"] != DIGITS:
        from xdit_fx.loading import check_packages

        check_packages(options["model"], pipeline_index(options["model"]), load_kwargs(options))
        has_frames = cls is None or "num_frames" in inspect.signature(cls.__call__).parameters
        check_config(options["model"], plan, kwargs, has_frames)
    return plan, nproc, options


# ---- the run ---------------------------------------------------------------------------------------------

class WorkerError(XditFxError):
    """An error a rank raised, as one line (plus the dump hint of a pass error)."""


def one_line(exc: BaseException) -> str:
    """The message of an exception a worker raised, on one line; a pass error keeps its dump hint on a second."""
    if isinstance(exc, XditFxError):
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        hint = [line for line in lines if DUMP_HINT_MARK in line]
        body = " ".join(line for line in lines if DUMP_HINT_MARK not in line)
        return "\n".join([body or type(exc).__name__] + [f"  {h}" for h in hint[:1]])
    return f"{type(exc).__name__}: {first_line(exc)}"


def run(args: argparse.Namespace) -> int:
    """The CLI entry: check everything that needs no process, then run here or launch N processes."""
    plan, nproc, options = preflight(args)
    if nproc > 1 and "RANK" not in os.environ:
        report = _launch(options, nproc)
    else:
        try:
            report = generate_worker(options)
        except XditFxError:
            raise
        except Exception as e:
            raise WorkerError(one_line(e)) from None
    if report is not None:
        print(format_report(report))
    return 0


def _launch(options: dict[str, Any], nproc: int) -> dict[str, Any]:
    """N local processes; a rank's error comes back as WorkerError (the first one raised, printed once)."""
    from xdit_fx.runtime.launch import launch, quiet_launcher

    with tempfile.TemporaryDirectory(prefix="xdit-fx-errors-") as error_dir, quiet_launcher():
        try:
            return launch(_guarded_worker, nproc, (options, error_dir))[0]
        except Exception:
            errors = [json.loads(path.read_text()) for path in Path(error_dir).glob("rank*.json")]
            if not errors:
                raise
            first = min(errors, key=lambda r: r["time"])  # the others are usually its consequence
            print(file=sys.stderr)  # a rank stopped mid progress bar leaves the cursor inside its line
            raise WorkerError(f"rank {first['rank']}: {first['message']}") from None


def _guarded_worker(options: dict[str, Any], error_dir: str) -> dict[str, Any]:
    """generate_worker on a launched rank: an exception is written for the parent and the rank exits with
    code 2 (no traceback: the parent prints the one line)."""
    try:
        return generate_worker(options)
    except Exception as e:
        rank = int(os.environ.get("RANK", "0"))
        record = {"rank": rank, "time": time.time(), "message": one_line(e)}
        Path(error_dir, f"rank{rank}.json").write_text(json.dumps(record))
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(2)


def digit_labels(prompts: list[str] | None) -> list[int]:
    if not prompts:
        return list(range(10))
    labels = []
    for text in prompts:
        for part in filter(None, (p.strip() for p in text.split(","))):
            if not (part.isdigit() and len(part) == 1):
                raise PlanError(f"--prompt {text!r}: the digits model takes digits 0-9, e.g. --prompt 3 or '0,1,2'")
            labels.append(int(part))
    return labels


def load_kwargs(opts: dict[str, Any]) -> dict[str, Any]:
    """from_pretrained options from the flags."""
    kwargs: dict[str, Any] = {}
    if opts.get("download_dir"):
        kwargs["cache_dir"] = opts["download_dir"]
    if opts.get("trust_remote_code"):
        kwargs["trust_remote_code"] = True
    return kwargs


def generate_worker(opts: dict[str, Any]) -> dict[str, Any]:
    """Runs on every rank: load, parallelize, generate (timed); rank 0 saves the output."""
    from xdit_fx.loading import load_pipeline, quiet_other_ranks

    quiet_other_ranks()  # before diffusers and transformers are imported here: their messages once, on rank 0
    import xdit_fx

    plan = plan_from_args(argparse.Namespace(**opts))
    world = plan.world_size
    if world > 1 and "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
    pipe = load_pipeline(opts["model"], dtype=opts.get("dtype") or "auto", **load_kwargs(opts))
    kwargs = call_kwargs(opts)
    parallel = world > 1 or plan.cache is not None or plan.compile
    if parallel:
        pipe = xdit_fx.parallelize(pipe, plan)
    rank = pipe.rank if parallel else 0
    device = getattr(pipe, "device", torch.device("cpu"))

    def generate():
        t0 = time.perf_counter()
        with torch.no_grad():
            out = pipe(**kwargs, generator=torch.Generator(device="cpu").manual_seed(opts["seed"]))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - t0

    first_s = None
    if opts["warmup"]:
        _, first_s = generate()
    out, seconds = generate()
    comm = {axis: sum(ops.values()) for axis, ops in getattr(pipe, "last_comm", {}).items() if sum(ops.values())}
    report = {"plan": plan.to_string(), "world_size": world, "seconds": seconds, "first_run_s": first_s,
              "model": opts["model"], "device": str(device), "dtype": str(getattr(pipe, "dtype", "")), "comm": comm}
    if rank == 0:
        report["outputs"] = save_output(out, opts["output"], opts["output_type"], opts["model"] == DIGITS)
        if plan.cache is not None:
            stats = pipe.cache_stats
            report["cache"] = stats.summary() if hasattr(stats, "summary") else \
                "; ".join(f"{name}: {s.summary()}" for name, s in stats.items())
    return report


def _images_of(out):
    images = getattr(out, "images", None)
    if images is None:
        images = getattr(out, "frames", None)
        if images is None:
            raise XditFxError(f"the pipeline returned {type(out).__name__} with neither .images nor .frames")
        images = images[0] if isinstance(images, list) else images  # a list of videos: the first video's frames
    return images


def save_output(out, output: str, output_type: str, grid: bool) -> list[str]:
    """pil: image files (a video: its first video's frames); other output types: the whole tensor, .pt."""
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    if output_type != "pil":
        images = out.images if getattr(out, "images", None) is not None else getattr(out, "frames", None)
        if images is None:
            raise XditFxError(f"the pipeline returned {type(out).__name__} with neither .images nor .frames")
        path = path.with_suffix(".pt")
        torch.save(torch.as_tensor(images).detach().cpu(), path)
        return [str(path)]
    images = _images_of(out)
    if len(images) == 1:
        images[0].save(path)
        return [str(path)]
    if grid:
        from xdit_fx.digits import make_grid
        import numpy as np
        batch = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)[None] for im in images])
        make_grid(batch, nrow=min(10, len(images))).save(path)
        return [str(path)]
    paths = []
    for i, image in enumerate(images):
        p = path.with_name(f"{path.stem}_{i}{path.suffix}")
        image.save(p)
        paths.append(str(p))
    return paths


def format_report(report: dict[str, Any]) -> str:
    lines = [f"xdit-fx generate: {report['model']}, plan {report['plan']} on {report['world_size']} process(es)"
             f" ({report.get('device', 'cpu')}, {report.get('dtype', '')})"]
    if report.get("first_run_s") is not None:
        lines.append(f"  first run (graph capture included): {report['first_run_s']:.2f} s")
    lines.append(f"  generation: {report['seconds']:.2f} s")
    if report.get("comm"):
        received = ", ".join(f"{axis} {n / 1024:.1f} KiB" for axis, n in sorted(report["comm"].items()))
        lines.append(f"  received by rank 0 in the generation: {received}")
    if report.get("cache"):
        lines.append(f"  {report['cache']}")
    lines.append(f"  saved: {', '.join(report.get('outputs', []))}")
    return "\n".join(lines)
