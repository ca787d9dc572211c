"""A server state as named arrays, and back: what a checkpoint holds beyond the model.

Names: ``optimizer/{key}/{i}`` (the server optimizer), ``aggregation/{i}/{key}`` (each stage of the
aggregator) and ``selection/{field}`` (the selector's state, when it has one). Restoring takes a
freshly initialised state as the template, so every array goes back to the type it came from; a
checkpoint that does not fit the template is refused by its caller.
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from typing import Any

import numpy as np

from fedloom.params import Params
from fedloom.server.sync import ServerState


def state_names(state: ServerState, selection: bool = False) -> list[str]:
    """The names of :func:`state_arrays`, in the same order."""
    names = ([f"optimizer/{key}/{i}" for key in sorted(state.opt_state) for i in range(len(state.opt_state[key]))]
             + [f"aggregation/{i}/{key}" for i, stage in enumerate(state.aggregation) for key in sorted(stage)])
    return names + (list(_selection(state.selection)) if selection else [])


def state_arrays(state: ServerState, selection: bool = False) -> Params:
    """The optimizer's and the aggregator's state (and with ``selection`` the selector's) as arrays."""
    arrays = ([a for k in sorted(state.opt_state) for a in state.opt_state[k]]
              + [np.asarray(stage[key]) for stage in state.aggregation for key in sorted(stage)])
    return arrays + (list(_selection(state.selection).values()) if selection else [])


def restore_state(fresh: ServerState, round: int, params: Params, rest: Params,
                  selection: bool = False) -> ServerState:
    """``fresh`` with the model, round and the :func:`state_arrays` of a checkpoint (in their order)."""
    it = iter(rest)
    opt = {k: [next(it) for _ in fresh.opt_state[k]] for k in sorted(fresh.opt_state)}
    aggregation = tuple({key: next(it) for key in sorted(stage)} for stage in fresh.aggregation)
    chosen = fresh.selection
    if selection:
        chosen = _unselection(fresh.selection, {k: next(it) for k in _selection(fresh.selection)})
    return replace(fresh, round=round, params=list(params), opt_state=opt, aggregation=aggregation, selection=chosen)


def mismatch(saved_names: list[str], arrays: Params, names: list[str], like: Params, where: str,
             ragged: frozenset[str] = frozenset()) -> str:
    """Why a checkpoint's named arrays do not fit ``names`` and ``like`` (empty when they do).

    A name in ``ragged`` (a history, a set) may differ in length but not in kind or dimensions.
    """
    if saved_names != names:
        return f"it holds {_few(saved_names)}; {where} has {_few(names)}"
    for n, a, b in zip(saved_names, arrays, like):
        if a.dtype != b.dtype or (a.ndim != b.ndim if n in ragged else a.shape != b.shape):
            return f"{n} is {a.dtype}{list(a.shape)} in it, {b.dtype}{list(b.shape)} in {where}"
    return ""


def ragged_selection(state: ServerState) -> frozenset[str]:
    """The selector's fields whose length grows with the run (its history and sets)."""
    return frozenset(n for n, a in _selection(state.selection).items()
                     if a.ndim == 1 and not isinstance(getattr(state.selection, n[len("selection/"):], None),
                                                       np.ndarray))


def _few(names: list[str]) -> str:
    more = f" and {len(names) - 4} more" if len(names) > 4 else ""
    return f"{len(names)} arrays ({', '.join(names[:4])}{more})"


def _selection(state: Any) -> dict[str, np.ndarray]:
    """A selector's state (None, a number, or a dataclass of arrays, numbers, tuples and sets) as named arrays."""
    if state is None:
        return {}
    if not dataclasses.is_dataclass(state):
        return {"selection/value": np.asarray(state)}
    out = {}
    for f in dataclasses.fields(state):
        value = getattr(state, f.name)
        if isinstance(value, frozenset):
            value = sorted(value)
        out[f"selection/{f.name}"] = np.asarray(value, dtype=np.int64 if isinstance(value, list) else None)
    return out


def _unselection(fresh: Any, arrays: dict[str, np.ndarray]) -> Any:
    """The inverse of :func:`_selection`, with ``fresh`` as the template of types."""
    if fresh is None:
        return None
    if not dataclasses.is_dataclass(fresh):
        return type(fresh)(arrays["selection/value"].item())
    values = {}
    for f in dataclasses.fields(fresh):
        like, a = getattr(fresh, f.name), arrays[f"selection/{f.name}"]
        if isinstance(like, np.ndarray):
            a = a.astype(like.dtype, copy=True)
            a.flags.writeable = like.flags.writeable
            values[f.name] = a
        elif isinstance(like, frozenset):
            values[f.name] = frozenset(int(v) for v in a)
        elif isinstance(like, tuple):
            values[f.name] = tuple(float(v) for v in a)
        else:
            values[f.name] = type(like)(a.item())
    return replace(fresh, **values)
