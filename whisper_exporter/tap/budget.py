"""One budget of bytes for every copy of the traffic the tap holds in memory at once.

Each upload may keep up to `max_in_memory` bytes in memory, but 200 of them at once
took RSS past the Kubernetes manifest's 256 Mi (issue 22, item 3): the total needs a
bound of its own. Uploads take from this budget as they arrive; one that cannot is
spooled to disk instead, as an upload over `max_in_memory` always was.
"""
from __future__ import annotations

import threading


class MemoryBudget:
    """A thread-safe count of bytes taken against a fixed limit; never above the limit."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_use = 0
        self.refused = 0  # takes refused: an upload spooled to disk, an answer passed as it came
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        """Take `n` bytes if they fit under the limit; False (and nothing taken) if not."""
        with self._lock:
            if self.in_use + n > self.limit:
                self.refused += 1
                return False
            self.in_use += n
            return True

    def give(self, n: int) -> None:
        """Give back `n` bytes taken before."""
        if n:
            with self._lock:
                self.in_use = max(0, self.in_use - n)
