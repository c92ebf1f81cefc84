"""Where lmtune keeps what it builds or fetches once: ``$LMTUNE_HOME``, else ``~/.cache/lmtune``."""

import os
from pathlib import Path


def lmtune_home() -> Path:
    """Return lmtune's cache folder (not created here).

    Returns:
        ``$LMTUNE_HOME`` when set, else ``~/.cache/lmtune``.
    """
    return Path(os.environ.get("LMTUNE_HOME") or Path.home() / ".cache" / "lmtune").expanduser()
