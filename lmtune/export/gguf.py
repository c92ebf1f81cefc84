"""``lmtune export gguf``: a base model (+ adapter, merged) as one GGUF file for llama.cpp and Ollama.

Stage contract: a transformers model directory (base, or base + LoRA/IA3 adapter merged by
``lmtune.export.merge``) goes in; one ``.gguf`` file comes out with the tensors under
llama.cpp's names, the hyperparameters under ``llama.*`` keys and the tokenizer under
``tokenizer.ggml.*`` (see ``gguf_vocab``), written through the ``gguf`` package's
``GGUFWriter``. Supported: the LLaMA architecture (``llama``: LLaMA, SmolLM2, TinyLlama;
``mistral``), which llama.cpp runs as ``llama``.

llama.cpp's LLaMA graph applies rotary embeddings to interleaved pairs (GPT-J style),
where transformers rotates the two halves of each head; the Q and K projections' rows are
therefore permuted on the way out (transformers undoes it when it reads a GGUF back).

Example::

    lmtune export gguf --model_name_or_path ./base --adapter ./out --output model.gguf --dtype q8_0
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from gguf import (
    GGML_QUANT_VERSION,
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    MODEL_TENSOR,
    TENSOR_NAMES,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    RopeScalingType,
    get_tensor_name_map,
    quantize,
)
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from lmtune.command_flags import parse_command_flags
from lmtune.errors import ConfigError, UnsupportedError
from lmtune.export.gguf_vocab import add_vocab, check_tokenizer
from lmtune.export.merge import merge_adapter, resolve_base
from lmtune.export.modelfile import modelfile_path, write_modelfile
from lmtune.model.load import (
    fit_embeddings_to_tokenizer,
    load_config,
    load_model,
    load_tokenizer,
)

logger = logging.getLogger(__name__)

SUPPORTED_FAMILIES = {"llama": "LLaMA, SmolLM2, TinyLlama", "mistral": "Mistral"}
FILE_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0}
Q8_BLOCK = 32  # values a Q8_0 block holds: rows whose length is not a multiple stay f16, as in llama.cpp


@dataclass
class ExportGgufArguments:
    output: str | None = field(default=None, metadata={"help": "The .gguf file to write."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base model (default with --adapter: the one the adapter was trained on)."}
    )
    adapter: str | None = field(default=None, metadata={"help": "LoRA/IA3 adapter directory to merge in first."})
    dtype: Literal["f32", "f16", "q8_0"] = field(
        default="f16", metadata={"help": "Storage of the matrices: f32, f16 or q8_0 (8-bit blocks); norms stay f32."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output file (and Modelfile)."})
    modelfile: bool = field(
        default=True, metadata={"help": "Also write an Ollama Modelfile beside the file (FILE.Modelfile)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code shipped with the base."})


def parse_export_gguf_args(argv: list[str]) -> ExportGgufArguments:
    """Parse ``lmtune export gguf`` flags.

    Raises:
        ConfigError: for unknown flags, bad values, or a missing --output / base model.
    """
    args = parse_command_flags(ExportGgufArguments, argv, "lmtune export gguf")
    if not args.output or not (args.model_name_or_path or args.adapter):
        raise ConfigError("lmtune export gguf needs --output and a model: lmtune export gguf "
                          "--model_name_or_path BASE [--adapter DIR] --output FILE.gguf [--dtype f32|f16|q8_0]")
    return args


def check_output(output: Path, overwrite: bool, modelfile: bool = False) -> None:
    """Refuse a non-.gguf name, a directory, or an existing file (or Modelfile) without ``overwrite``."""
    if output.suffix != ".gguf":
        raise ConfigError(f"--output {output}: name the file *.gguf (llama.cpp and Ollama look for that suffix).")
    if output.is_dir():
        raise ConfigError(f"--output {output} is a directory; give a file name such as {output / 'model.gguf'}.")
    if output.exists() and not overwrite:
        raise ConfigError(f"--output {output} exists; choose another name, or pass --overwrite to replace it.")
    if modelfile and modelfile_path(output).exists() and not overwrite:
        raise ConfigError(f"{modelfile_path(output)} exists; choose another --output name, pass --overwrite to "
                          "replace it, or --no_modelfile to write none.")


def check_family(config: PretrainedConfig, source: str) -> None:
    """Raise unless llama.cpp's ``llama`` graph computes this model exactly.

    Raises:
        UnsupportedError: another family, or rotary scaling other than none/linear/llama3.
    """
    families = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_FAMILIES.items())
    if config.model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedError(f"{source}: model type '{config.model_type}' is not supported for GGUF export; "
                               f"supported: {families}. Use lmtune merge for a transformers model instead.")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in ("default", "linear", "llama3"):
        raise UnsupportedError(f"{source}: rotary scaling '{rope['rope_type']}' is not supported for GGUF export "
                               "(supported: none, linear, llama3).")


def export_gguf(
    output: str | Path,
    *,
    base: str | None = None,
    adapter: str | Path | None = None,
    dtype: str = "f16",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    modelfile: bool = True,
) -> Path:
    """Merge ``adapter`` (if any) into ``base`` and write the result as a GGUF file.

    Args:
        output: The ``.gguf`` file to write.
        base: The base model; with an adapter, by default the one the adapter records.
        adapter: A LoRA/IA3 adapter directory, merged first with ``lmtune.export.merge``.
        dtype: ``f32``, ``f16`` or ``q8_0`` for the matrices; 1-D tensors stay f32.
        overwrite: Replace an existing ``output`` (and Modelfile).
        trust_remote_code: Allow model code shipped with the base.
        modelfile: Also write an Ollama Modelfile, ``output`` with the suffix ``.Modelfile``.

    Returns:
        The written file.

    Raises:
        ConfigError: a bad output name, an existing output without ``overwrite``, a missing
            base, or an adapter that does not fit the base.
        UnsupportedError: a model family or tokenizer that llama.cpp's ``llama`` graph cannot run.
    """
    output = Path(output)
    check_output(output, overwrite, modelfile)
    if dtype not in FILE_TYPES:
        raise ConfigError(f"--dtype {dtype} is not one of {', '.join(FILE_TYPES)}.")
    if adapter is not None:
        _warn_if_other_base(Path(adapter), base)
        base = resolve_base(Path(adapter), base)
    if not base:
        raise ConfigError("lmtune export gguf needs --model_name_or_path BASE (or --adapter DIR recording its base).")
    config = load_config(base, trust_remote_code=trust_remote_code)
    check_family(config, base)
    # The tokenizer merge will save: the adapter's when training saved one, else the base's.
    source = str(adapter) if adapter is not None and Path(adapter, "tokenizer_config.json").is_file() else base
    check_tokenizer(load_tokenizer(source, trust_remote_code=trust_remote_code, model_type=config.model_type), source)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lmtune-gguf-") as work:
        model_dir = _materialize(base, adapter, Path(work) / "model", trust_remote_code)
        partial = output.with_name(output.name + ".partial")
        try:
            write_gguf(model_dir, partial, dtype=dtype, name=Path(base).name)
            os.replace(partial, output)  # a half-written file never takes the output's name
        finally:
            partial.unlink(missing_ok=True)
    logger.info("wrote %s (%s, %.1f MB).", output, dtype, output.stat().st_size / 1e6)
    if modelfile:
        logger.info("wrote %s: ollama create NAME -f %s", write_modelfile(output), modelfile_path(output))
    return output


def _warn_if_other_base(adapter: Path, base: str | None) -> None:
    """An adapter of another base with the same shapes merges silently into nonsense: say so."""
    try:
        recorded = resolve_base(adapter, None)
    except ConfigError:
        return
    if base and Path(base).resolve() != Path(recorded).resolve():
        logger.warning("--adapter %s was trained on %s, not on --model_name_or_path %s; merging it anyway.",
                       adapter, recorded, base)


def _materialize(base: str, adapter: str | Path | None, work: Path, trust_remote_code: bool) -> Path:
    """A float32 transformers directory of base (+ merged adapter) with its tokenizer."""
    if adapter is not None:
        return merge_adapter(adapter, work, base=base, dtype="float32", trust_remote_code=trust_remote_code)
    config = load_config(base, trust_remote_code=trust_remote_code)
    model = load_model(base, config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(base, trust_remote_code=trust_remote_code, model_type=config.model_type)
    fit_embeddings_to_tokenizer(model, tokenizer)
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    return work


def write_gguf(model_dir: Path, output: Path, *, dtype: str = "f16", name: str | None = None) -> Path:
    """Write the LLaMA-architecture model saved in ``model_dir`` to ``output`` as GGUF.

    Raises:
        UnsupportedError: see ``check_family`` and ``gguf_vocab.read_vocab``.
    """
    config = AutoConfig.from_pretrained(model_dir)
    check_family(config, str(model_dir))
    window = getattr(config, "sliding_window", None)
    if window and window < config.max_position_embeddings:
        logger.warning("%s attends to a sliding window of %d tokens; llama.cpp's llama graph attends to the whole "
                       "context, so outputs agree only up to %d tokens.", model_dir, window, window)
    # Spooled to a temporary file as they come: the writer would otherwise hold every tensor in memory.
    writer = GGUFWriter(output, MODEL_ARCH_NAMES[MODEL_ARCH.LLAMA], use_temp_file=True)
    writer.add_name(name or model_dir.name)
    writer.add_file_type(FILE_TYPES[dtype])
    if dtype == "q8_0":
        writer.add_quantization_version(GGML_QUANT_VERSION)
    add_hyperparameters(writer, config)
    add_vocab(writer, model_dir, config.vocab_size)
    for gguf_name, array, raw_dtype in _gguf_tensors(model_dir, config, dtype):
        writer.add_tensor(gguf_name, array, raw_dtype=raw_dtype)
    if (getattr(config, "rope_parameters", None) or {}).get("rope_type") == "llama3":
        writer.add_tensor(TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return output


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_hyperparameters(writer: GGUFWriter, config: PretrainedConfig) -> None:
    """The ``llama.*`` keys llama.cpp builds its graph from."""
    head_dim = _head_dim(config)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:  # llama.cpp assumes hidden / heads otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def llama3_rope_factors(config: PretrainedConfig) -> np.ndarray:
    """LLaMA 3.1's per-frequency rotary divisors, the ``rope_freqs`` tensor llama.cpp reads.

    llama.cpp divides each rotary frequency by this factor; transformers computes the
    scaled frequencies instead, so the factors are its unscaled over its scaled ones.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim = _head_dim(config)
    theta = float(config.rope_parameters["rope_theta"])
    unscaled = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (unscaled / scaled.double()).float().numpy()


def permute_for_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder each head's output rows from transformers' half-split rotary layout to llama.cpp's interleaved one.

    Row ``i`` of a head's first half and row ``i`` of its second half are rotated together
    in transformers; llama.cpp rotates rows ``2i`` and ``2i+1`` together.
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _gguf_tensors(model_dir: Path, config: PretrainedConfig, dtype: str):
    """(GGUF name, array, quantization type or None) for every weight of the saved model."""
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{model_dir}: no safetensors weights to export.")
    for file in files:
        with safe_open(file, framework="pt") as weights:
            for hf_name in weights.keys():  # noqa: SIM118 (safe_open has keys(), no __iter__)
                if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # llama.cpp reuses token_embd when output.weight is absent
                gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise UnsupportedError(f"{file}: tensor {hf_name} has no GGUF name in the llama architecture.")
                tensor = weights.get_tensor(hf_name).float()
                if ".q_proj." in hf_name:
                    tensor = permute_for_rope(tensor, n_head)
                elif ".k_proj." in hf_name:
                    tensor = permute_for_rope(tensor, n_kv)
                yield (gguf_name, *encode_tensor(tensor.numpy(), dtype))


def encode_tensor(array: np.ndarray, dtype: str) -> tuple[np.ndarray, GGMLQuantizationType | None]:
    """The array as stored: 1-D tensors (norms, biases) in f32, matrices in ``dtype``."""
    if array.ndim == 1 or dtype == "f32":
        return array.astype(np.float32), None
    if dtype == "q8_0" and array.shape[-1] % Q8_BLOCK == 0:
        return quantize(array, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None
