"""Pure-Python twins of the C++ core: the readable specification, the test oracle and the
benchmark baseline. Nothing here is fast on purpose; everything here is exact."""

from .forest import ACTIVE, AGGREGATIONS, FINISHED, NO_ANSWER, PRUNED, VOTES, Forest
from .kv import BlockPool, KVCacheFull, KVCacheManager, PrefixIndex

__all__ = ["ACTIVE", "AGGREGATIONS", "FINISHED", "NO_ANSWER", "PRUNED", "VOTES", "Forest"]
__all__ += ["BlockPool", "KVCacheFull", "KVCacheManager", "PrefixIndex"]
