"""The mesh's certificate authority: proxies exchange a proof of their workload identity and
a CSR for a short-lived certificate naming their SPIFFE id (``pymesh.mesh.v1.Identity``).

One concern per module:

- :mod:`pymesh.control.identity.spiffe` — SPIFFE ids and identity patterns, parsed strictly;
- :mod:`pymesh.control.identity.ca` — the trust anchor and the issuer (supplied or generated,
  the issuer followed on disk), and signing;
- :mod:`pymesh.control.identity.proof` — per-workload tokens, or Kubernetes TokenReview;
- :mod:`pymesh.control.identity.limits` — rate limits per identity and overall;
- :mod:`pymesh.control.identity.files` — the state directory (private files, one lock);
- :mod:`pymesh.control.identity.service` — the gRPC service.
"""
