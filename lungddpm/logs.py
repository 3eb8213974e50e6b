"""Logging set-up shared by the CLI and the Snakemake script adapters."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(log_file: str | Path | None = None, level: int = logging.INFO) -> None:
    """Log to stderr and, when given, to ``log_file`` (a rule's ``log:``), replacing earlier handlers."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w"))
    for handler in handlers:
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    root.setLevel(level)


@contextlib.contextmanager
def rule_logging(log_file: str | Path) -> Iterator[logging.Logger]:
    """For ``script:`` adapters: log into the rule's log file and record any failure there before re-raising."""
    setup_logging(log_file)
    logger = logging.getLogger("lungddpm")
    try:
        yield logger
    except Exception:
        logger.exception("stage failed")
        raise
