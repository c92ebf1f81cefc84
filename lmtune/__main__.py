"""``python -m lmtune``: the ``lmtune`` command."""

import sys

from lmtune.cli import script_main

sys.exit(script_main())
