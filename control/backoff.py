"""The control plane's one retry delay: exponential with full jitter, reset after a success.
Used wherever it tries again after a failure (reading a source, reconnecting to etcd or the
Kubernetes API), so control planes that lost the same dependency do not come back in step."""

from __future__ import annotations

import asyncio
import random

#: the first delay's upper bound, and the largest any delay grows to (seconds)
BASE = 0.1
MAX = 5.0


class Backoff:
    """``await backoff.wait()`` after each failure, ``backoff.reset()`` after a success."""

    def __init__(self, base: float = BASE, maximum: float = MAX) -> None:
        self.base = base
        self.maximum = maximum
        self._ceiling = base

    def reset(self) -> None:
        self._ceiling = self.base

    def next_delay(self) -> float:
        """A delay in [ceiling/2, ceiling], the ceiling doubling up to the maximum."""
        delay = random.uniform(self._ceiling / 2, self._ceiling)
        self._ceiling = min(self._ceiling * 2, self.maximum)
        return delay

    async def wait(self) -> None:
        await asyncio.sleep(self.next_delay())
