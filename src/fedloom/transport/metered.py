"""Counting the bytes a run's training puts on the wire, in simulation and deployment alike."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedloom.messages import Reply, Request, StepReply, StepRequest, TrainReply, TrainRequest
from fedloom.transport.base import Transport
from fedloom.transport.wire import message_size


class Metered:
    """A transport that counts the bytes of the train requests it sends and the updates it gets back (and a secure
    round's step messages, both ways), each as the gRPC deployment encodes it (``wire.message_size``, chunk framing
    aside): the traffic of a deployed run and of a simulation without a simulated clock (whose devices count their
    own)."""

    engine: Transport

    def __init__(self, engine: Transport, bytes_down: int = 0, bytes_up: int = 0):
        self.engine = engine
        self.bytes_down, self.bytes_up = bytes_down, bytes_up

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def exchange(self, requests: Sequence[Request]) -> list[Reply]:
        replies = self.engine.exchange(requests)
        self.bytes_down += sum(message_size(r) for r in requests if isinstance(r, TrainRequest | StepRequest))
        self.bytes_up += sum(message_size(r) for r in replies if (isinstance(r, TrainReply) and r.update is not None)
                             or (isinstance(r, StepReply) and r.error is None))
        return replies

    def close(self) -> None:
        self.engine.close()


def traffic_columns(down: int, up: int, before: list[int]) -> dict[str, int]:
    """A round's ``bytes_down``/``bytes_up`` and the totals, from the totals now and at the last row (``before``,
    updated in place)."""
    row = {"bytes_down": down - before[0], "bytes_up": up - before[1], "total_bytes_down": down,
           "total_bytes_up": up}
    before[:] = [down, up]
    return row
