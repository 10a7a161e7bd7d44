"""The KServe v2 (Open Inference Protocol) data plane's wire format, with no web framework.

``types`` holds the datatypes table and the request/response dataclasses; ``codec`` turns a
request body (JSON, or JSON followed by binary tensors: the binary tensor data extension with
``Inference-Header-Content-Length``, ``binary_data_size`` and ``binary_data_output``) into an
:class:`~service.protocol.types.InferRequest`, and an
:class:`~service.protocol.types.InferResponse` back into a body and its headers. Everything here
is a pure function over bytes and numpy arrays; every malformed request becomes a
:class:`~service.protocol.types.ProtocolError` (400) with one line naming the input.
"""
