"""The in-process transport: delivers requests to simulated clients in this process."""

from __future__ import annotations

from collections.abc import Sequence

from fedloom.client.pipeline import NO_STAGES, ClientPipeline
from fedloom.client.work import ClientWork, handle
from fedloom.data.dataset import FederatedDataset
from fedloom.messages import Reply, Request, error_reply


class InProcessTransport:
    """Runs each request against the addressed client's data, one after another.

    It knows nothing of learning: it routes a request to ``handle(request, work, data[id], pipeline)``
    and returns the replies in request order. A request for an unknown client gets an error reply.
    """

    def __init__(self, work: ClientWork, data: FederatedDataset, pipeline: ClientPipeline = NO_STAGES):
        self.work = work
        self.data = data
        self.pipeline = pipeline

    def exchange(self, requests: Sequence[Request]) -> list[Reply]:
        return [self._one(r) for r in requests]

    def close(self) -> None:
        """Nothing to release; present so every engine has the same interface."""

    def _one(self, request: Request) -> Reply:
        if not 0 <= request.client_id < len(self.data):
            return error_reply(request, "unknown_client", f"no client {request.client_id}")
        return handle(request, self.work, self.data[request.client_id], self.pipeline)
