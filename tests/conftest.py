import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # dist_utils, tolerances

import pytest


def pytest_addoption(parser):
    parser.addoption("--accept-golden", action="store_true", default=False,
                     help="rewrite tests/golden/ from what the code produces now (also XDIT_FX_ACCEPT_GOLDEN=1)")


@pytest.fixture(scope="session")
def accept_golden(request) -> bool:
    return bool(request.config.getoption("--accept-golden")) or os.environ.get("XDIT_FX_ACCEPT_GOLDEN") == "1"
