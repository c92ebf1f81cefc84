"""Command line: ``lmtune finetune|quickstart|...`` and the reference's ``finetune_clm`` / ``finetune_seq2seq``.

The only module that imports everything, and the only one that exits: every error a
user can cause arrives as an ``LmtuneError`` and leaves as one paragraph on stderr with
exit code 2; anything else is a bug, shown with its traceback, exit code 1.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable

from lmtune.errors import LmtuneError

EXIT_USER_ERROR = 2
EXIT_BUG = 1


def _finetune(argv: list[str], seq2seq: bool | None) -> int:
    if not any(a in ("-h", "--help") for a in argv):
        from lmtune.data.early_check import check_json_files_early

        check_json_files_early(argv)  # a broken data file is named before torch loads
    from lmtune.finetuning import parse_for_model, run_finetune
    from lmtune.train.distributed import is_main_process

    if any(a in ("-h", "--help") for a in argv):
        from lmtune.args import build_parser

        build_parser(bool(seq2seq)).print_help()
        return 0
    args = parse_for_model(argv, seq2seq=seq2seq)
    metrics = run_finetune(args)
    if "train_loss" in metrics and is_main_process():  # one line per job, not one per rank
        print(final_line(metrics, args.training.output_dir))
    return 0


def final_line(metrics: dict, output_dir: str) -> str:
    """The last line of a run: its losses and where the adapter is."""
    figures = [f"training loss {metrics['train_loss']:.4f}"]
    if "eval_loss" in metrics:
        figures.append(f"eval loss {metrics['eval_loss']:.4f}")
    if "eval_ppl" in metrics:
        figures.append(f"eval perplexity {metrics['eval_ppl']:.2f}")
    return f"lmtune: {', '.join(figures)}; adapter in {output_dir}"


def _quiet_libraries() -> None:
    """chat, eval and merge: the libraries' notices and non-terminal progress bars off, as in a training run."""
    from lmtune.train.progress import configure_messages

    configure_messages(interactive=sys.stderr.isatty())


def _launch(argv: list[str]) -> int:
    from lmtune.launch import main as launch_main

    return launch_main(argv, prog="lmtune launch")


def _quickstart(argv: list[str]) -> int:
    import argparse

    from lmtune.demo import build_demo_model, default_demo_dir, demo_data_path
    from lmtune.finetuning import parse_for_model, run_finetune

    parser = argparse.ArgumentParser(
        prog="lmtune quickstart",
        description="Fine-tune a small model lmtune builds on instruction data lmtune ships; extra flags "
        "are passed to finetune.",
    )
    parser.add_argument("--output_dir", default="./lmtune-quickstart")
    known, extra = parser.parse_known_args(argv)
    model_dir = build_demo_model(default_demo_dir())
    argv = [
        "--model_name_or_path", str(model_dir), "--train_file", str(demo_data_path()),
        "--output_dir", known.output_dir, "--do_train", "--do_eval", "--validation_split_percentage", "10",
        "--dataset_concatenation", "--max_seq_length", "256", "--num_train_epochs", "3",
        "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--lora_rank", "16",
        "--lora_alpha", "32", "--lora_all_linear", "--logging_steps", "10", "--save_strategy", "no",
        "--overwrite_output_dir", "--report_to", "none", "--disable_tqdm", "True", *extra,
    ]
    print(f"lmtune quickstart: model {model_dir}, data {demo_data_path()}")
    metrics = run_finetune(parse_for_model(argv))
    print(f"lmtune: training loss {metrics['train_loss']:.4f}, eval loss {metrics['eval_loss']:.4f}, "
          f"eval perplexity {metrics['eval_ppl']:.2f}; adapter in {known.output_dir}")
    return 0


def _chat(argv: list[str]) -> int:
    from lmtune.chat.args import build_chat_parser, parse_chat_args

    if any(a in ("-h", "--help") for a in argv):
        build_chat_parser().print_help()
        return 0
    from lmtune.chat.session import run_chat

    _quiet_libraries()
    return run_chat(parse_chat_args(argv))


def _eval(argv: list[str]) -> int:
    from lmtune.evaluate.command import build_eval_parser, parse_eval_args, run_eval

    if any(a in ("-h", "--help") for a in argv):
        build_eval_parser().print_help()
        return 0
    _quiet_libraries()
    run_eval(parse_eval_args(argv))
    return 0


def _merge(argv: list[str]) -> int:
    from lmtune.export.merge import build_merge_parser, merge_adapter, parse_merge_args

    if any(a in ("-h", "--help") for a in argv):
        build_merge_parser().print_help()
        return 0
    args = parse_merge_args(argv)
    _quiet_libraries()
    out = merge_adapter(args.adapter, args.output_dir, base=args.model_name_or_path, dtype=args.dtype,
                        overwrite=args.overwrite_output_dir, trust_remote_code=args.trust_remote_code)
    print(f"lmtune merge: wrote the merged model to {out}")
    return 0


def _convert(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="lmtune convert", description="Convert a model from another format into "
                                     "a transformers model directory.")
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    llama2c = formats.add_parser("llama2c", help="llama2.c checkpoint (.bin, version 0 or 1) + its tokenizer.bin")
    llama2c.add_argument("checkpoint", help="llama2.c model file, e.g. stories260K.bin")
    llama2c.add_argument("tokenizer", help="llama2.c tokenizer file made for it, e.g. tok512.bin")
    llama2c.add_argument("output_dir", help="where the transformers model directory is written")
    llama2c.add_argument("--overwrite_output_dir", action="store_true", help="write into a non-empty directory")
    args = parser.parse_args(argv)
    from lmtune.export.convert_llama2c import convert_llama2c

    out = convert_llama2c(args.checkpoint, args.tokenizer, args.output_dir, overwrite=args.overwrite_output_dir)
    print(f"lmtune convert: wrote a LlamaForCausalLM model and tokenizer to {out}")
    return 0


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "finetune": (lambda argv: _finetune(argv, None), "fine-tune a model (causal or seq2seq, from its config)"),
    "quickstart": (_quickstart, "fine-tune lmtune's embedded small model on its sample data"),
    "chat": (_chat, "talk to a model (+ adapter) in the chat format it was trained with"),
    "eval": (_eval, "evaluate a model (+ adapter): ROUGE, HumanEval, TruthfulQA, lm-eval tasks, perplexity"),
    "merge": (_merge, "fold a LoRA/IA3 adapter into its base model and save a plain transformers model"),
    "convert": (_convert, "turn a llama2.c checkpoint into a transformers model directory"),
    "launch": (_launch, "run finetune_clm/finetune_seq2seq on N processes via torchrun, mpirun or deepspeed"),
}


def _usage() -> str:
    lines = ["usage: lmtune COMMAND [FLAGS]   (lmtune --version: the installed version)", "", "commands:"]
    lines += [f"  {name:<12} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def _run(command: Callable[[], int]) -> int:
    try:
        return command()
    except LmtuneError as err:
        print(f"lmtune: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("lmtune: interrupted.", file=sys.stderr)
        return 130
    except Exception as err:  # a bug: show everything, exit non-zero, never swallow
        traceback.print_exc()
        print(f"lmtune: failed with an unexpected {type(err).__name__}: {err}. "
              "This is a bug in lmtune or a library; the traceback above shows where.", file=sys.stderr)
        return EXIT_BUG


def _set_up_console_process() -> None:
    """What a command-line process (never the Python API) sets before torch loads."""
    logging.basicConfig(format="%(levelname)s lmtune: %(message)s", level=logging.INFO)
    # Before torch loads OpenMP: threads that finish their share of an op first then sleep instead
    # of spinning. On a CPU shared with other processes the spinning holds the cores the lagging
    # threads need; on a loaded 2-core VM a LoRA step took 4x longer with OpenMP's default
    # spin-then-sleep (bench/README.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lmtune`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _set_up_console_process()
    if argv[:1] in (["--version"], ["-V"]):
        from lmtune import __version__

        print(f"lmtune {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else EXIT_USER_ERROR
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"lmtune: error: unknown command '{name}'.{hint}\n\n{_usage()}", file=sys.stderr)
        return EXIT_USER_ERROR
    return _run(lambda: COMMANDS[name][0](rest))


def main_clm(argv: list[str] | None = None) -> int:
    """``finetune_clm``: the reference's causal-LM script."""
    _set_up_console_process()
    return _run(lambda: _finetune(list(sys.argv[1:] if argv is None else argv), None))


def main_seq2seq(argv: list[str] | None = None) -> int:
    """``finetune_seq2seq``: the reference's seq2seq (FLAN-T5) script."""
    _set_up_console_process()
    return _run(lambda: _finetune(list(sys.argv[1:] if argv is None else argv), True))


if __name__ == "__main__":
    sys.exit(main())
