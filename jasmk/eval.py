"""Moved to :mod:`jasmk.evaluation`; this old path is an alias of it that warns (until jasmk 0.3)."""

_JASMK_ALIAS = True

from ._moved import alias  # noqa: E402

alias(__name__, "jasmk.evaluation")
