"""Checks a reply must pass before the server uses it: the one door for the simulation and a deployment.

:func:`check_reply` compares a reply with the request it answers (kind, client, round) and checks
what it reports: an update's shapes, dtypes, finiteness and weight, an evaluation's loss,
accuracy and example count. The deployed server runs it when a reply arrives, so a client is
told at once what was refused and why; the round logic runs it again, so a reply from any
transport is checked before it is aggregated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

from fedloom.compression.updates import NO_COMPRESSION, Compression
from fedloom.errors import InvalidReplyError, InvalidUpdateError, ShapeError
from fedloom.messages import (
    EvaluateReply,
    EvaluateRequest,
    Evaluation,
    Reply,
    Request,
    StepReply,
    StepRequest,
    TrainReply,
    TrainRequest,
    Update,
)
from fedloom.params import Params, ParamSpec, is_finite, subtract

MAX_METRICS = 64  # numbers one update may report


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _count(what: str, value: object, max_examples: float | None, client_id: int, *, positive: bool) -> None:
    """An example count: a finite number, > 0 (``positive``) or >= 0, and at most ``max_examples``."""
    low_ok = _number(value) and (value > 0 if positive else value >= 0)  # type: ignore[operator]
    if not low_ok:
        rule = "a positive number" if positive else "a number >= 0"
        raise InvalidUpdateError(f"{what} must be {rule}, got {value!r}", client_id=client_id, stage="validate")
    if max_examples is not None and value > max_examples:  # type: ignore[operator]
        raise InvalidUpdateError(f"{what} claims {value:g} examples, over the limit of {max_examples:g} per client",
                                 client_id=client_id, stage="validate")


def check_update(update: Update, spec: ParamSpec, client_id: int, max_examples: float | None = None) -> None:
    """Raise :class:`InvalidUpdateError` unless ``update`` is usable against parameters of ``spec``.

    Checked: the kind, the weight (finite, > 0, at most ``max_examples``), the arrays' shapes and
    dtypes, NaN/Inf values, and the reported metrics (at most :data:`MAX_METRICS`, all finite;
    ``examples`` a count like the weight, ``loss_sq`` >= 0).
    """
    stage = "validate"
    if not isinstance(update, Update):
        raise InvalidUpdateError(f"expected an Update, got {type(update).__name__}", client_id=client_id, stage=stage)
    if update.kind not in ("delta", "params", "masked"):
        raise InvalidUpdateError(f"unknown update kind {update.kind!r}", client_id=client_id, stage=stage)
    _count("weight", update.weight, max_examples, client_id, positive=True)
    metrics = update.metrics
    if len(metrics) > MAX_METRICS:
        raise InvalidUpdateError(f"{len(metrics)} metrics reported, over the limit of {MAX_METRICS}",
                                 client_id=client_id, stage=stage)
    bad = sorted(k for k, v in metrics.items() if not _number(v))
    if bad:
        raise InvalidUpdateError(f"metrics {', '.join(map(repr, bad[:5]))} are not finite numbers",
                                 client_id=client_id, stage=stage)
    if "examples" in metrics:
        _count("metric 'examples'", metrics["examples"], max_examples, client_id, positive=False)
    if metrics.get("loss_sq", 0.0) < 0:
        raise InvalidUpdateError(f"metric 'loss_sq' must be >= 0, got {metrics['loss_sq']!r}", client_id=client_id,
                                 stage=stage)
    if update.kind == "masked":  # its length was checked where it was let in (:func:`decoded`)
        return
    try:
        spec.check(update.values, client_id=client_id, stage=stage)
    except ShapeError as exc:
        raise InvalidUpdateError(exc.message, client_id=client_id, stage=stage) from exc
    if not is_finite(update.values):
        raise InvalidUpdateError("update contains NaN or Inf", client_id=client_id, stage=stage)


def check_evaluation(evaluation: Evaluation, client_id: int, max_examples: float | None = None) -> None:
    """Raise :class:`InvalidUpdateError` unless an evaluation's numbers are possible.

    The loss must be finite, the accuracy a fraction in [0, 1], the example count a whole number
    from 0 to ``max_examples``.
    """
    stage = "validate"
    if not isinstance(evaluation, Evaluation):
        raise InvalidUpdateError(f"expected an Evaluation, got {type(evaluation).__name__}", client_id=client_id,
                                 stage=stage)
    if not _number(evaluation.loss):
        raise InvalidUpdateError(f"evaluation loss must be finite, got {evaluation.loss!r}", client_id=client_id,
                                 stage=stage)
    if not (_number(evaluation.accuracy) and 0.0 <= evaluation.accuracy <= 1.0):
        raise InvalidUpdateError(f"evaluation accuracy must be between 0 and 1, got {evaluation.accuracy!r}",
                                 client_id=client_id, stage=stage)
    n = evaluation.num_examples
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    if not isinstance(n, int) or isinstance(n, bool):
        raise InvalidUpdateError(f"evaluation num_examples must be a whole number, got {n!r}", client_id=client_id,
                                 stage=stage)
    _count("evaluation num_examples", n, max_examples, client_id, positive=False)


def _a(cls: type) -> str:
    return f"{'an' if cls.__name__[0] in 'AEIOU' else 'a'} {cls.__name__}"


_ANSWERS = {TrainRequest: TrainReply, EvaluateRequest: EvaluateReply, StepRequest: StepReply}


def decoded(update: Update, spec: ParamSpec, client_id: int, compression: Compression,
            masked_bytes: int = 0) -> Update:
    """A compressed update as the delta it holds; a dense one where the run compresses, or a compressed one where it
    does not, is refused. Decoding checks the payload's lengths, index ranges and bit widths.

    With secure aggregation (``masked_bytes``: the length of a masked update) only masked updates of that
    length are let in, and stay masked; without, a masked update is refused."""
    if masked_bytes or update.kind == "masked":
        if not (masked_bytes and update.kind == "masked"):
            why = (f"this run aggregates securely; a {update.kind!r} update is refused" if masked_bytes
                   else "a masked update, but this run does not aggregate securely")
            raise InvalidUpdateError(why, client_id=client_id, stage="decode")
        if not isinstance(update.payload, bytes) or len(update.payload) != masked_bytes or update.values:
            raise InvalidUpdateError(f"a masked update must hold exactly {masked_bytes} bytes and no arrays",
                                     client_id=client_id, stage="decode")
        return update
    codec = compression.uplink
    if update.kind != "encoded":
        if codec is not None:
            raise InvalidUpdateError(f"this run compresses updates with {codec.name}; a {update.kind!r} update is "
                                     "refused", client_id=client_id, stage="decode")
        return update
    if codec is None:
        raise InvalidUpdateError("a compressed update, but this run has no uplink codec", client_id=client_id,
                                 stage="decode")
    if not isinstance(update.payload, bytes):
        raise InvalidUpdateError("the payload is not bytes", client_id=client_id, stage="decode")
    values = compression.decode_update(update.payload, spec, client_id)
    return Update(values, update.weight, "delta", update.metrics)


def check_reply(request: Request, reply: Reply, max_examples: float | None = None,
                compression: Compression = NO_COMPRESSION, masked_bytes: int = 0) -> Reply:
    """``reply`` as the server uses it (a compressed update decoded); raise unless it is a usable answer to ``request``.

    :class:`InvalidReplyError` when it is the wrong kind of message or addressed to another
    client or round; :class:`InvalidUpdateError` when what it reports is unusable
    (:func:`decoded`, :func:`check_update`, :func:`check_evaluation`). An error reply of the right kind
    passes: a client may say that it failed. ``max_examples`` bounds the example counts a client may claim.
    A step's reply must answer the same step (its values are the protocol's to check); ``masked_bytes``: see
    :func:`decoded`.
    """
    expected = _ANSWERS[type(request)]
    cid = request.client_id
    if type(reply) is not expected:
        raise InvalidReplyError(f"{_a(type(request))} is answered by {_a(expected)}, got {_a(type(reply))}",
                                client_id=cid, stage="validate")
    if reply.client_id != cid or reply.round != request.round:
        raise InvalidReplyError(f"the reply is addressed to client {reply.client_id}, round {reply.round}; "
                                f"the task was client {cid}, round {request.round}", client_id=cid, stage="validate")
    if isinstance(reply, StepReply) and reply.step != request.step:  # type: ignore[union-attr]
        raise InvalidReplyError(f"the reply answers step {reply.step[:64]!r}; the task was {request.step!r}",  # type: ignore[union-attr]
                                client_id=cid, stage="validate")
    if reply.error is not None or isinstance(reply, StepReply):
        return reply
    if isinstance(reply, TrainReply):
        if reply.update is None:
            raise InvalidReplyError("the reply holds neither an update nor an error", client_id=cid, stage="validate")
        spec = ParamSpec.of(request.params)
        update = decoded(reply.update, spec, cid, compression, masked_bytes)
        check_update(update, spec, cid, max_examples)
        return reply if update is reply.update else replace(reply, update=update)
    if reply.evaluation is None:
        raise InvalidReplyError("the reply holds neither an evaluation nor an error", client_id=cid,
                                stage="validate")
    check_evaluation(reply.evaluation, cid, max_examples)
    return reply


def masked_door(compression: Compression, masked_bytes: int) -> Callable[[TrainRequest, TrainReply], TrainReply]:
    """:func:`check_reply` for the train replies of a secure round: masked updates of ``masked_bytes`` only."""
    return lambda request, reply: check_reply(request, reply, compression=compression,  # type: ignore[return-value]
                                              masked_bytes=masked_bytes)


def to_delta(update: Update, sent: Params) -> Params:
    """The change from ``sent`` that a checked update stands for (its values, or values - sent)."""
    return update.values if update.kind == "delta" else subtract(update.values, sent)
