"""``python -m lmtune.finetune_clm``: the reference's ``finetune_clm.py`` command line."""

import sys

from lmtune.cli import main_clm

if __name__ == "__main__":
    sys.exit(main_clm())
