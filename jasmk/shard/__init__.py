"""The sharded index on a JAX mesh (:mod:`jasmk.shard.sharded`; its names are available here)."""

from .sharded import *  # noqa: F401,F403
from .sharded import __all__  # noqa: F401
