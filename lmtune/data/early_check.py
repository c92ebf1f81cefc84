"""Read the local JSON data files of a command line before the heavy libraries load.

Importing torch, transformers and datasets takes seconds (8-15 s on a busy machine) before a
run reaches its data; a file that cannot be parsed, has undecodable bytes, is empty, or holds
a field whose type changes between records can be named at once. This module imports only
the standard library and ``json_records`` for that reason. The full check (formats, fields,
empty responses) still runs in stage 2 before any weights load; files this check passes are
read again there.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmtune.argv import expand_config
from lmtune.data.json_records import consistent_records, read_json_records

DATA_FLAGS = ("--train_file", "--validation_file")


def check_json_files_early(argv: list[str]) -> None:
    """Parse each ``.json``/``.jsonl`` file the flags name (unless ``--skip_invalid_records``).

    Raises:
        DataFormatError: the first problem found, worded as stage 1 words it.
        ConfigError: an unreadable ``--config`` file.
    """
    # Only these flags, with argparse's own rules (last one wins, --flag=value); the full parse comes later.
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in DATA_FLAGS:
        parser.add_argument(flag)
    parser.add_argument("--skip_invalid_records", nargs="?", const="true", default="false")
    known, _ = parser.parse_known_args(expand_config(list(argv)))
    if known.skip_invalid_records.lower() not in ("false", "0", "no"):
        return  # bad lines become skipped records: stage 2 counts and reports them
    for value in (known.train_file, known.validation_file):
        if value and value.lower().endswith((".json", ".jsonl")) and Path(value).is_file():
            consistent_records(Path(value), read_json_records(value), skip_invalid=False)
