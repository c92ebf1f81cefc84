"""``python -m lmtune.finetune_clm``: the reference's ``finetune_clm.py`` command line."""

import sys

from lmtune.cli import script_clm

if __name__ == "__main__":
    sys.exit(script_clm())
