"""Proof that a caller runs as the workload identity it asks a certificate for.

- Per-workload tokens (file and etcd sources): ``v1.<base64url(HMAC-SHA256(secret, id))>``,
  no padding, where ``id`` is the full SPIFFE id and ``secret`` the control plane's (the file
  ``tokenSecretFile``, else ``<stateDir>/token-secret``, generated on first use). An operator
  mints one with ``pymesh control token`` and hands it to the workload's proxy; it stays valid
  until the secret changes.
- Kubernetes (the ``kubernetes`` source): the pod's ServiceAccount token, checked with the
  TokenReview API on the API server the source already talks to. The control plane's
  credentials need ``create`` on ``tokenreviews`` (the ``system:auth-delegator`` ClusterRole).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import aiohttp

import pymesh

from ..settings import ControlSettings
from ..sources import Source
from ..sources.base import error_reason
from .files import read_setting_file, state_lock, write_private
from .spiffe import SpiffeId

if TYPE_CHECKING:
    from ..sources.kubernetes import KubernetesSource

TOKEN_VERSION = "v1"
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


def mint_token(secret: bytes, identity: SpiffeId | str) -> str:
    """The token that proves ``identity`` to a control plane holding ``secret``."""
    digest = hmac.new(secret, str(identity).encode(), hashlib.sha256).digest()
    return f"{TOKEN_VERSION}.{base64.urlsafe_b64encode(digest).rstrip(b'=').decode()}"


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
    """Per-workload tokens minted from this control plane's secret."""

    kind = "per-workload tokens"

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    async def verify(self, identity: SpiffeId, token: str) -> None:
        if not token:
            raise _denied(identity, "no token given (mint one with `pymesh control token`)")
        if not token.startswith(f"{TOKEN_VERSION}."):
            raise _denied(identity, f"not a pymesh token ({TOKEN_VERSION}.…)")
        if not hmac.compare_digest(token.encode(), mint_token(self._secret, identity).encode()):
            raise _denied(identity)


# -- Kubernetes ----------------------------------------------------------------------------


class TokenReviewVerifier:
    """ServiceAccount tokens, judged by the Kubernetes API server (TokenReview)."""

    kind = "Kubernetes TokenReview"

    def __init__(self, source: KubernetesSource) -> None:
        self.source = source

    async def verify(self, identity: SpiffeId, token: str) -> None:
        if not token:
            raise _denied(identity, "no token given (on Kubernetes, the pod's ServiceAccount token)")
        if len(token) > MAX_TOKEN_BYTES:
            raise _denied(identity, f"the token is over {MAX_TOKEN_BYTES} bytes")
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}
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
        expected = f"system:serviceaccount:{identity.namespace}:{identity.service_account}"
        username = str((status.get("user") or {}).get("username", ""))
        if username != expected:
            raise _denied(identity, f"it authenticates {username[:200] or 'no user'}, not {expected}")


def make_verifier(settings: ControlSettings, source: Source) -> Verifier:
    """TokenReview with the ``kubernetes`` source (on its API server), per-workload tokens
    otherwise."""
    from ..sources.kubernetes import KubernetesSource

    if isinstance(source, KubernetesSource):
        return TokenReviewVerifier(source)
    return TokenVerifier(load_secret(settings))
