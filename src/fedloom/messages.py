"""Typed messages between server and clients.

The server sends a :class:`TrainRequest` or :class:`EvaluateRequest`; a client answers with a
:class:`TrainReply` or :class:`EvaluateReply`. A reply carries either its result or an
:class:`ErrorReply` (a code and a reason), so a failure never crosses a transport as an
exception. Messages are plain frozen dataclasses of numbers, strings and numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fedloom.params import Params

ClientState = dict[str, np.ndarray]
"""What a client keeps between the rounds it takes part in (an error-feedback residual, FedBN's layers):
named arrays. A simulation engine carries it in a request's and a reply's ``state`` to whichever worker
serves the client; a deployed client keeps it in its own files. It never travels on the wire."""


@dataclass(frozen=True)
class ErrorReply:
    """Why a request failed: a stable ``code`` (see ``errors.py``) and a human ``reason``."""

    code: str
    reason: str


@dataclass(frozen=True)
class Update:
    """What one client contributes to a round.

    ``values`` are either the client's new parameters (``kind="params"``) or the change from
    the parameters it was sent (``kind="delta"``). ``weight`` is the number of examples the
    update stands for (FedAvg's n_k). ``metrics`` are per-client numbers such as train loss.
    A compressed delta (``kind="encoded"``) has no values: ``payload`` holds the codec's bytes
    (``compression/codecs.py``), which the server decodes at its door (``server/validation.py``).
    A masked one (``kind="masked"``, secure aggregation) holds the client's weighted delta as integers
    modulo a power of two plus masks (``secagg/``): only the sum of a round's masked updates means anything.
    """

    values: Params
    weight: float
    kind: Literal["delta", "params", "encoded", "masked"] = "delta"
    metrics: dict[str, float] = field(default_factory=dict)
    payload: bytes = b""


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings sent with every train request.

    ``max_steps`` caps local SGD steps (None = no cap); ``mu`` is FedProx's proximal
    coefficient (0 = plain FedAvg). ``seed`` and ``round`` seed the client's local shuffle.
    ``stage`` carries the values the aggregator's client halves need this round (e.g. the clip
    bound), as ``("stage.key", value)`` pairs.
    """

    lr: float = 0.1
    batch_size: int = 10
    local_epochs: int = 1
    max_steps: int | None = None
    mu: float = 0.0
    seed: int = 0
    round: int = 1
    stage: tuple[tuple[str, float], ...] = ()  # what the client halves of the aggregator's stages need


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings for client-side evaluation."""

    batch_size: int = 256


@dataclass(frozen=True)
class Evaluation:
    """Result of evaluating parameters on some data: mean loss and accuracy over ``num_examples``.

    For sequence targets the accuracy counts positions; ``num_examples`` counts samples.
    """

    loss: float
    accuracy: float
    num_examples: int


@dataclass(frozen=True)
class TrainRequest:
    """Train from ``params``. With a compressed downlink, ``payload`` is what travels (the codec's bytes of
    the model) and a client trains from its decoding; ``params`` stays the server's own copy."""

    client_id: int
    round: int
    params: Params
    config: TrainConfig
    payload: bytes = b""
    state: ClientState | None = None  # the client's state, carried by a simulation engine (never on the wire)


@dataclass(frozen=True)
class TrainReply:
    client_id: int
    round: int
    update: Update | None = None
    error: ErrorReply | None = None
    state: ClientState | None = None  # the client's new state, back to a simulation engine (never on the wire)


@dataclass(frozen=True)
class EvaluateRequest:
    client_id: int
    round: int
    params: Params
    config: EvaluateConfig = EvaluateConfig()
    state: ClientState | None = None  # the client's state (FedBN's local layers), carried by a simulation engine


@dataclass(frozen=True)
class EvaluateReply:
    client_id: int
    round: int
    evaluation: Evaluation | None = None
    error: ErrorReply | None = None


@dataclass(frozen=True)
class StepRequest:
    """One exchange of a round that takes several (secure aggregation's key exchange and unmasking).

    ``step`` names the exchange (``"secagg.advertise"``, ...); ``values`` are its named byte strings
    (keys, sealed shares, lists of client ids). The client keeps what it needs for the round's next
    steps in its state, under keys starting ``round/`` (see ``client/state.py``).
    """

    client_id: int
    round: int
    step: str
    values: dict[str, bytes] = field(default_factory=dict)
    state: ClientState | None = None  # carried by a simulation engine (never on the wire)


@dataclass(frozen=True)
class StepReply:
    client_id: int
    round: int
    step: str
    values: dict[str, bytes] = field(default_factory=dict)
    error: ErrorReply | None = None
    state: ClientState | None = None  # back to a simulation engine (never on the wire)


Request = TrainRequest | EvaluateRequest | StepRequest
Reply = TrainReply | EvaluateReply | StepReply


def error_reply(request: Request, code: str, reason: str) -> Reply:
    """The failure reply to ``request``: an ``EvaluateReply`` for an evaluation, a ``StepReply`` for a step, else a
    ``TrainReply``."""
    if isinstance(request, StepRequest):
        return StepReply(request.client_id, request.round, request.step, error=ErrorReply(code, reason))
    kind = EvaluateReply if isinstance(request, EvaluateRequest) else TrainReply
    return kind(request.client_id, request.round, error=ErrorReply(code, reason))
