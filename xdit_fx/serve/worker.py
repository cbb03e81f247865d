"""One rank of `xdit-fx serve`: ``python -m xdit_fx.serve.worker CONFIG.json`` (started by the launcher).

A program rather than a function entrypoint: each rank is a plain subprocess whose exit status is its
result, so a rank that finishes its drain exits at once instead of waiting for the launcher to collect a
return value (which it does not do while it is shutting the ranks down after a signal).
"""

import json
import sys

from xdit_fx.serve.server import serve_worker

if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        sys.exit(serve_worker(json.load(f)))
