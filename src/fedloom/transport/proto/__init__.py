"""Generated protobuf/gRPC code for fedloom's wire schema (``fedloom.proto``, package ``fedloom.v1``).

Regenerate with the command in this folder's README.md; never edit the ``*_pb2*`` files by hand.
"""
