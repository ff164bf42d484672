"""Rate limits on certificate requests: a token bucket per identity (one misbehaving
workload cannot hog the CA) under a global one (the CA's own ceiling)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

#: per identity: a proxy renews a few times a day; restarts in a loop are what this stops
PER_IDENTITY_RATE = 10.0
PER_IDENTITY_BURST = 20.0
GLOBAL_RATE = 200.0
GLOBAL_BURST = 400.0
#: idle (full) per-identity buckets are dropped beyond this many
MAX_BUCKETS = 10_000


@dataclass
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up."""

    rate: float
    burst: float
    tokens: float = field(default=-1.0)
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.burst

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def full(self, now: float) -> bool:
        self.refill(now)
        return self.tokens >= self.burst


class RateLimiter:
    """Admits a request when both its identity's bucket and the global one have a token."""

    def __init__(self, rate: float = PER_IDENTITY_RATE, burst: float = PER_IDENTITY_BURST,
                 global_rate: float = GLOBAL_RATE, global_burst: float = GLOBAL_BURST) -> None:
        self.rate, self.burst = rate, burst
        self.global_bucket = TokenBucket(global_rate, global_burst)
        self.buckets: dict[str, TokenBucket] = {}

    def admit(self, identity: str) -> str | None:
        """None when admitted (a token taken from both buckets), else why not."""
        now = time.monotonic()
        bucket = self.buckets.get(identity)
        if bucket is None:
            if len(self.buckets) >= MAX_BUCKETS:
                self.buckets = {k: b for k, b in self.buckets.items() if not b.full(now)}
            bucket = self.buckets[identity] = TokenBucket(self.rate, self.burst, stamp=now)
        bucket.refill(now)
        self.global_bucket.refill(now)
        if bucket.tokens < 1:
            return (f"too many certificate requests for {identity}: at most {self.rate:g}/s "
                    f"(bursts of {self.burst:g}); retry later")
        if self.global_bucket.tokens < 1:
            return (f"too many certificate requests to this control plane: at most "
                    f"{self.global_bucket.rate:g}/s; retry later")
        bucket.tokens -= 1
        self.global_bucket.tokens -= 1
        return None
