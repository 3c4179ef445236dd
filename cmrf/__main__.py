"""``python -m cmrf``: the same as the ``cmrf`` console script."""

import sys

from cmrf.cli import main

sys.exit(main())
