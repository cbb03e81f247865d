"""`python -m xdit_fx.cli ...`: the same as the `xdit-fx` command."""

import sys

from xdit_fx.cli import main

sys.exit(main())
