"""KV-cache block pool of one worker: reference counts, and automatic prefix caching.

Attention is data-parallel, so every worker has its own pool of ``num_blocks`` cache blocks of
``block_size`` token slots; the scheduler owns one ``BlockPool`` per worker and the worker only sees
block tables. A block is *free* (no holder, no reusable content), *held* (reference count > 0: the
sequences whose block tables name it; forks of one prompt share its full blocks), or *cached*
(count 0, but its content is indexed: reusable until evicted).

Prefix caching. A full block's identity is a hash chained over its tokens and everything before
them, and the served variant (a fine-tuned variant's experts change every later layer's input, so
its cache differs): ``block_hashes``. Once a completed step has written a full block, the scheduler
``register``s it under its hash. A new request ``lookup``s the hashes of its prompt's full blocks and
takes the longest cached prefix by reference (``acquire``): those tokens are not prefilled again.
When the last holder releases an indexed block it becomes cached, on an LRU list; allocation takes
free blocks first and then evicts the least recently released cached block. A held block is never
evicted, so eviction can never break a running stream.

Hashes are SHA-256 (truncated to 16 bytes) rather than Python's ``hash``: the index is shared by
all users of a replica, and a collision would hand one user's cache to another's prompt.
"""

import hashlib
from array import array
from collections import OrderedDict

ROOT = b"expertpool-kv-v1"


def block_hashes(tokens: list[int], block_size: int, variant: int = 0, parent: bytes | None = None,
                 start: int = 0) -> list[bytes]:
    """Hashes of the full blocks of ``tokens`` from block index ``start`` on (``parent``: the hash of
    block ``start - 1``, None when start is 0)."""
    h = parent if start else hashlib.sha256(ROOT + variant.to_bytes(4, "little")).digest()[:16]
    out = []
    for i in range(start, len(tokens) // block_size):
        h = hashlib.sha256(h + array("q", tokens[i * block_size:(i + 1) * block_size]).tobytes()).digest()[:16]
        out.append(h)
    return out


class BlockPool:
    def __init__(self, num_blocks: int, caching: bool = True):
        self.num_blocks = num_blocks
        self.caching = caching
        self.free = list(range(num_blocks - 1, -1, -1))
        self.refs = [0] * num_blocks
        self.index: dict[bytes, int] = {}          # hash -> block holding that content
        self.hash_of: dict[int, bytes] = {}        # block -> its hash, for indexed blocks
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached (count 0, indexed) blocks, oldest first
        self.evictions = 0

    def num_available(self) -> int:
        """Blocks an allocation can get: free ones plus cached ones it may evict."""
        return len(self.free) + len(self.lru)

    def num_used(self) -> int:
        """Blocks held by a sequence (cached-but-unheld blocks count as available)."""
        return self.num_blocks - self.num_available()

    def allocate(self, n: int) -> list[int]:
        assert n <= self.num_available(), f"{n} blocks asked, {self.num_available()} available"
        out = []
        for _ in range(n):
            if self.free:
                b = self.free.pop()
            else:  # evict the least recently released cached block
                b, _ = self.lru.popitem(last=False)
                del self.index[self.hash_of.pop(b)]
                self.evictions += 1
            self.refs[b] = 1
            out.append(b)
        return out

    def share(self, blocks: list[int]) -> None:
        """One more holder for blocks that are held already (forks of one prompt)."""
        for b in blocks:
            assert self.refs[b] > 0, f"block {b} is shared but not held"
            self.refs[b] += 1

    def release(self, blocks: list[int]) -> None:
        freed = []
        for b in blocks:
            assert self.refs[b] > 0, f"block {b} released more often than held"
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.hash_of:
                    self.lru[b] = None      # most recently released last
                else:
                    freed.append(b)
        self.free.extend(reversed(freed))

    # ---- prefix caching
    def lookup(self, hashes: list[bytes]) -> list[int]:
        """Blocks of the longest cached prefix of ``hashes`` (nothing is taken yet)."""
        out = []
        if self.caching:
            for h in hashes:
                b = self.index.get(h)
                if b is None:
                    break
                out.append(b)
        return out

    def acquire(self, blocks: list[int]) -> None:
        """Take cached or held blocks (from ``lookup``) by reference."""
        for b in blocks:
            if self.refs[b] == 0:
                self.lru.pop(b)
            self.refs[b] += 1

    def register(self, h: bytes, block: int) -> None:
        """``block`` (held) now holds the fully computed content of hash ``h``. If another block holds
        it already (two sequences computed the same prefix at once), that one stays the cached copy."""
        if not self.caching or h in self.index or block in self.hash_of:
            return
        self.index[h] = block
        self.hash_of[block] = h

    def reset(self) -> None:
        """The worker lost its cache (replaced after a failure): everything is free, nothing cached."""
        self.__init__(self.num_blocks, self.caching)
