"""Everything jasmk writes or reads: the checkpoint store, index and shard formats with their checks, asmk's
pickle format, atomic writes and the restricted unpickler."""

__all__ = []
