"""SPIFFE ids of workloads: ``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``
(CONVENTIONS.md). Parsed strictly, because the id ends up in certificates that every proxy of
the mesh trusts."""

from __future__ import annotations

import re
from dataclasses import dataclass

#: SPIFFE's trust-domain and path-segment characters
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
#: SPIFFE ids are at most 2048 bytes; a trust domain at most 255
MAX_ID = 2048
MAX_TRUST_DOMAIN = 255
SHAPE = "spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"


@dataclass(frozen=True)
class SpiffeId:
    """A workload identity."""

    trust_domain: str
    namespace: str
    service_account: str

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


def check_trust_domain(trust_domain: str) -> str:
    """Returns ``trust_domain`` if SPIFFE allows it (lower-case letters, digits, ``.-_``).
    Raises ValueError saying what is wrong."""
    if not trust_domain:
        raise ValueError("a trust domain is required, for example cluster.local")
    if len(trust_domain) > MAX_TRUST_DOMAIN:
        raise ValueError(f"longer than {MAX_TRUST_DOMAIN} characters")
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise ValueError(f"{trust_domain!r} is not a trust domain: use lower-case letters, digits, '.', '-' and '_'")
    return trust_domain


def parse_spiffe_id(text: str) -> SpiffeId:
    """``spiffe://td/ns/NS/sa/SA`` → SpiffeId. Raises ValueError saying what is wrong."""
    if len(text) > MAX_ID:
        raise ValueError(f"longer than {MAX_ID} characters")
    if not text.startswith("spiffe://"):
        raise ValueError(f"{text!r} is not a SPIFFE id; expected {SHAPE}")
    trust_domain, _, path = text[len("spiffe://"):].partition("/")
    try:
        check_trust_domain(trust_domain)
    except ValueError as e:
        raise ValueError(f"{text!r}: {e}") from None
    parts = path.split("/")
    if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
        raise ValueError(f"{text!r} is not a workload identity; expected {SHAPE}")
    for part, what in ((parts[1], "namespace"), (parts[3], "service account")):
        if not _SEGMENT.fullmatch(part) or part in (".", ".."):
            raise ValueError(f"{text!r}: the {what} {part!r} is not a valid path segment "
                             "(letters, digits, '.', '-' and '_')")
    return SpiffeId(trust_domain, parts[1], parts[3])
