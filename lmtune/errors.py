"""Typed errors that a user can cause.

Every message names what is wrong, the value, what is allowed and the fix.
``cli.py`` turns these into a one-paragraph message and a non-zero exit code;
library code raises them and never calls ``sys.exit``.
"""


class LmtuneError(Exception):
    """Base class of every error lmtune raises on purpose."""


class ConfigError(LmtuneError, ValueError):
    """Arguments that cannot work, alone or together."""


class DataFormatError(LmtuneError, ValueError):
    """A data file or record that does not have the expected shape."""


class UnsupportedError(LmtuneError, NotImplementedError):
    """A combination this build of lmtune, or this machine, cannot run."""
