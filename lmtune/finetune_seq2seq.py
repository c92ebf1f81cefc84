"""``python -m lmtune.finetune_seq2seq``: the reference's ``finetune_seq2seq.py`` command line."""

import sys

from lmtune.cli import script_seq2seq

if __name__ == "__main__":
    sys.exit(script_seq2seq())
