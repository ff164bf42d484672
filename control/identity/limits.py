"""Rate limits on certificate requests, so that no caller can starve issuance for the others:

- per peer (its IP address), checked before any proof, charged for every refused request: a
  peer sending bad tokens or bad CSRs is cut off before it costs a TokenReview;
- per identity (one misbehaving workload cannot hog the CA), per namespace (nor can a
  namespace holding tokens for many identities), and overall (the CA's own ceiling), charged
  only once the proof and the CSR have passed;
- a share of the overall budget is kept for renewals (a caller presenting its current
  certificate), so a flood of first certificates never stops identities already issued from
  renewing.

Every table of buckets is bounded (least recently used dropped first), so a stream of new
identities or peers costs constant time and memory each.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

#: per identity: a proxy renews a few times a day; restarts in a loop are what this stops
PER_IDENTITY_RATE = 10.0
PER_IDENTITY_BURST = 20.0
#: per namespace: many workloads of one namespace starting together
PER_NAMESPACE_RATE = 50.0
PER_NAMESPACE_BURST = 100.0
GLOBAL_RATE = 200.0
GLOBAL_BURST = 400.0
#: the share of the overall budget only renewals may use
RENEWAL_RESERVE = 0.25
#: refused requests a peer may make (bad proofs, bad CSRs) before it is cut off for a while
PER_PEER_RATE = 5.0
PER_PEER_BURST = 50.0
#: each table keeps at most this many buckets (the least recently used are dropped)
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


class BucketTable:
    """One bucket per key, at most ``limit`` of them: a dropped bucket was the least recently
    used, and a key seen again starts full (as a new one would)."""

    def __init__(self, rate: float, burst: float, limit: int = MAX_BUCKETS) -> None:
        self.rate, self.burst, self.limit = rate, burst, limit
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def get(self, key: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.limit:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, stamp=now)
        else:
            self._buckets.move_to_end(key)
        bucket.refill(now)
        return bucket

    def __len__(self) -> int:
        return len(self._buckets)


class RateLimiter:
    """Admits certificate requests (see the module's docstring for the order)."""

    def __init__(self, rate: float = PER_IDENTITY_RATE, burst: float = PER_IDENTITY_BURST,
                 global_rate: float = GLOBAL_RATE, global_burst: float = GLOBAL_BURST, *,
                 namespace_rate: float = PER_NAMESPACE_RATE, namespace_burst: float = PER_NAMESPACE_BURST,
                 peer_rate: float = PER_PEER_RATE, peer_burst: float = PER_PEER_BURST,
                 limit: int = MAX_BUCKETS) -> None:
        self.rate, self.burst = rate, burst
        self.global_bucket = TokenBucket(global_rate, global_burst)
        self.identities = BucketTable(rate, burst, limit)
        self.namespaces = BucketTable(namespace_rate, namespace_burst, limit)
        self.peers = BucketTable(peer_rate, peer_burst, limit)

    def admit_peer(self, peer: str) -> str | None:
        """Before any proof is checked: None when ``peer`` may try, else why not."""
        if self.peers.get(peer, time.monotonic()).tokens < 1:
            return (f"too many refused certificate requests from {peer}: at most {self.peers.rate:g}/s "
                    f"(bursts of {self.peers.burst:g}); fix the token or the request and retry later")
        return None

    def refused(self, peer: str) -> None:
        """Charges ``peer`` for a request that was refused."""
        bucket = self.peers.get(peer, time.monotonic())
        bucket.tokens = max(0.0, bucket.tokens - 1)

    def admit(self, identity: str, namespace: str = "", *, renewal: bool = False) -> str | None:
        """For a proven identity and an acceptable CSR: None when admitted (a token taken from
        each bucket), else why not."""
        now = time.monotonic()
        bucket = self.identities.get(identity, now)
        space = self.namespaces.get(namespace, now)
        self.global_bucket.refill(now)
        if bucket.tokens < 1:
            return (f"too many certificate requests for {identity}: at most {self.rate:g}/s "
                    f"(bursts of {self.burst:g}); retry later")
        if space.tokens < 1:
            return (f"too many certificate requests for namespace {namespace!r}: at most "
                    f"{self.namespaces.rate:g}/s (bursts of {self.namespaces.burst:g}); retry later")
        floor = 0.0 if renewal else self.global_bucket.burst * RENEWAL_RESERVE
        if self.global_bucket.tokens < floor + 1:
            return (f"too many certificate requests to this control plane: at most "
                    f"{self.global_bucket.rate:g}/s; retry later")
        bucket.tokens -= 1
        space.tokens -= 1
        self.global_bucket.tokens -= 1
        return None
