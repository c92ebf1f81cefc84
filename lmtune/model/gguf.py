"""Read GGUF files (llama.cpp's format) as ordinary transformers model directories.

Stage contract: ``inspect_gguf(file)`` checks a file cheaply (magic, metadata, tensor extents,
architecture) and says what it holds. ``convert_gguf(file, output_dir, dtype)`` writes
safetensors weights (quantized types dequantized), ``config.json`` without any
``quantization_config``, the tokenizer with its chat template, and the generation config.
``resolve_model_path(name_or_path)`` returns its argument unchanged unless it names a
``.gguf`` file; then it returns that file's conversion in lmtune's cache, converting it on
first use with a notice. Model loading (``lmtune.model.load``) calls it, so every command
takes a ``.gguf`` wherever it takes a model directory.

The reading itself is transformers' GGUF loader (``from_pretrained(..., gguf_file=...)``):
lmtune only checks the file first, so that a bad file fails with a clear message before
anything loads, and asks for a dequantized model, which ``save_pretrained`` accepts (a model
whose weights stay in GGUF blocks is "not serializable").
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lmtune.errors import ConfigError, UnsupportedError
from lmtune.home import lmtune_home

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MARKER = "lmtune_gguf.json"
_FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}
# general.architecture names transformers' loader renames before its own support check
# (modeling_gguf_pytorch_utils.load_gguf_checkpoint); accepted here for the same reason.
_ARCHITECTURE_ALIASES = {"t5encoder": "t5", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe",
                         "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}
_resolved: dict[tuple[str, int, int], str] = {}  # one notice per file and process


@dataclass(frozen=True)
class GgufSummary:
    """What ``inspect_gguf`` found: the architecture and the non-float tensor types."""

    path: Path
    architecture: str
    quantized_types: tuple[str, ...]

    def describe(self) -> str:
        """E.g. ``llama, Q4_1 and Q6_K weights dequantized``, for notices."""
        if not self.quantized_types:
            return f"{self.architecture}, unquantized"
        return f"{self.architecture}, {' and '.join(self.quantized_types)} weights dequantized"


def is_gguf_path(name_or_path: str | Path | None) -> bool:
    """Whether ``--model_name_or_path`` names a GGUF file (by its suffix: a directory never ends so)."""
    return bool(name_or_path) and str(name_or_path).lower().endswith(".gguf")


def supported_architectures() -> list[str]:
    """GGUF ``general.architecture`` values the installed transformers can load."""
    from transformers.integrations.gguf import GGUF_ARCHS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    # The legacy table's keys include the metadata prefixes "general" and "tokenizer".
    names = {a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")} | set(GGUF_ARCHS)
    return sorted(names)


def inspect_gguf(path: str | Path) -> GgufSummary:
    """Check a GGUF file without loading its weights.

    Raises:
        ConfigError: if the file is missing, is not GGUF, or is truncated or damaged.
        UnsupportedError: if transformers cannot load its architecture (the message lists those it can).
    """
    from gguf import GGUFReader

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{path}: no such GGUF file.")
    with path.open("rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise ConfigError(f"{path} is not a GGUF file: it starts with {head!r}, a GGUF file with {GGUF_MAGIC!r}. "
                          "Give a .gguf model file (as llama.cpp or Ollama use) or a transformers model directory.")
    try:
        reader = GGUFReader(path)
        architecture = str(reader.fields["general.architecture"].contents())
        size = path.stat().st_size
        short = [t.name for t in reader.tensors if t.data_offset + t.n_bytes > size]
    except (ValueError, KeyError, IndexError, OSError) as err:
        raise ConfigError(f"{path}: truncated or damaged GGUF file ({type(err).__name__}: {err}). "
                          "Download or write it again.") from err
    if short:
        raise ConfigError(f"{path}: truncated GGUF file: tensor {short[0]} ends past the end of the file "
                          f"({size} bytes). Download or write it again.")
    supported = supported_architectures()
    if _ARCHITECTURE_ALIASES.get(architecture, architecture) not in supported:
        import transformers

        raise UnsupportedError(
            f"{path}: GGUF architecture '{architecture}' cannot be read by transformers {transformers.__version__}"
            f"'s GGUF loader; it reads: {', '.join(supported)}. Convert the original (non-GGUF) checkpoint "
            "instead, or upgrade transformers if a newer release lists this architecture."
        )
    types = sorted({t.tensor_type.name for t in reader.tensors} - _FLOAT_TYPES)
    return GgufSummary(path, architecture, tuple(types))


def convert_gguf(path: str | Path, output_dir: str | Path, *, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write a GGUF file's model as a transformers model directory.

    Args:
        path: The ``.gguf`` file.
        output_dir: Where the model goes; created, and must be empty unless ``overwrite``.
        dtype: ``float32`` or ``bfloat16``: the dtype of the written weights.
        overwrite: Write into a non-empty ``output_dir``.

    Returns:
        ``output_dir``, loadable with ``AutoModelForCausalLM`` (or ``AutoModelForSeq2SeqLM``) and
        ``AutoTokenizer``.

    Raises:
        ConfigError: for a bad file (see ``inspect_gguf``), an unknown dtype, or a non-empty ``output_dir``.
        UnsupportedError: for an architecture transformers cannot read.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype} is not allowed; choose one of {', '.join(DTYPES)}.")
    summary = inspect_gguf(path)
    out = Path(output_dir).expanduser()
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--output_dir {out} is not empty; pass --overwrite_output_dir to write into it, "
                          "or choose a new directory.")
    model, tokenizer = _load_dequantized(summary.path, DTYPES[dtype])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    import transformers

    record = {"source": str(summary.path.resolve()), "architecture": summary.architecture,
              "dequantized_types": list(summary.quantized_types), "dtype": dtype,
              "transformers_version": transformers.__version__}
    # Written last: its presence means the conversion finished.
    (out / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return out


def _load_dequantized(path: Path, dtype: torch.dtype):
    """transformers' GGUF loader, asked for plain dense weights (``GgufConfig(dequantize=True)``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, GgufConfig

    folder, name = str(path.parent), path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    model = auto.from_pretrained(folder, gguf_file=name, dtype=dtype,
                                 quantization_config=GgufConfig(dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer


def gguf_cache_dir(path: str | Path) -> Path:
    """Where the cached conversion of ``path`` lives: keyed by the file's absolute path, size and mtime.

    A key from the file's metadata, not a hash of its contents, so that finding the cache for a
    multi-GB file costs nothing; a file changed in place gets a new mtime, hence a new conversion.
    """
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return lmtune_home() / "gguf" / f"{path.stem}-{key}"


def resolve_model_path(name_or_path: str | None) -> str | None:
    """A model directory or hub id unchanged; a ``.gguf`` file as its converted directory in lmtune's cache.

    The first use converts the file (float32 weights) into ``$LMTUNE_HOME/gguf/`` and says so; later
    uses reuse that directory. The conversion is written beside its final place and renamed into it,
    so concurrent processes or an interrupted run never leave a half-written model to be reused.

    Raises:
        ConfigError, UnsupportedError: as ``convert_gguf`` does.
    """
    if not is_gguf_path(name_or_path):
        return name_or_path
    path = Path(name_or_path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"--model_name_or_path {name_or_path}: no such GGUF file.")
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _resolved:
        return _resolved[key]
    target = gguf_cache_dir(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _only_one_converter(target, name_or_path):
        if (target / MARKER).is_file():
            logger.info("%s: using its transformers conversion in %s.", name_or_path, target)
        else:
            summary = inspect_gguf(path)
            logger.info("%s (%s): converting it once to a float32 transformers model in %s; later runs reuse it.",
                        name_or_path, summary.describe(), target)
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
            try:
                convert_gguf(path, staging, overwrite=True)
                staging.chmod(0o755)  # mkdtemp makes it private; the model folder should not be
                _move_into_place(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    _resolved[key] = str(target)
    return str(target)


@contextlib.contextmanager
def _only_one_converter(target: Path, name_or_path: str) -> Iterator[None]:
    """Hold an exclusive lock on ``target``'s lock file while checking for and writing the conversion.

    The ranks of a DDP run on one machine all resolve the same file at start: without the lock
    each would dequantize the whole model at once (N copies of float32 weights in memory) and
    all but one conversion would be thrown away. With it the first converts and the others wait
    and reuse its result. The lock file stays (deleting a lock file others may hold races).
    """
    with open(target.parent / f"{target.name}.lock", "a+b") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("%s: another process is converting it; waiting for its result.", name_or_path)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename the finished conversion to ``target``; a concurrent process may have got there first."""
    try:
        staging.rename(target)  # replaces at most an empty directory
    except OSError as err:
        if not (target / MARKER).is_file():
            raise ConfigError(f"{target} exists and is not a finished GGUF conversion ({err}); delete it and "
                              "retry.") from err
