"""Load a base model and its adapters for use (chat, eval, merge, serve): one device, one dtype table.

Contract: ``resolve_device`` turns ``--device`` (``auto`` picks cuda, then xpu, then hpu, then
cpu) into a device this machine has, or a typed error with the fix; ``inference_dtype`` turns
``--dtype`` into a torch dtype (``auto``: the checkpoint's own). ``load_for_use`` takes flat
values, not a command's arguments, and returns the model in eval mode on its device with the
tokenizer training saved beside the adapter (added special tokens included), else the base's.
Several adapters load onto one base under their names (peft multi-adapter), for ``lmtune serve``.
Training loads through ``lmtune.model.load`` directly, with its own dtype rules.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from lmtune.errors import ConfigError, UnsupportedError
from lmtune.model.load import fit_embeddings_to_tokenizer, load_config, load_model, load_tokenizer

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "xpu", "hpu")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# peft's name for the adapter of a single-adapter model.
DEFAULT_ADAPTER = "default"


def check_choice(flag: str, value: str, choices: tuple[str, ...]) -> str:
    """Return ``value`` normalised, or raise listing the choices and the closest one.

    Raises:
        ConfigError: when ``value`` is not one of ``choices``.
    """
    name = value.strip().lower()
    if name not in choices:
        close = difflib.get_close_matches(name, choices, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{flag} must be one of {', '.join(choices)} (got {value!r}).{hint}")
    return name


def importable(module: str) -> bool:
    try:
        return importlib.import_module(module) is not None
    except ImportError:
        return False


def xpu_available() -> bool:
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def detect_device() -> str:
    """The best device here: cuda, then xpu, then hpu (only when Habana's torch imports), then cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if xpu_available():
        return "xpu"
    # find_spec first: importing habana_frameworks.torch initialises the HPU runtime.
    if importlib.util.find_spec("habana_frameworks") is not None and importable("habana_frameworks.torch"):
        return "hpu"
    return "cpu"


def resolve_device(device: str) -> str:
    """Resolve ``--device`` to a device this machine has.

    Returns:
        "cpu", "cuda", "xpu" or "hpu".

    Raises:
        ConfigError: an unknown device name.
        UnsupportedError: the requested device is not available on this machine.
    """
    name = check_choice("--device", device, DEVICES)
    if name == "hpu":
        if not importable("habana_frameworks.torch"):
            raise UnsupportedError(
                f"--device {name} / --use_habana / --use_lazy_mode need Intel Gaudi (HPU), but "
                "habana_frameworks.torch is not importable here. Gaudi runs need Habana's SynapseAI "
                "software stack with its PyTorch build, plus optimum-habana. Fix: on this machine use "
                "--device cpu and drop --use_habana and --use_lazy_mode."
            )
        return "hpu"
    if name == "auto":
        return detect_device()
    available = {"cuda": torch.cuda.is_available, "xpu": xpu_available}.get(name, lambda: True)
    if not available():
        needs = {"cuda": "an NVIDIA GPU and CUDA-built torch", "xpu": "an Intel GPU and XPU-built torch"}
        raise UnsupportedError(
            f"--device {name} needs {needs[name]}, but torch.{name}.is_available() is False here "
            f"(torch {torch.__version__}). Fix: use --device cpu or --device auto."
        )
    return name


def inference_dtype(name: str, config: PretrainedConfig | None = None) -> torch.dtype:
    """``--dtype`` as a torch dtype; ``auto`` is the checkpoint's own (``config.dtype``), else float32.

    Raises:
        ConfigError: an unknown dtype name.
    """
    if name in DTYPES:
        return DTYPES[name]
    check_choice("--dtype", name, (*DTYPES, "auto"))
    saved = getattr(config, "dtype", None) if config is not None else None
    if isinstance(saved, str):
        saved = DTYPES.get(saved)
    return saved if isinstance(saved, torch.dtype) else torch.float32


def check_adapter_dir(adapter: Path, flag: str = "--adapter") -> None:
    """Raise unless ``adapter`` holds a PEFT adapter, saying what to do with a whole model instead.

    Raises:
        ConfigError: when there is no ``adapter_config.json``.
    """
    if not (adapter / "adapter_config.json").is_file():
        whole_model = (adapter / "config.json").is_file()
        hint = " It holds a whole model: pass it as --model_name_or_path." if whole_model else ""
        raise ConfigError(f"{flag} {adapter}: no adapter_config.json there; expected an lmtune/PEFT adapter.{hint}")


def _named(adapters: str | Path | Mapping[str, str | Path] | None) -> dict[str, Path]:
    if adapters is None:
        return {}
    if isinstance(adapters, (str, Path)):
        return {DEFAULT_ADAPTER: Path(adapters)}
    return {name: Path(path) for name, path in adapters.items()}


def load_for_use(
    base: str,
    adapters: str | Path | Mapping[str, str | Path] | None = None,
    *,
    device: str = "auto",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    adapter_flag: str = "--adapter",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model with its adapters on top, in eval mode on ``device``, and the tokenizer.

    Args:
        base: Base model directory or hub id.
        adapters: One adapter directory (loaded as peft's ``default``), or names mapped to
            directories, all loaded onto the one base; pick one with ``model.set_adapter(name)``.
        device: ``auto``, ``cpu``, ``cuda``, ``xpu`` or ``hpu`` (see ``resolve_device``).
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (the checkpoint's own).
        trust_remote_code: Allow model code shipped with the base.
        adapter_flag: The flag named in errors about an adapter directory.

    Returns:
        The model (a ``PeftModel`` when adapters were given) and the tokenizer: the first
        adapter's saved copy when it has one, else the base's.

    Raises:
        ConfigError: a missing adapter, adapters whose tokenizers differ, or a model that cannot load.
        UnsupportedError: a device this machine does not have.
    """
    named = _named(adapters)
    for path in named.values():
        check_adapter_dir(path, adapter_flag)
    target = resolve_device(device)  # before loading: a wrong --device costs nothing
    config = load_config(base, trust_remote_code=trust_remote_code)
    tokenizer = _load_tokenizer(base, named, config, trust_remote_code)
    model = load_model(base, config, dtype=inference_dtype(dtype, config), trust_remote_code=trust_remote_code)
    fit_embeddings_to_tokenizer(model, tokenizer)  # tokens added in training are rows of the adapter's base
    if named:
        from peft import PeftModel

        (first, first_dir), *rest = named.items()
        with _fitting(first_dir, base, adapter_flag):
            model = PeftModel.from_pretrained(model, str(first_dir), adapter_name=first)
        for name, path in rest:
            with warnings.catch_warnings(), _fitting(path, base, adapter_flag):
                # peft 0.22 reports the adapters already loaded as "missing keys" of each later one.
                warnings.filterwarnings("ignore", message="Found missing adapter keys")
                model.load_adapter(str(path), adapter_name=name)
        model.set_adapter(first)
    model.to(target)
    model.eval()
    return model, tokenizer


@contextmanager
def _fitting(adapter: Path, base: str, adapter_flag: str):
    """Turn torch's shape mismatch while loading an adapter into a ConfigError naming both sides."""
    try:
        yield
    except RuntimeError as err:  # torch's load_state_dict: the adapter's shapes are another base's
        if "size mismatch" not in str(err):
            raise
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), "")
        raise ConfigError(f"{adapter_flag} {adapter} does not fit the base model {base}: it was trained on a base "
                          f"of other dimensions ({first}). Pass the base it was trained on as --model_name_or_path."
                          ) from err


def _load_tokenizer(base: str, named: dict[str, Path], config: PretrainedConfig,
                    trust_remote_code: bool) -> PreTrainedTokenizerBase:
    """The tokenizer training saved beside the adapters (they must agree), else the base's."""
    saved = {name: path for name, path in named.items() if (path / "tokenizer_config.json").is_file()}
    source = str(next(iter(saved.values()))) if saved else None
    tokenizer = load_tokenizer(base, tokenizer_name=source, trust_remote_code=trust_remote_code,
                               model_type=config.model_type)
    for name, path in list(saved.items())[1:]:
        other = load_tokenizer(base, tokenizer_name=str(path), trust_remote_code=trust_remote_code,
                               model_type=config.model_type)
        if other.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(
                f"adapter {name} ({path}) was trained with a different vocabulary than {source}; adapters served "
                "on one base must share their tokenizer. Serve them from separate processes."
            )
    return tokenizer
