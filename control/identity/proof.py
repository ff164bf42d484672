"""Proof that a caller runs as the workload identity it asks a certificate for.

- Per-workload tokens (file and etcd sources): ``v2.<claims>.<mac>``, where ``claims`` is
  base64url (no padding) of compact JSON ``{"sub": "<SPIFFE id>", "aud": "<audience>",
  "iat": <unix seconds>, "exp": <unix seconds>}`` and ``mac`` base64url (no padding) of
  HMAC-SHA256(secret, ``"v2." + claims``); ``secret`` is the control plane's (the file
  ``tokenSecretFile``, else ``<stateDir>/token-secret``, generated on first use). A token is
  accepted until ``exp`` for the identity ``sub`` by control planes whose ``tokenAudience``
  (default ``pymesh-control``) is ``aud``. ``pymesh control token`` mints one (``--lifetime``,
  default 24 h, at most a year; ``--audience``). It is only needed for a proxy's first
  certificate: renewals present the current certificate over mutual TLS instead. The ``v1``
  tokens of earlier versions (no expiry, no audience) are refused with a message saying so.
- Kubernetes (the ``kubernetes`` source): the pod's ServiceAccount token, checked with the
  TokenReview API on the API server the source already talks to, with ``spec.audiences`` set
  to the ``tokenAudience``: the pod must present a projected token for that audience (its
  default token, for the API server's audience, is refused, so it is never handed to us). The
  control plane's credentials need ``create`` on ``tokenreviews`` (the
  ``system:auth-delegator`` ClusterRole).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import aiohttp

import pymesh

from ..settings import DEFAULT_TOKEN_AUDIENCE, ControlSettings
from ..sources import Source
from ..sources.base import error_reason
from .files import read_setting_file, state_lock, write_private
from .spiffe import SpiffeId

if TYPE_CHECKING:
    from ..sources.kubernetes import KubernetesSource

TOKEN_VERSION = "v2"
LEGACY_TOKEN_VERSION = "v1"
#: a minted token's lifetime unless asked otherwise, and the longest one minted
DEFAULT_TOKEN_LIFETIME = 24 * 3600.0
MAX_TOKEN_LIFETIME = 366 * 24 * 3600.0
#: a token issued this far in the future is accepted (clocks a little ahead of ours)
TOKEN_CLOCK_SKEW = 60
SECRET_FILE = "token-secret"
MIN_SECRET_BYTES = 16
#: a token longer than this is refused without asking anyone (bounded work)
MAX_TOKEN_BYTES = 16 * 1024
TOKEN_REVIEWS_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


class ProofError(pymesh.MeshError):
    """The token does not prove the identity (PERMISSION_DENIED)."""


class ProofUnavailable(pymesh.MeshError):
    """The token could not be checked right now (UNAVAILABLE): the API server is away."""


class Verifier(Protocol):
    """Checks a token against an identity; raises :class:`ProofError` or :class:`ProofUnavailable`."""

    #: how proofs are checked, for the log
    kind: str

    async def verify(self, identity: SpiffeId, token: str) -> None: ...


def _denied(identity: SpiffeId, why: str = "") -> ProofError:
    return ProofError(f"the token does not prove identity {identity}" + (f": {why}" if why else ""))


# -- per-workload tokens --------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, signed: str) -> str:
    return _b64(hmac.new(secret, signed.encode(), hashlib.sha256).digest())


def mint_token(secret: bytes, identity: SpiffeId | str, *, audience: str = DEFAULT_TOKEN_AUDIENCE,
               lifetime: float = DEFAULT_TOKEN_LIFETIME, now: float | None = None) -> str:
    """A token proving ``identity`` to the control planes holding ``secret`` whose audience is
    ``audience``, valid for ``lifetime`` seconds (the format is in the module's docstring)."""
    if not 0 < lifetime <= MAX_TOKEN_LIFETIME:
        raise pymesh.ConfigError("lifetime", f"{lifetime:g}s; a token lives from 1s to {MAX_TOKEN_LIFETIME:g}s")
    issued = int(time.time() if now is None else now)
    claims = {"sub": str(identity), "aud": audience, "iat": issued, "exp": issued + max(1, int(lifetime))}
    body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    signed = f"{TOKEN_VERSION}.{body}"
    return f"{signed}.{_mac(secret, signed)}"


def load_secret(settings: ControlSettings) -> bytes:
    """The token secret: ``tokenSecretFile`` (which must exist), else ``<stateDir>/token-secret``
    (generated, mode 0600, if absent). Raises :class:`pymesh.ConfigError` naming the setting."""
    if settings.token_secret_file:
        path, setting = Path(settings.token_secret_file).expanduser(), "tokenSecretFile"
        secret = read_setting_file(path, setting).strip()
    else:
        directory, setting = settings.state_path, "stateDir"
        path = directory / SECRET_FILE
        with state_lock(directory):
            if not path.exists():
                write_private(path, base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=") + b"\n")
            secret = read_setting_file(path, setting).strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise pymesh.ConfigError(setting, f"{path}: the token secret is {len(secret)} bytes; at least "
                                          f"{MIN_SECRET_BYTES} are needed (for example `openssl rand -base64 32`)")
    return secret


class TokenVerifier:
    """Per-workload tokens minted from this control plane's secret, for its audience."""

    kind = "per-workload tokens"

    def __init__(self, secret: bytes, audience: str = DEFAULT_TOKEN_AUDIENCE) -> None:
        self._secret = secret
        self.audience = audience

    async def verify(self, identity: SpiffeId, token: str) -> None:
        if not token:
            raise _denied(identity, "no token given (mint one with `pymesh control token`)")
        if len(token) > MAX_TOKEN_BYTES:
            raise _denied(identity, f"the token is over {MAX_TOKEN_BYTES} bytes")
        if token.startswith(f"{LEGACY_TOKEN_VERSION}."):
            raise _denied(identity, "a v1 token, which never expires, is no longer accepted; mint a new one "
                                    "with `pymesh control token` (v2: with an expiry and an audience)")
        version, _, rest = token.partition(".")
        body, _, mac = rest.partition(".")
        if version != TOKEN_VERSION or not body or not mac:
            raise _denied(identity, f"not a pymesh token ({TOKEN_VERSION}.<claims>.<mac>)")
        if not hmac.compare_digest(mac.encode(), _mac(self._secret, f"{version}.{body}").encode()):
            raise _denied(identity)  # nothing of an unauthenticated token is believed or shown
        try:
            claims = json.loads(_unb64(body))
            subject, audience = str(claims["sub"]), str(claims["aud"])
            issued, expires = int(claims["iat"]), int(claims["exp"])
        except (ValueError, TypeError, KeyError, binascii.Error):
            raise _denied(identity, "its claims cannot be read") from None
        if subject != str(identity):
            raise _denied(identity, f"it was minted for {subject[:300]}")
        if audience != self.audience:
            raise _denied(identity, f"its audience is {audience[:100]!r}, not this control plane's "
                                    f"{self.audience!r}")
        now = time.time()
        if now >= expires:
            raise _denied(identity, f"it expired at {_utc(expires)}; mint a new one with `pymesh control token`")
        if issued > now + TOKEN_CLOCK_SKEW:
            raise _denied(identity, f"it is issued in the future ({_utc(issued)}); check the clocks")


def _utc(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


# -- Kubernetes ----------------------------------------------------------------------------


class TokenReviewVerifier:
    """ServiceAccount tokens, judged by the Kubernetes API server (TokenReview)."""

    kind = "Kubernetes TokenReview"

    def __init__(self, source: KubernetesSource, audience: str = DEFAULT_TOKEN_AUDIENCE) -> None:
        self.source = source
        self.audience = audience

    async def verify(self, identity: SpiffeId, token: str) -> None:
        if not token:
            raise _denied(identity, "no token given (on Kubernetes, the pod's ServiceAccount token)")
        if len(token) > MAX_TOKEN_BYTES:
            raise _denied(identity, f"the token is over {MAX_TOKEN_BYTES} bytes")
        # The audience makes the API server refuse a token not meant for us (the pod's own
        # API credentials), and one meant for us is useless against the API server.
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                  "spec": {"token": token, "audiences": [self.audience]}}
        server = self.source.access.server
        try:
            async with self.source.client().post(TOKEN_REVIEWS_PATH, json=review,
                                                 timeout=aiohttp.ClientTimeout(total=10)) as response:
                if response.status not in (200, 201):
                    text = (await response.text())[:300]
                    raise ProofUnavailable(f"the Kubernetes TokenReview API at {server} answered {response.status}: "
                                           f"{text}")
                status = (await response.json()).get("status") or {}
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
            raise ProofUnavailable(f"cannot check the token with the Kubernetes TokenReview API at {server}: "
                                   f"{error_reason(e)}") from None
        if not status.get("authenticated"):
            why = status.get("error") or "not authenticated"
            raise _denied(identity, f"the Kubernetes API did not authenticate it ({str(why)[:200]})")
        if self.audience not in (status.get("audiences") or []):
            raise _denied(identity, f"it is not a token for the audience {self.audience!r} (give the proxy a "
                                    "projected ServiceAccount token with that audience)")
        expected = f"system:serviceaccount:{identity.namespace}:{identity.service_account}"
        username = str((status.get("user") or {}).get("username", ""))
        if username != expected:
            raise _denied(identity, f"it authenticates {username[:200] or 'no user'}, not {expected}")


def make_verifier(settings: ControlSettings, source: Source) -> Verifier:
    """TokenReview with the ``kubernetes`` source (on its API server), per-workload tokens
    otherwise."""
    from ..sources.kubernetes import KubernetesSource

    if isinstance(source, KubernetesSource):
        return TokenReviewVerifier(source, settings.token_audience)
    return TokenVerifier(load_secret(settings), settings.token_audience)
