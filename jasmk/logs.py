"""Logging for programs that use jasmk: importing jasmk configures nothing (its loggers have a NullHandler);
:func:`configure_logging` is for a program run (the CLI, scripts, notebooks)."""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["THIRD_PARTY_LEVELS", "configure_logging"]

# Loggers of the libraries jasmk loads whose INFO lines are load-time chatter, not news: faiss's "Loading faiss
# with AVX2 support", JAX's "Unable to initialize backend 'tpu'" and platform fallback notes, Orbax's
# "[process=0] [sync] Finished save" (through absl). The CLI and the experiments scripts turn them down by
# calling configure_logging; importing jasmk configures no logging.
THIRD_PARTY_LEVELS = {"faiss": logging.WARNING, "jax": logging.WARNING, "jax._src.xla_bridge": logging.ERROR,
                      "absl": logging.WARNING, "orbax": logging.WARNING}


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is when a record comes (tests swap it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure_logging(*, verbose: bool = False, prefix: str = "jasmk") -> None:
    """Logging for a program run (the CLI, the experiments scripts): jasmk's messages on stderr as
    ``prefix: message``, INFO and up with ``verbose``, warnings and errors otherwise; the libraries' load-time
    INFO lines (:data:`THIRD_PARTY_LEVELS`) off, their warnings kept. Progress bars are not affected."""
    for name, level in THIRD_PARTY_LEVELS.items():
        logging.getLogger(name).setLevel(level)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # XLA's C++ INFO lines (read when jaxlib loads)
    logger = logging.getLogger("jasmk")
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    handler = next((h for h in logger.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        logger.addHandler(handler)
    logger.propagate = False  # a library may give the root logger a handler (logging.info() does): print once
    handler.setFormatter(logging.Formatter(f"{prefix}: %(message)s"))
