"""The pymesh control plane: watches a source of truth (a directory of YAML files, or etcd)
and streams configuration and endpoints to proxies over the ``pymesh.mesh.v1.Discovery``
gRPC service; as the mesh's CA it certifies workload identities (``pymesh.mesh.v1.Identity``).

One concern per module:

- :mod:`pymesh.control.state` — the mesh state and change notification;
- :mod:`pymesh.control.sources` — where the state comes from (``file``, ``etcd``);
- :mod:`pymesh.control.policy` — the mesh-wide authorization a source holds, checked;
- :mod:`pymesh.control.server` — the gRPC Discovery service;
- :mod:`pymesh.control.tls` — TLS on the one port: the control plane's own certificate, the TLS
  front, and who a caller is (its mesh certificate);
- :mod:`pymesh.control.client` — talking to a control plane as a mesh client (``pymesh check``,
  ``register``);
- :mod:`pymesh.control.identity` — the mesh's CA, the gRPC Identity service on the same server;
- :mod:`pymesh.control.metrics` and :mod:`pymesh.control.http` — Prometheus metrics, ``/live``
  and ``/ready`` on the admin port;
- :mod:`pymesh.control.app` — wiring it together (``pymesh control run``);
- :mod:`pymesh.control.cli` — ``pymesh control run|token|ca-bundle`` and ``pymesh check``.
"""
