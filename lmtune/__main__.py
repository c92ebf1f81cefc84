"""``python -m lmtune``: the ``lmtune`` command."""

import sys

from lmtune.cli import main

sys.exit(main())
