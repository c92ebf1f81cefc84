"""What a training run (``finetune``, ``dpo``) does before its own work: parse once and set the process up.

Both entry points (``finetuning.py``, ``preference.py``) call these steps in the same order,
so that a process is set up, and a command line checked, the same way for SFT and DPO.
"""

from __future__ import annotations

import logging

from transformers import HfArgumentParser

from lmtune.args import ParsedFlags, ProcessFlags, parse_flags
from lmtune.train.distributed import setup_process


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
