"""``python -m lmtune.finetune_dpo``: the reference's ``dpo_clm.py`` command line (DPO, or ORPO with --orpo)."""

import sys

from lmtune.cli import main_dpo

if __name__ == "__main__":
    sys.exit(main_dpo())
