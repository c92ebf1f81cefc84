"""Process-wide state a run changes, put back when a Python API call returns.

A run configures logging (a console handler, levels, filters that drop library noise),
warning filters, the libraries' progress bars and environment variables the launchers read,
as a command line needs. Called as ``lmtune.finetune(...)`` inside someone else's program,
none of that may outlive the call: ``preserved_process_state`` snapshots it and restores it.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager


LoggerState = dict[str, tuple[int, list, list, bool, bool]]


def _logger_state() -> tuple[LoggerState, dict[logging.Handler, list]]:
    """Every logger's level, filters, handlers and switches, and every handler's filters."""
    loggers = {"": logging.getLogger()}
    loggers.update({name: logger for name, logger in logging.Logger.manager.loggerDict.items()
                    if isinstance(logger, logging.Logger)})
    state = {name: (logger.level, logger.filters[:], logger.handlers[:], logger.propagate, logger.disabled)
             for name, logger in loggers.items()}
    handlers = {handler: handler.filters[:] for logger in loggers.values() for handler in logger.handlers}
    return state, handlers


def _restore_loggers(state: LoggerState, handlers: dict[logging.Handler, list]) -> None:
    for name, (level, filters, own_handlers, propagate, disabled) in state.items():
        logger = logging.getLogger(name or None)
        logger.setLevel(level)
        logger.filters[:] = filters
        logger.handlers[:] = own_handlers
        logger.propagate, logger.disabled = propagate, disabled
    for handler, filters in handlers.items():
        handler.filters[:] = filters
    # Loggers a library first made during the call keep what the library gave them, not lmtune's filters.
    for name, logger in logging.Logger.manager.loggerDict.items():
        if isinstance(logger, logging.Logger) and name not in state:
            logger.filters[:] = [f for f in logger.filters if not type(f).__module__.startswith("lmtune.")]


def _progress_bars() -> tuple[bool, bool]:
    import datasets
    import transformers

    return transformers.utils.logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()


def _restore_progress_bars(transformers_on: bool, datasets_on: bool) -> None:
    import datasets
    import transformers

    (transformers.utils.logging.enable_progress_bar if transformers_on
     else transformers.utils.logging.disable_progress_bar)()
    (datasets.enable_progress_bars if datasets_on else datasets.disable_progress_bars)()


@contextmanager
def preserved_process_state() -> Iterator[None]:
    """Run the body, then put logging, warning filters, progress bars and ``os.environ`` back as they were."""
    environ = dict(os.environ)
    loggers = _logger_state()
    bars = _progress_bars()
    try:
        with warnings.catch_warnings():  # restores the filter list and showwarning
            yield
    finally:
        _restore_loggers(*loggers)
        _restore_progress_bars(*bars)
        os.environ.clear()
        os.environ.update(environ)
