"""Read the local JSON data files of a command line before the heavy libraries load.

Importing torch, transformers and datasets takes seconds (8-15 s on a busy machine) before a
run reaches its data; a file that cannot be parsed, has undecodable bytes, is empty, or holds
a field whose type changes between records can be named at once. This module imports only
the standard library and ``json_records`` for that reason. The full check (formats, fields,
empty responses) still runs in stage 2 before any weights load; files this check passes are
read again there.
"""

from __future__ import annotations

from pathlib import Path

from lmtune.argv import expand_config, flag_value
from lmtune.data.json_records import consistent_records, read_json_records

DATA_FLAGS = ("--train_file", "--validation_file")


def check_json_files_early(argv: list[str]) -> None:
    """Parse each ``.json``/``.jsonl`` file the flags name (unless ``--skip_invalid_records``).

    Raises:
        DataFormatError: the first problem found, worded as stage 1 words it.
        ConfigError: an unreadable ``--config`` file.
    """
    argv = expand_config(list(argv))
    skip = flag_value(argv, "--skip_invalid_records")
    if "--skip_invalid_records" in argv and (skip is None or skip.lower() not in ("false", "0", "no")):
        return  # bad lines become skipped records: stage 2 counts and reports them
    for flag in DATA_FLAGS:
        value = flag_value(argv, flag)
        if value and value.lower().endswith((".json", ".jsonl")) and Path(value).is_file():
            consistent_records(Path(value), read_json_records(value), skip_invalid=False)
