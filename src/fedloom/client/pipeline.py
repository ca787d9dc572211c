"""The client halves of the aggregator's stages, run on each update before it leaves the client.

Every engine (sequential, vectorized, process, Ray) and the deployed client run the same
:class:`ClientPipeline` on what the client work returns, so a stage such as clipping gives the
same update wherever the client runs. The values the halves need this round (e.g. the clip
bound) arrive in the request (``TrainConfig.stage``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedloom.messages import TrainRequest, Update
from fedloom.params import subtract
from fedloom.stages.base import ClientContext, Noise, SeededNoise, Stage


@dataclass(frozen=True)
class ClientPipeline:
    """Client halves in chain order, and where their noise comes from (seeded in simulation, secure deployed)."""

    stages: tuple[Stage, ...] = ()
    noise: Noise = field(default_factory=SeededNoise)

    def apply(self, request: TrainRequest, update: Update) -> Update:
        """``update`` after every client half; a ``params`` update becomes a delta first."""
        if not self.stages:
            return update
        if update.kind == "params":
            update = Update(subtract(update.values, request.params), update.weight, "delta", dict(update.metrics))
        ctx = ClientContext(request.client_id, request.round, request.params, dict(request.config.stage), self.noise)
        for stage in self.stages:
            update = stage.client(update, ctx)
        return update


NO_STAGES = ClientPipeline()
