"""What a client does around its training: the model it trains from, and its update's way out.

Every engine (sequential, vectorized, process, Ray) and the deployed client run the same
:class:`ClientPipeline`, so an update comes out the same wherever the client runs:

1. :meth:`ClientPipeline.prepare`: the model the client trains from: a compressed broadcast is
   decoded; FedBN's local layers (Li et al. 2021, "FedBN: Federated Learning on Non-IID Features
   via Local Batch Normalization") are the client's own, from its state;
2. the client's work trains;
3. :meth:`ClientPipeline.apply`: the update becomes a delta, FedBN's layers go back into the
   client's state (their delta is sent as zero), the client halves of the aggregator's stages
   run in chain order (clipping, local or distributed noise, a simulated attack), and last the uplink
   codec encodes it (with error feedback's residual kept in the state), or, with secure aggregation,
   it is masked (``secagg/client.py``: its fixed-point encoding is the quantization).

The values the stage halves need this round (e.g. the clip bound) arrive in the request
(``TrainConfig.stage``). The client's state arrives in the request and leaves in the reply
(a simulation engine stores it; a deployed client keeps it in its own files).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from fedloom.compression.updates import NO_COMPRESSION, Compression
from fedloom.messages import ClientState, EvaluateRequest, TrainRequest, Update
from fedloom.params import ParamSpec, subtract
from fedloom.stages.base import ClientContext, Noise, SeededNoise, Stage


def local_key(index: int) -> str:
    return f"local/{index}"


@dataclass(frozen=True)
class ClientPipeline:
    """Client halves in chain order, the run's compression, FedBN's local layers, and where noise comes from.

    ``local``: the indices of the parameters a client keeps for itself (FedBN); ``spec``: the
    model's shapes, to decode a compressed broadcast. Noise is seeded in simulation, secure
    deployed; the codecs' random rounding follows the same seed, or the OS when there is none.
    """

    stages: tuple[Stage, ...] = ()
    noise: Noise = field(default_factory=SeededNoise)
    compression: Compression = NO_COMPRESSION
    local: tuple[int, ...] = ()
    spec: ParamSpec | None = None
    secure: bool = False  # secure aggregation: updates leave masked (its round's keys are in the client's state)
    _decoded: list = field(default_factory=list, compare=False, repr=False)  # [payload, params]: one decode a round

    @property
    def stateful(self) -> bool:
        """Whether clients keep state between rounds (engines then carry it)."""
        return (bool(self.local) or self.secure
                or (self.compression.uplink is not None and self.compression.error_feedback))

    def prepare(self, request: TrainRequest | EvaluateRequest) -> TrainRequest | EvaluateRequest:
        """``request`` with the parameters the client works from: a compressed model decoded, its own layers in."""
        params = request.params
        payload = getattr(request, "payload", b"")
        if payload:
            if not (self._decoded and self._decoded[0] is payload):
                assert self.spec is not None, "a compressed broadcast needs the pipeline's model spec"
                self._decoded[:] = [payload, self.compression.decode_model(payload, self.spec)]
            params = self._decoded[1]
        if self.local and request.state:
            params = list(params)
            for i in self.local:
                if local_key(i) in request.state:
                    params[i] = request.state[local_key(i)]
        if params is request.params:
            return request
        return replace(request, params=params, payload=b"") if payload else replace(request, params=params)

    def apply(self, request: TrainRequest, update: Update) -> tuple[Update, ClientState | None]:
        """``update`` after the local layers, every client half and the uplink codec, and the client's new state.

        ``request`` is the prepared one (:meth:`prepare`): its parameters are what the client trained from.
        """
        codec = self.compression.uplink
        # with a compressed broadcast new parameters become a delta here: the server's copy is not what was trained
        if not (self.stages or self.local or codec or self.compression.downlink or self.secure):
            return update, request.state
        state = dict(request.state or {})
        values = update.values if update.kind == "delta" else subtract(update.values, request.params)
        if self.local:
            values = list(values)
            for i in self.local:
                state[local_key(i)] = request.params[i] + values[i]
                values[i] = np.zeros_like(values[i])
        update = Update(values, update.weight, "delta", dict(update.metrics))
        ctx = ClientContext(request.client_id, request.round, request.params, dict(request.config.stage), self.noise)
        for stage in self.stages:
            update = stage.client(update, ctx)
        seed = getattr(self.noise, "seed", None)
        rng = np.random.default_rng(None if seed is None else [seed, request.round, request.client_id, 7])
        if self.secure:
            from fedloom.secagg.client import mask_update

            return mask_update(request, update, state, rng)
        if codec is not None:
            payload, state, m = self.compression.encode_update(update.values, state, rng)
            update = Update([], update.weight, "encoded", {**update.metrics, **m}, payload)
        return update, state or None


NO_STAGES = ClientPipeline()

