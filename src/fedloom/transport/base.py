"""The transport interface: how typed messages reach the clients and their replies come back.

A transport knows nothing of learning. ``exchange(requests)`` delivers each request to the client
it names and returns one reply per request, in order; a client that fails, times out or is lost
answers with an error reply, never an exception. Implementations: the in-process transport and
the simulation engines built on it (``simulation/``), and the gRPC transport of a deployment
(``transport/dispatch.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from fedloom.messages import Reply, Request


class Transport(Protocol):
    def exchange(self, requests: Sequence[Request]) -> list[Reply]: ...

    def close(self) -> None: ...
