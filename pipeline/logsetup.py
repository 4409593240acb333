"""One logging format for the driver, stage tasks and training workers, with credentials masked."""

from __future__ import annotations

import logging
import sys

from pipeline.redaction import install_log_redaction

__all__ = ["configure_logging"]

LOG_FORMAT = "%(asctime)s %(name)s: %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    """Log to stderr in vitpipe's format (a no-op for the format if the process already has handlers:
    Ray prefixes each worker line with the task name and pid) and mask credentials in every record."""
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt="%H:%M:%S", stream=sys.stderr)
    install_log_redaction()
