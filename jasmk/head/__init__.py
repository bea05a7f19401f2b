"""The MASt3R/HOW retrieval head in Flax: the head itself, whitening, local-feature selection, training, and
MASt3R checkpoint import (:mod:`jasmk.head.model` holds the head; its names are available here)."""

from .model import *  # noqa: F401,F403
from .model import __all__  # noqa: F401
