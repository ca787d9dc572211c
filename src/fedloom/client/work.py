"""The client side's one interface, and the handler that turns requests into replies."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Protocol

from fedloom.client.pipeline import NO_STAGES, ClientPipeline
from fedloom.data.dataset import ClientDataset
from fedloom.errors import FedloomError
from fedloom.messages import (
    ErrorReply,
    EvaluateConfig,
    EvaluateReply,
    EvaluateRequest,
    Evaluation,
    Reply,
    Request,
    StepRequest,
    TrainConfig,
    TrainReply,
    TrainRequest,
    Update,
)
from fedloom.params import Params


class ClientWork(Protocol):
    """What a client does with its own data: the user's ``client_update`` and evaluation.

    Both methods are pure with respect to the network: they see the parameters the server
    sent, the client's local data and the request's settings, and return a value.
    """

    def train(self, params: Params, data: ClientDataset, config: TrainConfig) -> Update: ...

    def evaluate(self, params: Params, data: ClientDataset, config: EvaluateConfig) -> Evaluation: ...


def failure(exc: BaseException, frames: int = 3) -> str:
    """``Type: message (at file.py:12 in fn <- ...)``: an exception and the last ``frames`` frames it came from,
    outside torch and numpy where there are such frames (the user's code, not the library's)."""
    stack = traceback.extract_tb(exc.__traceback__)
    own = [f for f in stack if not any(lib in Path(f.filename).parts for lib in ("torch", "numpy"))]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in reversed((own or stack)[-frames:]))
    text = f"{type(exc).__name__}: {exc}"
    return (text[:400] + (f" (at {where})" if where else ""))[:800]


def _error(exc: BaseException) -> ErrorReply:
    if isinstance(exc, FedloomError):
        return ErrorReply(exc.code, str(exc))
    return ErrorReply("client_failed", failure(exc))


def handle(request: Request, work: ClientWork, data: ClientDataset, pipeline: ClientPipeline = NO_STAGES) -> Reply:
    """Run one request against a client's work and data, with ``pipeline`` around a training (see
    ``client/pipeline.py``); any failure becomes an error reply. A train reply carries the client's new state.
    A step of a round of several exchanges (secure aggregation, ``secagg/client.py``) needs neither work nor data."""
    if isinstance(request, StepRequest):
        from fedloom.secagg.client import client_step

        return client_step(request)
    if isinstance(request, TrainRequest):
        try:
            request = pipeline.prepare(request)
            update, state = pipeline.apply(request, work.train(request.params, data, request.config))
            return TrainReply(request.client_id, request.round, update=update, state=state)
        except Exception as exc:  # noqa: BLE001 - a client failure must not stop the round
            return TrainReply(request.client_id, request.round, error=_error(exc), state=request.state)
    if isinstance(request, EvaluateRequest):
        try:
            request = pipeline.prepare(request)
            evaluation = work.evaluate(request.params, data, request.config)
            return EvaluateReply(request.client_id, request.round, evaluation=evaluation)
        except Exception as exc:  # noqa: BLE001
            return EvaluateReply(request.client_id, request.round, error=_error(exc))
    raise TypeError(f"not a request: {type(request).__name__}")
