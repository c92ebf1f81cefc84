"""What a training run (``finetune``, ``dpo``) does before its own work, in the order it does it.

Parse once and set the process up, check the model flags, resolve the device, configure
logging, decide bf16 on a CPU, and prepare the loaded model (and attach a new adapter).
Both entry points (``finetuning.py``, ``preference.py``) call these same steps, so that a
process, a command line and a model are set up the same way for SFT and DPO.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import transformers
from transformers import HfArgumentParser, PreTrainedModel

from lmtune.args import ParsedArgs, ParsedFlags, ProcessFlags, parse_flags
from lmtune.model.adapters import AdapterSettings, apply_adapter, check_method_allowed
from lmtune.model.load import fit_embeddings_to_tokenizer
from lmtune.model.lora_dropout import use_sixteen_bit_dropout
from lmtune.model.packed_attention import use_packed_attention
from lmtune.model.quantize import QuantSettings, check_quantization_backend, prepare_quantized_model
from lmtune.model.upcast import upcast_compute
from lmtune.train.cpu import check_bf16
from lmtune.train.distributed import check_device, setup_process
from lmtune.train.packing_check import PACK_BY_MASK, check_packing_isolation
from lmtune.train.progress import configure_messages, is_interactive

logger = logging.getLogger(__name__)


def parse_and_set_up(argv: list[str], *, parser: HfArgumentParser | None = None) -> ParsedFlags:
    """Parse argv once, then set this process up from the parsed flags.

    Building ``TrainingArguments`` starts accelerate, and under torchrun or mpirun the process
    group, so the device check, the launcher's environment and a ``ccl`` group come first
    (``setup_process``): a Gaudi command line without Habana's software stops before anything loads.

    Args:
        argv: Arguments without the program name.
        parser: The command's ``args.build_parser(...)``; ``lmtune finetune``'s when None.

    Raises:
        HelpShown: ``--help`` was given (the help is printed).
        ConfigError: for anything wrong with the command line.
    """
    notices: list[str] = []
    flags = parse_flags(argv, notices=notices, parser=parser)
    process = ProcessFlags.from_flags(flags)
    info = setup_process(
        process.device, use_habana=process.use_habana, use_lazy_mode=process.use_lazy_mode,
        ddp_backend=process.ddp_backend, ddp_timeout=process.ddp_timeout, deepspeed=process.deepspeed,
    )
    if info.rank != 0:  # one copy of the argument notices, not one per rank
        logging.getLogger("lmtune").setLevel(logging.ERROR)
    for notice in notices:
        logging.getLogger("lmtune.argv").warning(notice)
    return flags


def configure_logging(training: transformers.TrainingArguments) -> None:
    """This process's log levels (lmtune's and transformers') and progress display, from ``--log_level``."""
    level = training.get_process_log_level()
    logging.basicConfig(format="%(levelname)s lmtune: %(message)s", level=logging.INFO)
    logging.getLogger("lmtune").setLevel(level if training.log_level != "passive" else logging.INFO)
    transformers.utils.logging.set_verbosity(transformers_log_level(training))
    configure_messages(interactive=is_interactive(training.disable_tqdm), verbose=level <= logging.DEBUG)


def transformers_log_level(training: transformers.TrainingArguments) -> int:
    """transformers' own info lines (each loaded config in full, "Do not forget to share your model")
    would drown lmtune's at the reference's --log_level info: they show from --log_level debug."""
    level = training.get_process_log_level()
    return level if level <= logging.DEBUG else max(level, logging.WARNING)


def with_device(args: ParsedArgs) -> ParsedArgs:
    """Resolve ``--device`` into the TrainingArguments (``use_cpu``) before anything is placed."""
    device = check_device("hpu" if args.finetune.use_habana else args.finetune.device)
    if device == "cpu" and not args.training.use_cpu:
        args.training = dataclasses.replace(args.training, use_cpu=True)
    return args


def check_model_flags(args: ParsedArgs) -> None:
    """Method and quantization requests this machine or peft cannot run fail here, before anything loads."""
    check_method_allowed(args.finetune.peft, packed=args.data.dataset_concatenation)
    quant = quant_settings(args)
    if quant is not None:
        check_quantization_backend(quant, check_device(args.finetune.device))


def quant_settings(args: ParsedArgs) -> QuantSettings | None:
    """The QLoRA settings of ``--qlora`` (None without it)."""
    ft, training = args.finetune, args.training
    return QuantSettings.from_flags(ft.bits, ft.quant_type, ft.double_quant, training.bf16, training.fp16) \
        if ft.qlora else None


def check_cpu_bf16(args: ParsedArgs) -> tuple[ParsedArgs, bool]:
    """On a CPU, keep ``--bf16`` only where bf16 matrix multiplies beat float32 (``train/cpu.py``).

    Without AMX or AVX512-BF16, PyTorch emulates bf16 and training runs many times slower,
    so the run computes in float32 instead and says so; an adapter run still keeps the
    frozen weights in bf16, as asked (``model/upcast.py``). Ranks of a distributed run
    decide from the CPU flags alone, so that they all decide the same.

    Returns:
        The arguments (``bf16`` off where it would not help), and whether to store the
        frozen weights in bf16 while computing in float32.
    """
    training = args.training
    # A DeepSpeed config sets its own precision (the reference's pins bf16.enabled): dropping --bf16
    # would fail DeepSpeed's check of the config against these arguments at the first step.
    if not training.use_cpu or args.finetune.qlora or training.deepspeed:
        return args, False
    check = check_bf16(measure=False)
    if training.world_size == 1 and (training.bf16 or check.helps):  # timing costs about a second
        check = check_bf16(measure=True)
    notice = check.notice(requested=training.bf16)
    if notice and training.process_index == 0:
        logger.warning(notice)
    if training.bf16 and not check.helps:
        args.training = dataclasses.replace(training, bf16=False)
        return args, not args.finetune.full_finetune
    return args, False


def prepare_for_training(
    args: ParsedArgs, model: PreTrainedModel, tokenizer, dtype: torch.dtype | None, quant: QuantSettings | None,
    *, bf16_storage: bool = False,
) -> tuple[PreTrainedModel, torch.dtype | None]:
    """Fit the embeddings, compute in float32 over bf16 storage, prepare QLoRA, before any adapter.

    Returns:
        The model, and the dtype it computes in.
    """
    ft, training = args.finetune, args.training
    fit_embeddings_to_tokenizer(model, tokenizer)
    if bf16_storage:  # after any resize: new embedding rows must compute in float32 too
        upcast_compute(model)
        dtype = torch.float32
    # Training needs no KV cache, and with one transformers stops deriving the block-diagonal
    # mask of packed rows from their position_ids: packed samples would attend to each other.
    model.config.use_cache = False
    if quant is not None:
        model = prepare_quantized_model(model, activation_checkpointing=training.activation_checkpointing)
    elif training.activation_checkpointing and not ft.full_finetune:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks need a grad input
    return model, dtype


def adapt_model(
    args: ParsedArgs, model: PreTrainedModel, tokenizer, dtype: torch.dtype | None, quant: QuantSettings | None,
    *, bf16_storage: bool = False,
) -> tuple[PreTrainedModel, torch.dtype | None]:
    """``prepare_for_training``, probe packing, attach a new adapter from the ``--peft`` and ``--lora_*`` flags.

    Returns:
        The model to train, and the dtype of the explicit block-diagonal mask packed rows
        need (None when position_ids isolate samples, or nothing is packed).
    """
    ft = args.finetune
    model, dtype = prepare_for_training(args, model, tokenizer, dtype, quant, bf16_storage=bf16_storage)
    packing = None
    if args.data.dataset_concatenation:
        use_packed_attention(model)  # each packed sample attends alone: no masked-out work
        packing = check_packing_isolation(model)
    block_mask_dtype = dtype if packing == PACK_BY_MASK else None
    if ft.full_finetune:
        return model, block_mask_dtype
    settings = AdapterSettings(
        peft=ft.peft, lora_rank=ft.lora_rank, lora_alpha=ft.lora_alpha, lora_dropout=ft.lora_dropout,
        lora_target_modules=tuple(ft.lora_target_modules) if ft.lora_target_modules else None,
        lora_all_linear=ft.lora_all_linear, use_dora=ft.use_dora, use_rslora=ft.use_rslora,
        adapter_layers=ft.adapter_layers, adapter_len=ft.adapter_len,
        num_virtual_tokens=ft.num_virtual_tokens, ptun_hidden_size=ft.ptun_hidden_size,
    )
    model = apply_adapter(model, settings, packed=args.data.dataset_concatenation)
    use_sixteen_bit_dropout(model)
    return model, block_mask_dtype
