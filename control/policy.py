"""The mesh-wide authorization a source may hold (``pymesh.config.v1.Authorization`` in the
protobuf JSON mapping), checked before it is streamed.

The proxies judge what they receive, and one that refuses an update keeps its last one: so
everything a proxy would refuse is refused here first, with the field path, and the source
keeps serving its last good policy. What depends on the proxy (the names in ``listeners``)
cannot be judged here. The engine of this process is not asked: it may be older or newer than
the proxies, and it knows nothing of ``servers``.
"""

from __future__ import annotations

import re
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

import pymesh
from pymesh._proto.pymesh.config.v1 import proxy_pb2

from .identity.spiffe import check_identity_pattern, pattern_matches

#: an HTTP method is a token (RFC 9110 §5.6.2)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def check_authorization(document: Any, path: str = "authorization") -> proxy_pb2.Authorization:
    """``document`` as an ``Authorization`` message, if every proxy would accept it. Raises
    :class:`pymesh.ConfigError` whose path starts at ``path``
    (``authorization.policies[2].identities[0]``; ``""`` for paths from the message itself)."""
    _check_shape(document, proxy_pb2.Authorization.DESCRIPTOR, path)
    try:
        authorization = json_format.ParseDict(document, proxy_pb2.Authorization(), ignore_unknown_fields=False)
    except json_format.ParseError as e:  # the shape check should have caught it; say it anyway
        raise pymesh.ConfigError(path, str(e).splitlines()[0]) from None
    names: dict[str, int] = {}
    for i, policy in enumerate(authorization.policies):
        at = _join(path, f"policies[{i}]")
        try:
            _check_policy(policy, i, names)
        except pymesh.ConfigError as e:
            named = f" (policy {policy.name.strip()!r})" if policy.name.strip() and e.path != "name" else ""
            raise pymesh.ConfigError(_join(at, e.path), e.message + named) from None
    return authorization


def applicable_policies(authorization: proxy_pb2.Authorization, identity: str) -> proxy_pb2.Authorization:
    """The policies a proxy of ``identity`` applies (no ``servers``, or one naming it), as the
    proxy itself would pick them: the rest are none of its business."""
    kept = proxy_pb2.Authorization(default_policy=authorization.default_policy)
    kept.policies.extend(p for p in authorization.policies
                         if not p.servers or any(pattern_matches(s, identity) for s in p.servers))
    return kept


def describe(authorization: proxy_pb2.Authorization | None) -> str:
    """``2 policies, default ALL_AUTHENTICATED`` (for logs), or ``none``."""
    if authorization is None:
        return "none"
    default = proxy_pb2.Authorization.Default.Name(authorization.default_policy)
    count = len(authorization.policies)
    return f"{count} {'policy' if count == 1 else 'policies'}, default {default}"


def _check_policy(policy: proxy_pb2.AuthorizationPolicy, index: int, names: dict[str, int]) -> None:
    """What the proxy checks of one policy; raises ConfigError with a path relative to it."""
    name = policy.name.strip()
    if not name:
        raise pymesh.ConfigError("name", "is required; policies are named in metrics and in denied answers")
    if name in names:
        raise pymesh.ConfigError("name", f"duplicate policy name {name!r} (also policies[{names[name]}])")
    names[name] = index
    for field in ("identities", "servers"):
        for j, pattern in enumerate(getattr(policy, field)):
            try:
                check_identity_pattern(pattern)
            except ValueError as e:
                raise pymesh.ConfigError(f"{field}[{j}]", str(e)) from None
    for j, listener in enumerate(policy.listeners):
        if not listener.strip():
            raise pymesh.ConfigError(f"listeners[{j}]", "is empty; name an INBOUND listener")
    for j, request_path in enumerate(policy.paths):
        if not request_path.startswith("/"):
            raise pymesh.ConfigError(f"paths[{j}]", f"{request_path!r} is not a path; expected /exact or /prefix/*")
    for j, method in enumerate(policy.methods):
        if not _TOKEN.fullmatch(method):
            raise pymesh.ConfigError(f"methods[{j}]", f"{method!r} is not an HTTP method (a token, e.g. GET)")


def _check_shape(document: Any, descriptor: Descriptor, path: str) -> None:
    """Field names and value types, so that a mistake is named by its path (``ParseDict``'s
    own messages do not say where)."""
    if not isinstance(document, dict):
        raise pymesh.ConfigError(path, f"expected a mapping ({descriptor.name}), found {_kind(document)}")
    fields = {f.json_name: f for f in descriptor.fields} | {f.name: f for f in descriptor.fields}
    for key, value in document.items():
        field = fields.get(key) if isinstance(key, str) else None
        if field is None:
            known = ", ".join(f.json_name for f in descriptor.fields)
            raise pymesh.ConfigError(_join(path, str(key)), f"unknown field; expected one of {known}")
        where = _join(path, field.name)
        if value is None:  # the JSON mapping's "not set"
            continue
        if not field.is_repeated:
            _check_value(value, field, where)
            continue
        if not isinstance(value, list):
            raise pymesh.ConfigError(where, f"expected a list, found {_kind(value)}")
        for i, item in enumerate(value):
            _check_value(item, field, f"{where}[{i}]")


def _check_value(value: Any, field: FieldDescriptor, where: str) -> None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        _check_shape(value, field.message_type, where)
    elif field.type == FieldDescriptor.TYPE_STRING:
        if not isinstance(value, str):
            raise pymesh.ConfigError(where, f"expected a string, found {_kind(value)}")
    elif field.type == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            raise pymesh.ConfigError(where, f"expected true or false, found {_kind(value)}")
    elif field.type == FieldDescriptor.TYPE_ENUM:
        values = field.enum_type.values_by_name
        known = value in values if isinstance(value, str) else (
            isinstance(value, int) and not isinstance(value, bool) and value in field.enum_type.values_by_number)
        if not known:
            raise pymesh.ConfigError(where, f"{value!r} is not one of {', '.join(values)}")


def _join(path: str, rest: str) -> str:
    return f"{path}.{rest}" if path else rest


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}
    return names.get(type(value), type(value).__name__)
