"""Checks an update must pass before it is aggregated."""

from __future__ import annotations

import math

from fedloom.errors import InvalidUpdateError, ShapeError
from fedloom.messages import Update
from fedloom.params import Params, ParamSpec, is_finite, subtract


def as_delta(update: Update, sent: Params, spec: ParamSpec, client_id: int) -> Params:
    """The update's change from ``sent``, after checking it is usable.

    Raises :class:`InvalidUpdateError` for a wrong kind, a non-positive or non-finite weight,
    arrays of the wrong shape or dtype, or NaN/Inf values.
    """
    stage = "validate"
    if not isinstance(update, Update):
        raise InvalidUpdateError(f"expected an Update, got {type(update).__name__}", client_id=client_id, stage=stage)
    if update.kind not in ("delta", "params"):
        raise InvalidUpdateError(f"unknown update kind {update.kind!r}", client_id=client_id, stage=stage)
    if not (isinstance(update.weight, int | float) and math.isfinite(update.weight) and update.weight > 0):
        raise InvalidUpdateError(f"weight must be a positive number, got {update.weight!r}", client_id=client_id,
                                 stage=stage)
    try:
        spec.check(update.values, client_id=client_id, stage=stage)
    except ShapeError as exc:
        raise InvalidUpdateError(exc.message, client_id=client_id, stage=stage) from exc
    if not is_finite(update.values):
        raise InvalidUpdateError("update contains NaN or Inf", client_id=client_id, stage=stage)
    return update.values if update.kind == "delta" else subtract(update.values, sent)
