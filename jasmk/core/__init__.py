"""The engine: codebook, aggregation, the inverted file and its scoring kernels, as pure functions on arrays.

Nothing here reads or writes files or imports torch, flax or orbax (:mod:`jasmk.storage` stores what this layer
makes; :mod:`jasmk.head` is the Flax retrieval head).
"""

__all__ = []
