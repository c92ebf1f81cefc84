"""Flags of one subcommand (``lmtune chat``, ``eval``, ``merge``, ``serve``) parsed into its dataclass.

Contract: ``HfArgumentParser`` does the parsing; an unknown flag or key is a ``ConfigError``
that names it with a did-you-mean, and a bad value is a ``ConfigError`` instead of argparse's
``SystemExit``. This sits below every command so that none of them imports ``lmtune.args``
(the fine-tuning arguments) to parse its own few flags.
"""

from __future__ import annotations

import argparse
import difflib
from dataclasses import fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where it parses: `lmtune.cli` imports this module before torch and transformers load
    from transformers import HfArgumentParser

from lmtune.errors import ConfigError


class HelpShown(Exception):
    """``--help`` printed every flag; there is nothing else to do (not an error)."""


class DefaultsOnceFormatter(argparse.HelpFormatter):
    """``(default: X)`` after a flag's help, unless the help already says its default or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _known_flags(parser: HfArgumentParser) -> list[str]:
    return [s for action in parser._actions for s in action.option_strings if s.startswith("--")]


def unknown_name_problem(name: str, known: list[str], what: str) -> str:
    """``unknown flag --lora_rnak (did you mean --lora_rank?)``: one problem, with the closest known name."""
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown {what} {name}{hint}"


def raise_unknown_flags(parser: HfArgumentParser, remaining: list[str]) -> None:
    """Raise one error naming every leftover flag with a did-you-mean.

    Raises:
        ConfigError: always.
    """
    flags = [a.split("=")[0] for a in remaining if a.startswith("--")]
    if not flags:
        raise ConfigError(f"unexpected arguments {remaining}: every value must follow a --flag.")
    known = _known_flags(parser)
    problems = [unknown_name_problem(flag, known, "flag") for flag in flags]
    raise ConfigError("; ".join(problems) + ". Run with --help for every flag.")


def checked_parse(parser: HfArgumentParser, argv: list[str],
                  namespace: argparse.Namespace | None = None) -> argparse.Namespace:
    """``parser.parse_known_args`` as a library must: ``--help`` raises ``HelpShown``, a bad value a
    ``ConfigError`` (argparse would exit), and leftover flags one ``ConfigError`` with did-you-means.

    Raises:
        HelpShown: ``--help`` was given (the help is printed).
        ConfigError: for unknown flags or bad values.
    """
    try:
        namespace, remaining = parser.parse_known_args(argv, namespace=namespace)
    except SystemExit as exc:  # argparse exits on --help and on bad values; a library must not
        if exc.code in (0, None):
            raise HelpShown() from None
        raise ConfigError(f"invalid arguments {' '.join(argv)} (see the message above).") from exc
    if remaining:
        raise_unknown_flags(parser, remaining)
    return namespace


def parse_command_flags(dataclass_type: type, argv: list[str], prog: str) -> Any:
    """Parse the flags of one subcommand (``lmtune chat``, ``eval``, ``merge``) into its dataclass.

    Raises:
        HelpShown: ``--help`` was given (the help is printed).
        ConfigError: for unknown flags (with a did-you-mean) or bad values.
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_type, prog=prog, allow_abbrev=False, formatter_class=DefaultsOnceFormatter)
    values = vars(checked_parse(parser, argv))
    return dataclass_type(**{f.name: values[f.name] for f in fields(dataclass_type) if f.init})
