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
