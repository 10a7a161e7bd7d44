"""Serving: the dynamic batcher, the registry of loaded model versions, and the KServe v2 data plane.

No web framework here: the HTTP routes live in ``service.http`` and call into this package.
"""
