"""Train the embedded digits DiT: ``python -m xdit_fx.digits.train --out DIR [--steps N --seed S]``.

A class-conditional ``DiTTransformer2DModel`` learns rectified flow on scikit-learn's digits (16x16, one
channel, [-1, 1]); the result is written with ``save_pretrained`` next to a ``FlowMatchEulerDiscreteScheduler``
config, then reloaded through ``DigitsPipeline.load`` and scored with ``digit_accuracy`` - the numbers
printed at the end are those of the files on disk.

Choices made for a budget of minutes on 2 CPU cores:
* flow matching ``x_t = (1 - t) x0 + t noise``, target ``noise - x0``, t drawn logit-normal (more steps in
  the middle of the path, where the loss is hardest);
* labels dropped to the null class 10% of the time, one decision per sample, so CFG has an unconditional
  model to push away from;
* a small model (4 blocks, 4 heads x 24, 0.8M parameters, batch 64), AdamW at a high rate (1e-3) with
  linear warmup and cosine decay; an EMA of the weights is what is saved.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler
from diffusers.models.embeddings import LabelEmbedding

from xdit_fx.digits.data import IMAGE_SIZE, NUM_CLASSES, load_digit_images
from xdit_fx.digits.metric import digit_accuracy, digit_classifier
from xdit_fx.digits.pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS, DigitsPipeline

MODEL_CONFIG = dict(
    num_attention_heads=4,  # divisible by ulysses degrees 2 and 4
    attention_head_dim=24,
    in_channels=1,
    out_channels=1,  # exactly the velocity, no learned-sigma half
    num_layers=4,
    sample_size=IMAGE_SIZE,
    patch_size=2,  # 8 x 8 = 64 tokens
    num_embeds_ada_norm=NUM_CLASSES,
    norm_num_groups=1,
)
NUM_TRAIN_TIMESTEPS = 1000
LABEL_DROP = 0.1


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-per-class", type=int, default=50)
    return parser.parse_args(argv)


def build_transformer(seed: int) -> DiTTransformer2DModel:
    """A fresh model whose label dropout is left to the trainer.

    diffusers' ``LabelEmbedding`` drops labels itself in train mode, independently in every block (each
    block has its own embedding); CFG wants one decision per sample, so that is switched off here and
    done once in ``training_batch``. The null row (index ``NUM_CLASSES``) exists because the embedding is
    built with a nonzero drop probability.
    """
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**MODEL_CONFIG)
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return model


def training_batch(images, labels, batch_size: int, generator: torch.Generator):
    """Noised inputs, timesteps (0..1000), dropped-out labels and the velocity target for one step."""
    idx = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
    x0, y = images[idx], labels[idx].clone()
    y[torch.rand(batch_size, generator=generator) < LABEL_DROP] = NUM_CLASSES
    t = torch.sigmoid(torch.randn(batch_size, generator=generator))  # logit-normal(0, 1)
    noise = torch.randn(x0.shape, generator=generator)
    tb = t[:, None, None, None]
    return (1 - tb) * x0 + tb * noise, t * NUM_TRAIN_TIMESTEPS, y, noise - x0


def learning_rate(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    """EMA with the usual warm start (short memory early, when the weights move fast)."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - d)


def train(args) -> tuple[DiTTransformer2DModel, dict]:
    torch.set_num_threads(args.threads)
    images, labels = load_digit_images()
    model = build_transformer(args.seed).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)

    start, running = time.perf_counter(), None
    for step in range(args.steps):
        x_t, t, y, target = training_batch(images, labels, args.batch_size, generator)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args)
        pred = model(x_t, timestep=t, class_labels=y, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(ema, model, step, args.ema)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - start
            print(f"step {step + 1}/{args.steps}  loss {running:.4f}  {(step + 1) / elapsed:.2f} steps/s  "
                  f"{elapsed / 60:.1f} min", flush=True)
    elapsed = time.perf_counter() - start
    stats = dict(steps=args.steps, train_seconds=round(elapsed, 1), steps_per_second=round(args.steps / elapsed, 3),
                 final_loss=round(running, 4), params=sum(p.numel() for p in ema.parameters()))
    return ema, stats


def save(transformer: DiTTransformer2DModel, out: Path) -> None:
    """fp32 weights (0.8M parameters, 3.3 MB) plus the scheduler config the pipeline uses."""
    transformer.save_pretrained(out / "transformer")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0).save_pretrained(out / "scheduler")


def evaluate(path: Path, per_class: int, seed: int) -> dict:
    """Digit accuracy of the saved checkpoint at the default sampler settings, with and without CFG."""
    pipe = DigitsPipeline.load(path)
    labels = [c for c in range(NUM_CLASSES) for _ in range(per_class)]
    result = {}
    for name, scale in (("cfg", DEFAULT_GUIDANCE), ("no_cfg", 1.0)):
        generator = torch.Generator().manual_seed(seed)
        images = pipe(labels, guidance_scale=scale, generator=generator, progress=False).images
        result[f"digit_accuracy_{name}"] = digit_accuracy(images, labels)
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    transformer, stats = train(args)
    save(transformer, args.out)
    stats.update(evaluate(args.out, args.eval_per_class, args.seed))
    stats.update(classifier_held_out_accuracy=digit_classifier().held_out_accuracy, sampler_steps=DEFAULT_STEPS,
                 guidance_scale=DEFAULT_GUIDANCE, config=vars(args) | {"out": str(args.out)})
    (args.out / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
