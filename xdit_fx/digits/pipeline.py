"""DigitsPipeline: class-conditional sampling from the embedded digits DiT, with classifier-free guidance.

A real ``diffusers.DiffusionPipeline`` (components registered with ``register_modules``), so anything that
wraps stock pipelines - swapping ``pipe.transformer`` for a parallelized one, CFG- or data-parallel
wrappers - wraps this one the same way.

Sampling is rectified flow: ``x_sigma = (1 - sigma) * x0 + sigma * noise``, the transformer predicts the
velocity ``noise - x0`` at timestep ``sigma * 1000``, and ``FlowMatchEulerDiscreteScheduler.step`` takes the
Euler step ``x += (sigma_next - sigma) * velocity`` from sigma = 1 (noise) to 0 (image).

Besides ``__call__`` (one generation, all its steps), the pipeline exposes its loop one step at a time, for
step-level (continuous) batching in the service: ``start_denoising`` makes a request's `DenoisingState`
(its labels, seed-drawn latents and own schedule), ``denoise_step`` advances any set of states by one step
each in one transformer call (each at its own step index and timestep), and ``finish_denoising`` turns a
finished state into images. A state gives the image ``__call__`` gives, whichever states it shares its steps
with (up to the float reassociation of batched matrix products).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 2.0
CFG_MODES = ("batched", "two_call")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass
class DenoisingState:
    """One request's place in sampling: what ``denoise_step`` needs to advance it by one step.

    ``sigmas`` (``steps + 1`` values, ending at 0) and ``timesteps`` are the scheduler's for this request's own
    step count, so requests with different step counts can share a transformer call."""

    labels: torch.Tensor        # (n,) class ids
    latents: torch.Tensor       # (n, C, H, W)
    sigmas: torch.Tensor        # (steps + 1,) float32
    timesteps: torch.Tensor     # (steps,)
    guidance_scale: float
    step: int = 0               # steps taken

    @property
    def total(self) -> int:
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        return self.step >= self.total


class DigitsPipeline(DiffusionPipeline):
    """Generate 16x16 digits: ``pipe([0, 1, 2, ...]).images``.

    ``transformer``: a class-conditional ``DiTTransformer2DModel`` with ``num_embeds_ada_norm`` classes and
    a learned "null" label at index ``num_embeds_ada_norm`` (the extra embedding row diffusers adds when
    label dropout is on), used for the unconditional half of CFG.
    """

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: DiTTransformer2DModel, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, torch_dtype: torch.dtype = torch.float32) -> "DigitsPipeline":
        """Load a checkpoint directory (default: the embedded one) through the diffusers ``from_pretrained`` path.

        """
        root = Path(path) if path is not None else CHECKPOINT_DIR
        transformer = DiTTransformer2DModel.from_pretrained(
            root / "transformer", torch_dtype=torch_dtype, low_cpu_mem_usage=False
        )
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler")
        return cls(transformer=transformer.eval(), scheduler=scheduler)

    @property
    def labels(self) -> dict[str, int]:
        """Text label -> class id: the digits "0".."9" and their English words (diffusers' DiTPipeline
        convention, so text front-ends such as the service work with any class-conditional pipeline)."""
        return {**{str(i): i for i in range(10)}, **{w: i for i, w in enumerate(DIGIT_WORDS)}}

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Class ids of text labels ("7", "seven", " Seven "); ValueError naming the first unknown one."""
        texts = [label] if isinstance(label, str) else list(label)
        ids = []
        for text in texts:
            key = text.strip().lower() if isinstance(text, str) else text
            if key not in self.labels:
                raise ValueError(f"{text!r} is not a digit: use 0-9 or a digit's English word (zero ... nine)")
            ids.append(self.labels[key])
        return ids

    @property
    def null_class(self) -> int:
        return self.transformer.config.num_embeds_ada_norm

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int],
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        cfg_mode: str = "batched",
        progress: bool = True,
        return_dict: bool = True,
    ):
        """Sample one image per entry of ``class_labels``.

        ``guidance_scale`` <= 1 runs the conditional model only. ``cfg_mode="batched"`` runs conditional and
        unconditional in one transformer call on a doubled batch; ``"two_call"`` runs them as two calls
        (the shape a CFG-parallel wrapper splits over ranks). Both give the same images up to float
        reassociation. ``output_type``: ``"pt"`` (``(N, 1, 16, 16)`` tensor in [0, 1]), ``"np"``
        (``(N, 16, 16, 1)`` array in [0, 1]) or ``"pil"`` (list of grayscale images).
        """
        if cfg_mode not in CFG_MODES:
            raise ValueError(f"cfg_mode must be one of {CFG_MODES}, got {cfg_mode!r}")
        device = self.device  # a walk over the components: read once per call
        labels = self._check_labels(class_labels, device)
        x = self._initial_latents(len(labels), generator, latents, device)
        null = torch.full_like(labels, self.null_class)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        for t in self.progress_bar(timesteps) if progress else timesteps:
            velocity = self._velocity(x, t, labels, null, guidance_scale, cfg_mode)
            x = self.scheduler.step(velocity, t, x, return_dict=False)[0]

        images = self._postprocess(x, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    # ---- the loop one step at a time (step-level batching) ---------------------------------------------------
    @property
    def supports_step_batching(self) -> bool:
        """Whether ``denoise_step`` reproduces the scheduler: a deterministic flow-match Euler scheduler."""
        config = self.scheduler.config
        return isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler) and not config.get("stochastic_sampling")

    def start_denoising(self, class_labels: list[int], num_inference_steps: int = DEFAULT_STEPS,
                        guidance_scale: float = DEFAULT_GUIDANCE, generator=None,
                        latents: torch.Tensor | None = None) -> DenoisingState:
        """A request's initial state: the latents ``__call__`` would draw with the same generator(s), and the
        schedule ``__call__`` would run for ``num_inference_steps`` (from a copy of the scheduler)."""
        if not self.supports_step_batching:
            raise ValueError(f"step-level denoising needs a deterministic FlowMatchEulerDiscreteScheduler, "
                             f"not {type(self.scheduler).__name__}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        device = self.device  # a walk over the components: read once per request
        labels = self._check_labels(class_labels, device)
        x = self._initial_latents(len(labels), generator, latents, device)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=device)
        return DenoisingState(labels=labels, latents=x, sigmas=scheduler.sigmas.clone(),
                              timesteps=scheduler.timesteps.clone(), guidance_scale=float(guidance_scale))

    @torch.no_grad()
    def denoise_step(self, states: Sequence[DenoisingState]) -> None:
        """Advance every state by one Euler step, all of them in one (CFG-doubled) transformer call.

        Each sample gets its own state's timestep; the guidance combination and the Euler update are the
        ``__call__`` ones, applied per state. States that are already done are refused."""
        states = list(states)
        if not states:
            return
        if any(s.done for s in states):
            raise ValueError("denoise_step got a state that has taken all its steps")
        x = torch.cat([s.latents for s in states])
        labels = torch.cat([s.labels for s in states])
        t = torch.cat([s.timesteps[s.step].expand(len(s.labels)) for s in states])
        guided = any(s.guidance_scale > 1.0 for s in states)
        if guided:
            null = torch.full_like(labels, self.null_class)
            cond, uncond = self._predict(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
        else:
            cond = uncond = self._predict(x, t, labels)
        at = 0
        for s in states:
            n = len(s.labels)
            c, u = cond[at:at + n], uncond[at:at + n]
            velocity = u + s.guidance_scale * (c - u) if s.guidance_scale > 1.0 else c
            # FlowMatchEulerDiscreteScheduler.step: upcast, x + (sigma_next - sigma) * v, back to v's dtype
            dt = s.sigmas[s.step + 1] - s.sigmas[s.step]
            s.latents = (s.latents.to(torch.float32) + dt * velocity).to(velocity.dtype)
            s.step += 1
            at += n

    def finish_denoising(self, state: DenoisingState, output_type: str = "pil"):
        """The images of a finished state, as ``__call__(output_type=...)`` returns them."""
        if not state.done:
            raise ValueError(f"the state has taken {state.step} of its {state.total} steps")
        return self._postprocess(state.latents, output_type)

    def _check_labels(self, class_labels, device: torch.device) -> torch.Tensor:
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= self.null_class:
            raise ValueError(f"class_labels must be non-empty, each in [0, {self.null_class}), got {class_labels}")
        return labels

    def _initial_latents(self, batch: int, generator, latents: torch.Tensor | None,
                         device: torch.device) -> torch.Tensor:
        config = self.transformer.config
        shape = (batch, config.in_channels, config.sample_size, config.sample_size)
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=self.transformer.dtype)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents.to(device=device, dtype=self.transformer.dtype)

    def _predict(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        timestep = t.expand(x.shape[0]) if t.dim() == 0 else t  # one timestep, or one per sample
        return self.transformer(hidden_states=x, timestep=timestep, class_labels=labels, return_dict=False)[0]

    def _velocity(self, x, t, labels, null, guidance_scale: float, cfg_mode: str) -> torch.Tensor:
        """The (guided) velocity ``uncond + g * (cond - uncond)``; plain conditional when g <= 1."""
        if guidance_scale <= 1.0:
            return self._predict(x, t, labels)
        if cfg_mode == "batched":
            cond, uncond = self._predict(torch.cat([x, x]), t, torch.cat([labels, null])).chunk(2)
        else:
            cond = self._predict(x, t, labels)
            uncond = self._predict(x, t, null)
        return uncond + guidance_scale * (cond - uncond)

    @staticmethod
    def _postprocess(x: torch.Tensor, output_type: str):
        images = (x.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        array = images.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return array
        if output_type == "pil":
            return [Image.fromarray((a[..., 0] * 255).round().astype(np.uint8), mode="L") for a in array]
        raise ValueError(f"output_type must be 'pt', 'np' or 'pil', got {output_type!r}")


def load_pipeline(path: str | os.PathLike | None = None, torch_dtype: torch.dtype = torch.float32) -> DigitsPipeline:
    """``DigitsPipeline.load``: the embedded checkpoint unless ``path`` names another directory."""
    return DigitsPipeline.load(path, torch_dtype=torch_dtype)


def make_grid(images: torch.Tensor, nrow: int = 10, scale: int = 4, padding: int = 1) -> Image.Image:
    """Tile ``(N, 1, H, W)`` images in [0, 1], ``nrow`` per row, into one grayscale PIL image upscaled ``scale``x."""
    n, _, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    cell_h, cell_w = h + padding, w + padding
    canvas = torch.zeros(rows * cell_h + padding, nrow * cell_w + padding)
    for i, image in enumerate(images.float().cpu()):
        top, left = (i // nrow) * cell_h + padding, (i % nrow) * cell_w + padding
        canvas[top:top + h, left:left + w] = image[0]
    pixels = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    grid = Image.fromarray(pixels, mode="L")
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
