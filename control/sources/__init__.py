"""Sources of truth for the control plane: ``file:DIR`` (a directory of YAML files),
``etcd:HOST:PORT[,HOST:PORT]``, and ``kubernetes`` / ``kubernetes:KUBECONFIG`` (Services and
EndpointSlices)."""

from __future__ import annotations

from pathlib import Path

from ..virtual_ip import DEFAULT_RANGE, IpNetwork, parse_range
from .base import RegistrationError, Sink, Source, SourceError, validate_endpoint, validate_services

__all__ = ["RegistrationError", "Sink", "Source", "SourceError", "make_source", "parse_etcd_endpoints",
           "validate_endpoint", "validate_services"]


def parse_etcd_endpoints(spec: str) -> list[tuple[str, int]]:
    """``HOST:PORT[,HOST:PORT]`` → [(host, port)]. Raises ValueError naming the bad part."""
    endpoints: list[tuple[str, int]] = []
    for part in spec.split(","):
        part = part.strip()
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{part!r} is not HOST:PORT")
        endpoints.append((host.strip("[]"), int(port)))
    if not endpoints:
        raise ValueError("no etcd endpoint given")
    return endpoints


def make_source(spec: str, *, poll_interval: float = 0.2, etcd_prefix: str = "/pymesh/",
                virtual_ip_range: IpNetwork | None = None) -> Source:
    """A source from its spec: ``file:DIR``, ``etcd:HOST:PORT[,HOST:PORT]``, ``kubernetes`` or
    ``kubernetes:KUBECONFIG``. The file and etcd sources give services virtual IPs from
    ``virtual_ip_range`` (default 10.240.0.0/16); Kubernetes uses ClusterIPs.
    Raises ValueError saying what would be valid."""
    network = virtual_ip_range if virtual_ip_range is not None else parse_range(DEFAULT_RANGE)
    kind, sep, rest = spec.partition(":")
    if sep and kind == "file":
        from .file import FileSource

        directory = Path(rest).expanduser()
        if not directory.is_dir():
            raise ValueError(f"file source: {rest!r} is not a directory")
        return FileSource(directory, poll_interval=poll_interval, virtual_ip_range=network)
    if sep and kind == "etcd":
        from .etcd import EtcdSource

        return EtcdSource(parse_etcd_endpoints(rest), prefix=etcd_prefix, virtual_ip_range=network)
    if kind == "kubernetes":
        from .kubernetes import ApiAccess, KubernetesSource

        if sep and rest:
            return KubernetesSource(ApiAccess.from_kubeconfig(Path(rest).expanduser()), name=f"kubernetes:{rest}")
        return KubernetesSource(ApiAccess.in_cluster())
    raise ValueError(f"unknown source {spec!r}; expected file:DIR, etcd:HOST:PORT[,HOST:PORT], kubernetes "
                     "(in a cluster) or kubernetes:KUBECONFIG")
