"""``--help`` text that states each default once.

``HfArgumentParser`` appends ``(default: X)`` to every flag's help, also where the help already
says what the default means (``default: the model family's attention projections``), which
printed "(default: ...). (default: None)".
"""

from __future__ import annotations

import argparse


class OneDefaultHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Append ``(default: X)`` only to help texts that do not speak of their default themselves."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "default" in text.lower() else super()._get_help_string(action)
