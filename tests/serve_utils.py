"""Start `xdit-fx serve` as a real process on loopback for the serve tests."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

START_TIMEOUT_S = 240  # two ranks import torch and diffusers on 2 shared cores


class ServerProcess:
    """`python -m xdit_fx.cli serve ... --port 0 --port-file F`; the server reports the port it bound."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="xdit-fx-serve-test-")
        self.port_file = Path(self.tmp.name) / "port"
        self.log_path = Path(self.tmp.name) / "log"
        self.log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "xdit_fx.cli", "serve", "--port", "0", "--port-file", str(self.port_file),
               "--threads", "1", *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.port_file.is_file():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start:\n{self.output()[-4000:]}")
            time.sleep(0.2)
        self.port = int(self.port_file.read_text())
        self.url = f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> dict[int, int]:
        """rank -> pid of the worker processes (children of the launcher, RANK read from their environment)."""
        found = {}
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        for pid in map(int, children):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in env:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = pid
        return found

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


def decode_png(b64: str) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def images_to_tensor(arrays: list[np.ndarray]):
    """Grayscale uint8 images -> (N, 1, H, W) float tensor in [0, 1], what digit_accuracy takes."""
    import torch
    return torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0)[:, None]


def metric_value(text: str, name: str, labels: str = "") -> float:
    """A sample's value from Prometheus text (0 when absent)."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


def _char_tokenizer(path: Path):
    """A character-level CLIP tokenizer (lowercase letters and digits), written beside `path`: (vocab, tokenizer)."""
    import json
    import string

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tok_dir = path.parent / (path.name + "-tokenizer-src")
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=16)
    return vocab, tokenizer


def save_tiny_sd3_folder(path: Path) -> Path:
    """A Stable Diffusion 3 pipeline folder with random weights, built offline: two tiny CLIP text encoders
    and a tiny T5 encoder sharing one character-level CLIP tokenizer (nothing to download), the zoo's tiny
    SD3 transformer and a small VAE. Text prompts go through the real tokenize -> encode path."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from xdit_fx.zoo import get

    vocab, tokenizer = _char_tokenizer(path)
    torch.manual_seed(0)

    def encoder():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            projection_dim=16, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=1.5, shift_factor=0.06)
    pipe = StableDiffusion3Pipeline(
        transformer=get("sd3").build(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=encoder(), tokenizer=tokenizer, text_encoder_2=encoder(), tokenizer_2=tokenizer,
        text_encoder_3=T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                               num_heads=2, pad_token_id=1, eos_token_id=1)),
        tokenizer_3=tokenizer)
    pipe.save_pretrained(path)
    return path


def save_tiny_wan_folder(path: Path) -> Path:
    """A Wan text-to-video pipeline folder with random weights, built offline: a tiny UMT5 encoder with the
    character-level CLIP tokenizer, the zoo's tiny Wan transformer and a small Wan VAE."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from xdit_fx.zoo import get

    vocab, tokenizer = _char_tokenizer(path)
    torch.manual_seed(0)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                          num_heads=2, pad_token_id=1, eos_token_id=1))
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae,
                       scheduler=UniPCMultistepScheduler(flow_shift=3.0), transformer=get("wan").build())
    pipe.save_pretrained(path)
    return path
