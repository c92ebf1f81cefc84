"""Prepared data on disk, so that in a multi-process run each node tokenizes once.

Contract: one process per node (the local main) runs ``prepare_data`` and writes the
result with :func:`save_prepared` to :func:`prepared_cache_dir`; the other processes on
the node wait for it, then :func:`load_prepared` it into memory instead of loading,
checking and tokenizing everything again; once all have, :func:`discard_prepared`
removes it. The directory's name hashes everything the
result depends on (the ``prepare_data`` arguments, each input file's size and mtime,
the tokenizer, the lmtune version, the node), so a rank whose view differs from its
local main's finds nothing and says so, instead of training on other data. The local
main always prepares afresh (the copy is a hand-off within one run, never reused), so a
changed hub dataset or lmtune checkout can never serve stale samples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

import lmtune
from lmtune.data.packing import PackingStats
from lmtune.data.prepare import PreparedData
from lmtune.data.render import RenderStats
from lmtune.errors import DataFormatError

MANIFEST = "lmtune_prepared.json"
_SPLITS = ("train", "validation", "raw_validation")
# Arguments that do not change the prepared data, or must not be written anywhere.
_NOT_KEYED = frozenset({"token", "cache_dir"})


def _path_fingerprint(value: str) -> list[Any] | None:
    """(path, size, mtime) of a file, or of every file under a directory; None for other strings."""
    path = Path(value)
    try:
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
        else:
            return None
        return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    except OSError:  # a string that is not a usable path (too long, no permission): not a file input
        return None


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, str):
        files = _path_fingerprint(value) if value else None
        return value if files is None else {"path": value, "files": files}
    return value


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """What rendering depends on: vocabulary, merges, normalizer, special tokens, template, sides."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [type(tokenizer).__name__, model, str(tokenizer.special_tokens_map),
             str(getattr(tokenizer, "chat_template", None)), tokenizer.padding_side, tokenizer.truncation_side]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def prepared_cache_dir(
    root: str | os.PathLike | None, tokenizer: PreTrainedTokenizerBase, inputs: Mapping[str, Any]
) -> Path:
    """The directory the prepared data of ``inputs`` goes to.

    Args:
        root: ``--dataset_cache_directory``; None means the datasets library's cache
            (``HF_DATASETS_CACHE``), under ``lmtune-prepared``.
        tokenizer: The tokenizer the data is rendered with.
        inputs: The keyword arguments given to ``prepare_data`` (the hub token is not hashed).

    Returns:
        ``root/lmtune-prepared/<sha256 prefix>`` (not created here).
    """
    keyed = {k: v for k, v in inputs.items() if k not in _NOT_KEYED}
    # One copy per node: torchrun's GROUP_RANK tells apart "nodes" that share a host.
    node = f"{socket.gethostname()}/{os.environ.get('GROUP_RANK', '')}"
    description = {"lmtune": lmtune.__version__, "node": node, "inputs": _jsonable(keyed),
                   "tokenizer": _tokenizer_fingerprint(tokenizer)}
    digest = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()
    base = Path(root) if root else Path(datasets.config.HF_DATASETS_CACHE)
    return base / "lmtune-prepared" / digest[:32]


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """No progress bar for a copy that takes a moment; restore the user's setting after."""
    already = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if not already:
            datasets.utils.enable_progress_bars()


def save_prepared(data: PreparedData, path: str | os.PathLike) -> Path:
    """Write ``data`` to ``path`` whole or not at all (a temporary directory renamed into place).

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.{socket.gethostname()}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    with _quiet_progress():
        for split in _SPLITS:
            dataset = getattr(data, split)
            if dataset is not None:
                dataset.save_to_disk(str(staging / split))
    manifest = {"splits": [s for s in _SPLITS if getattr(data, s) is not None],
                "stats": {k: dataclasses.asdict(v) for k, v in data.stats.items()},
                "packing": dataclasses.asdict(data.packing) if data.packing else None}
    # The manifest goes last: a directory without one is an interrupted write.
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    # Swap in whole: an earlier run's copy of the same inputs moves aside first (a directory
    # cannot be renamed onto a non-empty one); readers that opened its files keep them.
    old = path.parent / f".{path.name}.old.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.replace(path, old)
    try:
        os.replace(staging, path)
    except OSError:  # another writer of the same inputs got there between the two renames
        if not (path / MANIFEST).is_file():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return path


def load_prepared(path: str | os.PathLike) -> PreparedData:
    """Read what :func:`save_prepared` wrote, into memory (as the local main holds its own).

    Raises:
        DataFormatError: ``path`` holds no complete prepared data.
    """
    path = Path(path)
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise DataFormatError(
            f"no prepared data at {path}: this rank expected its node's local rank 0 to have written it. "
            "Either local rank 0 failed (its error comes first in the log), or it saw different inputs "
            "(data files, tokenizer or flags differ between the processes of this node). Fix: give every "
            "process the same command line and files."
        )
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    data = PreparedData(
        stats={k: RenderStats(**v) for k, v in manifest["stats"].items()},
        packing=PackingStats(**manifest["packing"]) if manifest["packing"] else None,
    )
    with _quiet_progress():
        for split in manifest["splits"]:
            setattr(data, split, datasets.load_from_disk(str(path / split), keep_in_memory=True))
    return data


def discard_prepared(path: str | os.PathLike) -> None:
    """Remove a copy every process has read (:func:`load_prepared` keeps nothing open)."""
    shutil.rmtree(path, ignore_errors=True)
