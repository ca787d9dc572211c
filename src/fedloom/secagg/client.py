"""Secure aggregation's round, client side: each step a pure function of the request and the client's state.

The steps are those of ``protocol.py``. What a client must remember between the steps of a round
(its private keys, its self-mask seed, the shares it holds for its neighbours) is kept in its state
under keys starting ``round/``: a simulation engine carries it to whichever worker serves the next
step, a deployed client keeps it in its own folder. Nothing is kept in memory, so a client that
restarts mid-round and kept its state goes on; one that lost it answers with an error and counts
as dropped. After the unmasking step the round's state is wiped: no second unmasking can be
answered, so the server never gets both kinds of shares of one client from it.

A request of an unknown step, for another round, out of order or malformed gets an error reply
with the reason; nothing raises.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

import numpy as np

from fedloom.messages import ClientState, ErrorReply, StepReply, StepRequest, TrainRequest, Update
from fedloom.secagg.primitives import (
    KEY_BYTES,
    SHARE_BYTES,
    SecAggError,
    add_mod,
    agree,
    associated_data,
    expand,
    generate_keypair,
    pack_words,
    private_from_bytes,
    private_to_bytes,
    seal,
    share,
    sub_mod,
    to_field,
)
from fedloom.secagg.protocol import (
    ADVERTISE,
    COLLECT,
    SEALED_BYTES,
    SHARE,
    UNMASK,
    Plan,
    encrypt_info,
    ids_from_bytes,
    ids_to_bytes,
    mask_info,
    open_share,
    pair_sign,
)

PREFIX = "round/"  # the keys of a client's state that last one round
_PLAN = ("clients", "graph_seed", "numbers", "dim")


def _bytes(state: ClientState, key: str) -> bytes:
    return np.asarray(state[PREFIX + key], np.uint8).tobytes()


def _put(state: ClientState, **values: bytes) -> None:
    for k, v in values.items():
        state[PREFIX + k] = np.frombuffer(v, np.uint8).copy()


def lasting(state: ClientState | None) -> ClientState:
    """The part of a client's state that outlives a round (without the round's secrets)."""
    return {k: v for k, v in (state or {}).items() if not k.startswith(PREFIX)}


def _round_state(state: ClientState, rnd: int, needs: str, step: str) -> Plan:
    """The round's plan from the state, after checking that the state is this round's and has ``needs``."""
    number = state.get(PREFIX + "number")
    if number is None or int(number) != rnd:
        raise SecAggError(f"{step} of round {rnd}: this client holds no secure-aggregation keys of that round "
                          "(a client that lost its state mid-round counts as dropped)")
    if PREFIX + needs not in state:
        raise SecAggError(f"{step} of round {rnd} came out of order (the step before it was not done)")
    return Plan.from_values({k: _bytes(state, "plan." + k) for k in _PLAN})


def _advertise(request: StepRequest, state: ClientState) -> dict[str, bytes]:
    plan = Plan.from_values(request.values)
    if plan.round != request.round:
        raise SecAggError(f"the plan is for round {plan.round}, the request for round {request.round}")
    if request.client_id not in plan.clients:
        raise SecAggError(f"the plan of round {plan.round} does not name client {request.client_id}")
    for k in [k for k in state if k.startswith(PREFIX)]:
        del state[k]  # a new round: whatever an unfinished one left is dropped
    c_sk, c_pk = generate_keypair()
    s_sk, s_pk = generate_keypair()
    state[PREFIX + "number"] = np.array(request.round, np.int64)
    _put(state, c_sk=private_to_bytes(c_sk), s_sk=private_to_bytes(s_sk),
         **{"plan." + k: request.values[k] for k in _PLAN})
    return {"c_pk": c_pk, "s_pk": s_pk}


def _share(request: StepRequest, state: ClientState) -> dict[str, bytes]:
    plan = _round_state(state, request.round, "s_sk", SHARE)
    if PREFIX + "b" in state:
        raise SecAggError(f"round {request.round}'s keys were already shared")
    u = request.client_id
    peers = ids_from_bytes(request.values.get("peers", b""), "peers")
    if not set(peers) <= plan.graph()[u]:
        raise SecAggError("the peers sent are not all this client's neighbours in the round's graph")
    if len(peers) + 1 < plan.threshold:
        raise SecAggError(f"{len(peers)} neighbours advertised keys: with this client, fewer than the threshold "
                          f"{plan.threshold}")
    keys = request.values.get("keys", b"")
    if len(keys) != 2 * KEY_BYTES * len(peers):
        raise SecAggError(f"expected {len(peers)} pairs of public keys, got {len(keys)} bytes")
    b = os.urandom(KEY_BYTES)
    s_sk = _bytes(state, "s_sk")
    s_shares, b_shares = share(s_sk, plan.threshold, [*peers, u]), share(b, plan.threshold, [*peers, u])
    c_sk = private_from_bytes(_bytes(state, "c_sk"))
    sealed = []
    for i, v in enumerate(peers):
        key = agree(c_sk, keys[2 * KEY_BYTES * i:2 * KEY_BYTES * i + KEY_BYTES], encrypt_info(request.round))
        plain = struct.pack(">QQ", u, v) + s_shares[v] + b_shares[v]
        sealed.append(seal(key, plain, associated_data(u, v, request.round, b"share")))
    _put(state, b=b, peers=ids_to_bytes(peers), peer_keys=keys, own_b=b_shares[u])  # its own share of s^SK is never
    # revealed (the server asks for it only of a dropped client), so it is not kept
    return {"to": ids_to_bytes(peers), "sealed": b"".join(sealed)}


def _collect(request: StepRequest, state: ClientState) -> dict[str, bytes]:
    plan = _round_state(state, request.round, "b", COLLECT)
    if PREFIX + "from" in state:
        raise SecAggError(f"round {request.round}'s shares were already collected")
    u = request.client_id
    senders = ids_from_bytes(request.values.get("from", b""), "from")
    peers = ids_from_bytes(_bytes(state, "peers"), "peers")
    if not set(senders) <= set(peers):
        raise SecAggError("shares arrived from clients that are not this client's peers")
    if len(senders) + 1 < plan.threshold:
        raise SecAggError(f"{len(senders)} neighbours shared their keys: with this client, fewer than the threshold "
                          f"{plan.threshold}")
    blob = request.values.get("sealed", b"")
    if len(blob) != SEALED_BYTES * len(senders):
        raise SecAggError(f"expected {len(senders)} sealed shares of {SEALED_BYTES} bytes, got {len(blob)} bytes")
    c_sk, keys = _bytes(state, "c_sk"), _bytes(state, "peer_keys")
    held_s, held_b = [], []
    for i, v in enumerate(senders):
        j = peers.index(v)
        s_part, b_part = open_share(c_sk, keys[2 * KEY_BYTES * j:2 * KEY_BYTES * j + KEY_BYTES],
                                    blob[SEALED_BYTES * i:SEALED_BYTES * (i + 1)], v, u, request.round)
        held_s.append(s_part)
        held_b.append(b_part)
    _put(state, **{"from": ids_to_bytes(senders)}, held_s=b"".join(held_s), held_b=b"".join(held_b))
    return {}


def _unmask(request: StepRequest, state: ClientState) -> dict[str, bytes]:
    plan = _round_state(state, request.round, "masked", UNMASK)
    survivors = set(ids_from_bytes(request.values.get("survivors", b""), "survivors"))
    if request.client_id not in survivors or not survivors <= set(plan.clients):
        raise SecAggError("the survivors must include this client and be clients of the round")
    if len(survivors) < plan.threshold:
        raise SecAggError(f"{len(survivors)} survivors, fewer than the threshold {plan.threshold}: nothing is revealed")
    senders = ids_from_bytes(_bytes(state, "from"), "from")
    held_s, held_b = _bytes(state, "held_s"), _bytes(state, "held_b")
    b_ids = [v for v in senders if v in survivors]
    s_ids = [v for v in senders if v not in survivors]

    def pick(held: bytes, ids: list[int]) -> bytes:
        return b"".join(held[SHARE_BYTES * senders.index(v):SHARE_BYTES * (senders.index(v) + 1)] for v in ids)

    values = {"b_ids": ids_to_bytes([*b_ids, request.client_id]),
              "b_shares": pick(held_b, b_ids) + _bytes(state, "own_b"),
              "s_ids": ids_to_bytes(s_ids), "s_shares": pick(held_s, s_ids)}
    for k in [k for k in state if k.startswith(PREFIX)]:
        del state[k]  # the round is over for this client: no second unmasking
    return values


_STEPS: dict[str, Callable[[StepRequest, ClientState], dict[str, bytes]]] = {
    ADVERTISE: _advertise, SHARE: _share, COLLECT: _collect, UNMASK: _unmask}


def client_step(request: StepRequest) -> StepReply:
    """The reply to one step of a secure round, with the client's new state; an error reply saying why otherwise."""
    handler = _STEPS.get(request.step)
    if handler is None:
        return StepReply(request.client_id, request.round, request.step, state=request.state,
                         error=ErrorReply("unknown_step", f"this client knows no step {request.step[:64]!r}"))
    state = dict(request.state or {})
    try:
        values = handler(request, state)
    except (SecAggError, ValueError, KeyError) as exc:
        return StepReply(request.client_id, request.round, request.step, state=request.state,
                         error=ErrorReply("secagg", str(exc) if not isinstance(exc, KeyError) else f"missing {exc}"))
    return StepReply(request.client_id, request.round, request.step, values, state=state)


def mask_update(request: TrainRequest, update: Update, state: ClientState,
                rng: np.random.Generator | None) -> tuple[Update, ClientState]:
    """``update`` (a delta, after the client halves) as this round's masked input, and the state that records it.

    The vector is [w * delta, w * bound]: w is 1, or min(examples, cap) / cap with a weight cap; it is
    encoded in fixed point (``primitives.to_field``, stochastic rounding with ``rng``), and the
    self mask PRG(b_u) and each pairwise mask +-PRG(s_uv) with the neighbours whose shares it holds are
    added modulo 2**bits. The metrics (loss, examples) travel in the clear.
    """
    plan = _round_state(state, request.round, "from", "training")
    if PREFIX + "masked" in state:
        raise SecAggError(f"round {request.round}'s masked input was already sent")
    values = np.concatenate([np.ravel(a).astype(np.float64) for a in update.values] + [np.zeros(1)])
    if values.size != plan.dim:
        raise SecAggError(f"the update has {values.size - 1} values; the round's plan is for {plan.dim - 1}")
    examples = float(update.metrics.get("examples", update.weight))
    w = 1.0 if not plan.weight_cap else min(examples, plan.weight_cap) / plan.weight_cap
    values *= w
    values[-1] = w * plan.bound
    bits, u = plan.bits, request.client_id
    words = to_field(values, plan.bound, plan.levels, bits, rng)
    add_mod(words, expand(_bytes(state, "b"), plan.dim, bits, reuse=True), bits, out=words)
    s_sk = private_from_bytes(_bytes(state, "s_sk"))
    peers, keys = ids_from_bytes(_bytes(state, "peers"), "peers"), _bytes(state, "peer_keys")
    for v in ids_from_bytes(_bytes(state, "from"), "from"):
        j = peers.index(v)
        s_pk = keys[2 * KEY_BYTES * j + KEY_BYTES:2 * KEY_BYTES * (j + 1)]
        mask = expand(agree(s_sk, s_pk, mask_info(request.round, u, v)), plan.dim, bits, reuse=True)
        (add_mod if pair_sign(u, v) > 0 else sub_mod)(words, mask, bits, out=words)
    state[PREFIX + "masked"] = np.array(1, np.int64)
    metrics = {k: v for k, v in update.metrics.items() if k in ("loss", "loss_sq", "examples")}
    return Update([], 1.0, "masked", metrics, pack_words(words, bits)), state
