"""SPIFFE ids of workloads: ``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``
(the mesh's naming convention). Parsed strictly, because the id ends up in certificates that every proxy of
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



#: the identity patterns authorization policies name clients and servers with
PATTERN_SHAPES = ("spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>, "
                  "spiffe://<trust-domain>/ns/<namespace>/*, spiffe://<trust-domain>/* or *")
#: proxies refuse a '_' in a pattern's trust domain (SPIFFE allows it): a policy they would
#: reject must not reach them
_PATTERN_TRUST_DOMAIN = re.compile(r"[a-z0-9.-]+")


def check_identity_pattern(text: str) -> str:
    """Returns ``text`` if it is an identity pattern the proxy accepts: an exact id, a
    namespace (``spiffe://td/ns/NS/*``), a trust domain (``spiffe://td/*``) or ``*``. Raises
    ValueError saying what is wrong."""
    if text == "*":
        return text
    if text.startswith("spiffe://"):
        trust_domain = text[len("spiffe://"):].partition("/")[0]
        if len(trust_domain) > MAX_TRUST_DOMAIN or not _PATTERN_TRUST_DOMAIN.fullmatch(trust_domain):
            raise ValueError(f"{text!r}: {trust_domain!r} is not a trust domain: use lower-case letters, "
                             "digits, '.' and '-'")
    if "*" not in text:
        parse_spiffe_id(text)
        return text
    rest = text[len("spiffe://"):-len("/*")] if text.startswith("spiffe://") and text.endswith("/*") else ""
    parts = rest.split("/")
    if not rest or "*" in rest or len(parts) not in (1, 3) or (len(parts) == 3 and parts[1] != "ns"):
        raise ValueError(f"{text!r} is not an identity pattern; expected {PATTERN_SHAPES}")
    if len(parts) == 3 and (not _SEGMENT.fullmatch(parts[2]) or parts[2] in (".", "..")):
        raise ValueError(f"{text!r}: the namespace {parts[2]!r} is not a valid path segment "
                         "(letters, digits, '.', '-' and '_')")
    return text


def pattern_matches(pattern: str, identity: str) -> bool:
    """Whether an identity pattern (checked by :func:`check_identity_pattern`) names
    ``identity``, as the proxy decides it: exact, ``…/*`` a prefix, ``*`` everyone."""
    if pattern == "*":
        return True
    if pattern.endswith("/*"):
        return identity.startswith(pattern[:-1])
    return pattern == identity
