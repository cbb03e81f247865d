"""Two "nodes" on loopback: two `xdit-fx serve` launcher processes (--nnodes 2, one rank each) joined by a
c10d rendezvous, serving cfg=2 across them. Slow (two launchers, two ranks): XDIT_FX_SLOW_TESTS=1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from serve_utils import decode_png, images_to_tensor  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("XDIT_FX_SLOW_TESTS") != "1", reason="slow: XDIT_FX_SLOW_TESTS=1")


def test_two_nodes_on_loopback_serve_cfg2(tmp_path):
    from xdit_fx.digits import digit_accuracy

    with socket.socket() as s:  # the rendezvous port (the c10d store binds it; released just before)
        s.bind(("127.0.0.1", 0))
        rdzv_port = s.getsockname()[1]
    port_file = tmp_path / "port"
    common = [sys.executable, "-m", "xdit_fx.cli", "serve", "--plan", "cfg=2", "--nproc", "1", "--nnodes", "2",
              "--rdzv-endpoint", f"127.0.0.1:{rdzv_port}", "--rdzv-id", uuid.uuid4().hex[:8], "--port", "0",
              "--port-file", str(port_file), "--threads", "1"]
    logs = [open(tmp_path / f"node{i}.log", "wb") for i in range(2)]
    nodes = [subprocess.Popen(common, stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
    try:
        deadline = time.monotonic() + 240
        while not port_file.is_file():
            assert time.monotonic() < deadline and all(n.poll() is None for n in nodes), \
                [(tmp_path / f"node{i}.log").read_text()[-2000:] for i in range(2)]
            time.sleep(0.2)
        url = f"http://127.0.0.1:{int(port_file.read_text())}"
        assert httpx.get(url + "/health").json()["ranks"] == 2
        r = httpx.post(url + "/v1/images/generations", json={"prompt": "six", "n": 4, "seed": 9}, timeout=120)
        assert r.status_code == 200
        images = [decode_png(d["b64_json"]) for d in r.json()["data"]]
        assert digit_accuracy(images_to_tensor(images), [6] * 4) == 1.0
        for node in nodes:
            node.send_signal(signal.SIGTERM)
        assert [node.wait(60) for node in nodes] == [0, 0]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
        for log in logs:
            log.close()
