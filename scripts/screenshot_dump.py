"""Render a dump's index.html in headless Chromium and save a PNG (to look at the page without a desktop).

    python scripts/screenshot_dump.py DUMP_DIR [OUT.png] [--width 1400] [--height 2400] [--fragment ID]

Writes the HTML first if the dump has none. Needs `chromium` (Debian: apt-get install chromium).
"""

from __future__ import annotations

import argparse
import os
import sys

from xdit_fx.debug.html import screenshot, write_html


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dump_dir")
    ap.add_argument("out", nargs="?", help="PNG path (default DUMP_DIR/index.png)")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=2400)
    ap.add_argument("--fragment", default="", help="open this element id first, e.g. pass5")
    args = ap.parse_args()
    html = os.path.join(args.dump_dir, "index.html")
    if not os.path.exists(html):
        write_html(args.dump_dir)
    out = args.out or os.path.join(args.dump_dir, "index.png")
    print(screenshot(html, out, args.width, args.height, args.fragment))
    return 0


if __name__ == "__main__":
    sys.exit(main())
