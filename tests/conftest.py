import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # dist_utils, tolerances

import pytest
import torch.multiprocessing

# Every rank the suite starts (spawn_gloo's workers, and `xdit_fx.runtime.launch` with XDIT_FX_START_METHOD)
# forks from one fork server that imported these modules once, instead of a fresh interpreter importing them
# per rank: about 4 s of CPU for torch + xdit_fx and 3 more for diffusers and the transformers it pulls in.
# The server never runs a tensor op, so its children fork from a process with no thread pool started.
torch.multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "xdit_fx", "xdit_fx.api",
                                              "diffusers", "diffusers.models", "dist_bytes", "parallel_checks",
                                              "references"])
os.environ.setdefault("XDIT_FX_START_METHOD", "forkserver")


def pytest_addoption(parser):
    parser.addoption("--accept-golden", action="store_true", default=False,
                     help="rewrite tests/golden/ from what the code produces now (also XDIT_FX_ACCEPT_GOLDEN=1)")


@pytest.fixture(scope="session")
def accept_golden(request) -> bool:
    return bool(request.config.getoption("--accept-golden")) or os.environ.get("XDIT_FX_ACCEPT_GOLDEN") == "1"
