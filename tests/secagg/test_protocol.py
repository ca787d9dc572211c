"""Secure aggregation's round over an in-process transport: the server unmasks exactly the sum of the survivors'
updates, sees nothing but noise of any one of them, survives dropouts at every step while t shares remain, aborts
below that with nothing revealed, and refuses malformed, misdirected, replayed and out-of-order messages."""

import math
import struct
from dataclasses import replace

import numpy as np
import pytest

from fedloom.client.pipeline import ClientPipeline
from fedloom.client.state import StateFiles
from fedloom.config import load_config
from fedloom.data.dataset import ClientDataset, FederatedDataset
from fedloom.messages import (
    StepReply,
    StepRequest,
    TrainConfig,
    TrainReply,
    TrainRequest,
    Update,
    error_reply,
)
from fedloom.params import flatten
from fedloom.rounds import Immediate, drive, train_round
from fedloom.secagg.client import client_step
from fedloom.secagg.primitives import SHARE_BYTES, unpack_words
from fedloom.secagg.protocol import (
    ADVERTISE,
    COLLECT,
    SEALED_BYTES,
    SHARE,
    STEPS,
    UNMASK,
    Plan,
    SecureAggregation,
    SecureSum,
    ids_from_bytes,
    ids_to_bytes,
)
from fedloom.server import SyncServer
from fedloom.server.validation import check_reply
from fedloom.simulation.engines import WithClientState
from fedloom.stages.base import SeededNoise
from fedloom.transport.inprocess import InProcessTransport

D = 1000  # values of the model; a masked vector has one more, the weight
SEED = 7  # the clients' noise seed: their stochastic rounding
GRID = 2.0**-20  # a fixed-point step that float32 values hold exactly: every value encodes without rounding
TRAIN = "train"  # the name the transport wrappers below give the training exchange


class TableWork:
    """Each client's "training" returns its row of a table as its delta (float32), so every sum is known."""

    def __init__(self, deltas: np.ndarray):
        self.deltas = deltas.astype(np.float32)

    def train(self, params, data, config) -> Update:
        return Update([self.deltas[data.client_id].copy()], 1.0, "delta", {"loss": 0.5, "examples": 10.0})

    def evaluate(self, params, data, config):
        raise NotImplementedError


def federation(n: int) -> FederatedDataset:
    x, y = np.zeros((1, 1), np.float32), np.zeros(1, np.int64)
    return FederatedDataset("table", [ClientDataset(i, x, y, x, y) for i in range(n)], 2)


def step_of(request) -> str:
    return request.step if isinstance(request, StepRequest) else TRAIN


class Scripted:
    """The in-process engine (clients keeping their round's secrets in state files) behind a relay that misbehaves
    on cue: ``drop`` maps a step to the clients that never answer it (an error reply, as a transport reports a lost
    client; the request never reaches them); ``edit_request(request)`` and ``edit_replies(requests, replies)`` change
    what travels; ``before[step](self)`` runs just before that step's exchange. Every exchange is logged."""

    def __init__(self, deltas: np.ndarray, drop=None, edit_request=None, edit_replies=None, before=None):
        n = len(deltas)
        pipeline = ClientPipeline(noise=SeededNoise(SEED), secure=True)
        self.engine = WithClientState(InProcessTransport(TableWork(deltas), federation(n), pipeline),
                                      StateFiles.temporary())
        self.drop = drop or {}
        self.edit_request = edit_request or (lambda q: q)
        self.edit_replies = edit_replies or (lambda qs, rs: rs)
        self.before = before or {}
        self.log: list[tuple[str, list, list]] = []  # (step, requests as sent, replies as returned)

    def exchange(self, requests):
        step = step_of(requests[0])
        if step in self.before:
            self.before[step](self)
        requests = [self.edit_request(q) for q in requests]
        gone = self.drop.get(step, set())
        live = [q for q in requests if q.client_id not in gone]
        answers = dict(zip([q.client_id for q in live], self.engine.exchange(live)))
        replies = [answers[q.client_id] if q.client_id in answers else error_reply(q, "dropped", "the client left")
                   for q in requests]
        replies = self.edit_replies(requests, replies)
        self.log.append((step, requests, replies))
        return replies

    def sent(self, step: str, rnd: int | None = None) -> list:
        """The requests of ``step`` (of round ``rnd``), over every exchange."""
        return [q for s, qs, _ in self.log if s == step for q in qs if rnd is None or q.round == rnd]

    def answers(self, step: str, rnd: int | None = None) -> dict:
        """The replies to ``step`` (of round ``rnd``) by client."""
        return {r.client_id: r for s, qs, rs in self.log if s == step
                for q, r in zip(qs, rs) if rnd is None or q.round == rnd}

    def ask(self, request):
        """One request straight to the clients, past the relay's script (a server that misbehaves)."""
        return self.engine.exchange([request])[0]


def grid_settings(n: int, mode: str = "secagg", **kw) -> SecureAggregation:
    """32-bit words with step GRID (levels 2**20 per unit bound): table values on the grid encode exactly."""
    return SecureAggregation(mode, 32, 2**20, 1.0, n, seed=0, **kw)


def grid_table(n: int, d: int = D, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deltas on the grid and their integer levels (at most 2**19 in size, so float32 holds them exactly)."""
    levels = np.random.default_rng(seed).integers(-(2**19), 2**19 + 1, (n, d))
    return levels * GRID, levels


def secure_round(settings: SecureAggregation, transport, n: int, d: int = D, rnd: int = 1) -> SecureSum:
    """One round asking clients 0..n-1, the server's door checking the masked replies as ``SyncServer`` does."""
    params = [np.zeros(d, np.float32)]
    requests = [TrainRequest(c, rnd, params, TrainConfig(round=rnd)) for c in range(n)]
    masked = settings.payload_bytes(d)
    rounds = settings.round(rnd, requests, d + 1, lambda q, r: check_reply(q, r, masked_bytes=masked))
    return drive(rounds, transport, Immediate())


def assert_exact_sum(out: SecureSum, levels: np.ndarray, clients: list[int]) -> None:
    """The unmasked total, in steps, is the integer sum of the clients' levels, then 2**20 (the weight) each."""
    assert out.problem == "" and out.total is not None, out.problem
    assert out.survivors == sorted(clients)
    in_steps = out.total / GRID
    assert np.array_equal(in_steps[:-1], levels[sorted(clients)].sum(axis=0))
    assert in_steps[-1] == 2**20 * len(clients)


# -------------------------------------------------------------------------------------------- the sum


@pytest.mark.parametrize("mode, n", [("secagg", 8), ("secagg+", 12)])
def test_the_unmasked_sum_is_the_plain_sum_exactly_in_fixed_point_integers(mode, n):
    deltas, levels = grid_table(n)
    transport = Scripted(deltas)
    out = secure_round(grid_settings(n, mode), transport, n)
    assert_exact_sum(out, levels, list(range(n)))
    assert out.rejected == {}
    assert out.measurements["secagg.survivors"] == n and out.measurements["secagg.dropped"] == 0
    assert out.measurements["secagg.masks"] == n  # no dropout: only the self masks are removed
    assert set(out.metrics) == set(range(n)) and out.metrics[0]["loss"] == 0.5  # metrics travel in the clear
    # every masked input the server held was the fixed-point width, nothing else
    payloads = [r.update.payload for r in transport.answers(TRAIN).values()]
    assert all(r.update.kind == "masked" and r.update.values == [] for r in transport.answers(TRAIN).values())
    assert {len(p) for p in payloads} == {(D + 1) * 4}


def test_the_mean_of_the_unmasked_sum_is_the_plain_mean_within_one_fixed_point_step():
    n = 10
    deltas = np.random.default_rng(1).uniform(-1, 1, (n, D)).astype(np.float32)
    settings = SecureAggregation.for_run("secagg", 32, 0, 1.0, n, seed=0)
    out = secure_round(settings, Scripted(deltas), n)
    assert out.problem == ""
    step = settings.bound / settings.levels
    weight = out.total[-1] / settings.bound
    assert weight == n  # every update weighs 1: its weight coordinate is exactly the bound
    error = np.abs(out.total[:-1] / weight - deltas.astype(np.float64).mean(axis=0))
    assert error.max() < step  # each client's stochastic rounding is off by less than a step
    assert error.max() > 0  # and it did round: the test would see a scaled or shifted sum
    # a second round of the same updates rounds afresh and unmasks to the same mean within the step
    again = secure_round(settings, Scripted(deltas), n, rnd=2)
    assert np.abs(again.total - out.total).max() < 2 * n * step


# ------------------------------------------------------------------------------ what the server sees


def chi_square_bytes(data: bytes) -> float:
    counts = np.bincount(np.frombuffer(data, np.uint8), minlength=256)
    expected = len(data) / 256
    return float(((counts - expected) ** 2 / expected).sum())


def chi_square_limit(df: int = 255, z: float = 4.753) -> float:
    """The chi-square quantile of upper tail ~1e-6 (z standard deviations; Wilson-Hilferty): about 377 for 255."""
    a = 2 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def test_a_clients_masked_input_looks_uniform_and_unrelated_to_its_update():
    n, u = 8, 3
    deltas, levels = grid_table(n)
    transport = Scripted(deltas)
    out = secure_round(grid_settings(n), transport, n)
    assert out.problem == ""
    held = transport.answers(TRAIN)[u].update.payload  # what the server holds of client u, as it arrived
    words = unpack_words(held, 32, D + 1)
    encoding = np.append(levels[u], 2**20).astype(np.int64).astype(np.uint32)  # u's update before masking
    limit = chi_square_limit()
    assert chi_square_bytes(held) < limit  # uniform bytes
    assert chi_square_bytes(encoding.tobytes()) > 10 * limit  # while the encoding itself is far from it
    signed = words.view(np.int32).astype(np.float64)
    assert abs(np.corrcoef(signed, encoding.view(np.int32))[0, 1]) < 5 / math.sqrt(D + 1)
    top = (words >> 24).astype(np.uint8)
    assert np.isin(top, (0, 255)).mean() < 0.05  # a small encoded value has a top byte 0x00 or 0xff ...
    assert np.isin((encoding >> 24).astype(np.uint8), (0, 255)).all()  # ... every one of them here
    # and no two clients' inputs share a mask: their differences look uniform too
    other = transport.answers(TRAIN)[u + 1].update.payload
    diff = (words - unpack_words(other, 32, D + 1)).astype(np.uint32)
    assert chi_square_bytes(diff.tobytes()) < limit


# ---------------------------------------------------------------------------------------------- dropouts


@pytest.mark.parametrize("step", [ADVERTISE, SHARE, COLLECT, TRAIN, UNMASK])
@pytest.mark.parametrize("mode, n, gone", [("secagg", 8, {1, 6}), ("secagg+", 12, {4})])
def test_clients_that_drop_at_any_step_leave_the_sum_of_the_others(step, mode, n, gone):
    deltas, levels = grid_table(n)
    settings = grid_settings(n, mode)
    transport = Scripted(deltas, drop={step: gone})
    out = secure_round(settings, transport, n)
    # a client lost at unmasking had sent its masked input: it is in the sum (the others' shares rebuild its seed)
    summed = list(range(n)) if step == UNMASK else [c for c in range(n) if c not in gone]
    assert_exact_sum(out, levels, summed)
    assert set(out.rejected) == gone
    where = "" if step == TRAIN else f"secagg_dropped: at {step}: "
    assert all(out.rejected[c] == f"{where}dropped: the client left" for c in gone)
    assert out.measurements["secagg.dropped"] == (len(gone) if step in (COLLECT, TRAIN) else 0)
    order = [ADVERTISE, SHARE, COLLECT, TRAIN, UNMASK]
    for s in order[order.index(step) + 1:]:  # a client gone is not asked again
        assert not {q.client_id for q in transport.sent(s)} & gone


# ------------------------------------------------------------------------------------------ threshold


def test_exactly_t_survivors_unmask_and_one_fewer_aborts_with_nothing_revealed():
    n = 6
    settings = grid_settings(n)  # complete graph, t = ceil(0.5 * 6) = 3
    assert settings.parameters(n) == (5, 3)
    deltas, levels = grid_table(n)
    # 3 survivors (= t): each one's self-mask seed is rebuilt from exactly t shares (the other two's and its own),
    # each dropped client's mask key from the 3 survivors' shares
    out = secure_round(settings, Scripted(deltas, drop={TRAIN: {0, 1, 2}}), n)
    assert_exact_sum(out, levels, [3, 4, 5])
    assert out.measurements["secagg.dropped"] == 3
    assert out.measurements["secagg.masks"] == 3 + 3 * 3  # the survivors' self masks, each dropped one's pair masks
    # one of them silent at unmasking: t - 1 shares of each seed arrive
    transport = Scripted(deltas, drop={TRAIN: {0, 1, 2}, UNMASK: {5}})
    out = secure_round(settings, transport, n)
    assert {q.client_id for q in transport.sent(UNMASK)} == {3, 4, 5}
    assert out.total is None and out.survivors == [] and out.metrics == {}
    assert out.problem == ("secure aggregation aborted: 2 shares to unmask client 3 arrived, fewer than the "
                           "threshold 3; nothing was unmasked")
    # t - 1 masked inputs: aborted before anyone is asked to reveal a share
    transport = Scripted(deltas, drop={TRAIN: {0, 1, 2, 3}})
    out = secure_round(settings, transport, n)
    assert out.total is None and out.survivors == []
    assert out.problem == ("secure aggregation aborted: 2 clients sent masked inputs, fewer than the 3 needed; "
                           "nothing was unmasked")
    assert transport.sent(UNMASK) == []
    # t - 1 clients shared their keys: aborted before the shares are relayed
    transport = Scripted(deltas, drop={SHARE: {0, 1, 2, 3}})
    out = secure_round(settings, transport, n)
    assert out.total is None
    assert out.problem == ("secure aggregation aborted: 2 clients shared their keys, fewer than the 3 needed; "
                           "nothing was unmasked")
    assert transport.sent(COLLECT) == [] and transport.sent(TRAIN) == []


def test_a_sparse_graph_aborts_before_unmasking_when_a_survivor_kept_too_few_neighbours():
    n = 12
    settings = grid_settings(n, "secagg+")
    k, t = settings.parameters(n)
    assert (k, t) == (6, 5)
    near = sorted(settings.plan(1, range(n), D + 1).graph()[0])
    deltas, levels = grid_table(n)
    # two of client 0's neighbours drop: its seed still has t shares (4 neighbours' and its own)
    assert_exact_sum(secure_round(settings, Scripted(deltas, drop={TRAIN: set(near[:2])}), n), levels,
                     [c for c in range(n) if c not in near[:2]])
    # three: 9 survivors are plenty, but client 0's seed could never be rebuilt, so nobody is asked for a share
    transport = Scripted(deltas, drop={TRAIN: set(near[:3])})
    out = secure_round(settings, transport, n)
    assert out.total is None and transport.sent(UNMASK) == []
    assert out.problem == ("secure aggregation aborted: 4 of the 9 clients that sent masked inputs hold shares of "
                           "client 0's secrets, fewer than the threshold 5; nothing was unmasked")


def test_distributed_noise_needs_its_survivors_before_anything_is_unmasked():
    n = 8
    settings = grid_settings(n, min_survivors=7)  # t = 4, but the noise was shared among 7
    deltas, levels = grid_table(n)
    transport = Scripted(deltas, drop={TRAIN: {0, 5}})
    out = secure_round(settings, transport, n)
    assert out.total is None and "6 clients sent masked inputs, fewer than the 7 needed" in out.problem
    assert transport.sent(UNMASK) == []
    assert_exact_sum(secure_round(settings, Scripted(deltas, drop={TRAIN: {5}}), n), levels, [0, 1, 2, 3, 4, 6, 7])


def test_a_round_of_fewer_than_three_clients_aborts_before_any_message():
    deltas, _ = grid_table(2)
    transport = Scripted(deltas)
    out = secure_round(grid_settings(3), transport, 2)
    assert out.total is None and "at least 3 clients, 2 were asked" in out.problem
    assert transport.log == []


SYNC = ["data.dataset=\"synthetic\"", "data.num_clients=8", "model.name=\"logreg\"", "server.clients_per_round=6",
        "aggregation.weighting=\"uniform\"", "secagg.mode=\"secagg\"", "client.lr=0.01"]


def test_an_aborted_round_leaves_the_model_and_the_aggregator_as_they_were():
    from fedloom.build import build_clients, build_strategy, client_pipeline

    cfg = load_config(None, SYNC)
    work, dataset = build_clients(cfg)
    server = SyncServer(build_strategy(cfg, len(dataset)), len(dataset))
    state = server.init(work.initial_params(0))
    engine = WithClientState(InProcessTransport(work, dataset, client_pipeline(cfg, work, len(dataset))),
                             StateFiles.temporary())

    class Losing:  # four of the six clients asked leave after sharing their keys
        def exchange(self, requests):
            gone = {q.client_id for q in requests[2:]} if step_of(requests[0]) == COLLECT else set()
            live = [q for q in requests if q.client_id not in gone]
            got = dict(zip([q.client_id for q in live], engine.exchange(live)))
            return [got.get(q.client_id) or error_reply(q, "dropped", "gone") for q in requests]

    result, after = train_round(server, state, Losing())
    assert result.problem.startswith("secure aggregation aborted: 2 clients sent masked inputs, fewer than the")
    assert result.accepted == [] and len(result.rejected) == 4 and after.round == 1
    assert all(np.array_equal(a, b) for a, b in zip(after.params, state.params))
    result, after = train_round(server, after, engine)
    assert result.problem == "" and len(result.accepted) == 6 and result.measurements["secagg.survivors"] == 6
    assert not np.array_equal(flatten(after.params), flatten(state.params))


# ------------------------------------------------------------------------------------------- bad input


def truncate(key: str, by: int = 1):
    return lambda values: {**values, key: values[key][:-by]}


def without(key: str):
    return lambda values: {k: v for k, v in values.items() if k != key}


def reverse_ids(key: str):
    return lambda values: {**values, key: ids_to_bytes(ids_from_bytes(values[key], key)[::-1])}


def same_keys(values):
    return {**values, "s_pk": values["c_pk"]}


def extra_id(values):
    return {**values, "b_ids": values["b_ids"] + ids_to_bytes([99])}


MALFORMED = [
    (ADVERTISE, truncate("c_pk"), "public keys must be two distinct 32-byte keys"),
    (ADVERTISE, same_keys, "public keys must be two distinct 32-byte keys"),
    (ADVERTISE, without("s_pk"), "the reply lacks s_pk"),
    (SHARE, truncate("sealed"), f"expected 7 blobs of {SEALED_BYTES} bytes"),
    (SHARE, truncate("sealed", SEALED_BYTES), f"expected 7 blobs of {SEALED_BYTES} bytes"),
    (SHARE, truncate("to", 3), "not a list of 8-byte ids"),
    (SHARE, reverse_ids("to"), "addressed to exactly the peers it was sent"),
    (SHARE, without("to"), "the reply lacks to"),
    (UNMASK, truncate("b_shares"), f"expected 8 blobs of {SHARE_BYTES} bytes"),  # its 7 peers' and its own
    (UNMASK, extra_id, "shares revealed for other clients"),
    (UNMASK, without("s_ids"), "the reply lacks s_ids"),
]


@pytest.mark.parametrize("step, edit, words", MALFORMED)
def test_a_malformed_step_reply_is_refused_with_its_reason_and_the_round_goes_on(step, edit, words):
    n, bad = 8, 2
    deltas, levels = grid_table(n)

    def edit_replies(requests, replies):
        return [replace(r, values=edit(r.values)) if isinstance(r, StepReply) and r.step == step
                and r.client_id == bad else r for r in replies]

    out = secure_round(grid_settings(n), Scripted(deltas, edit_replies=edit_replies), n)
    assert list(out.rejected) == [bad]
    assert out.rejected[bad].startswith(f"secagg_bad_reply: at {step}: ") and words in out.rejected[bad]
    # refused before its masked input: out of the sum; refused at unmasking: its input is in, its shares are not used
    assert_exact_sum(out, levels, list(range(n)) if step == UNMASK else [c for c in range(n) if c != bad])


def another(kind: str):
    def edit(request, reply):
        if kind == "step":
            return replace(reply, step=ADVERTISE)
        if kind == "round":
            return replace(reply, round=reply.round + 1)
        if kind == "client":  # a relay that duplicates client 3's reply into client 2's place
            return replace(reply, client_id=3)
        return TrainReply(reply.client_id, reply.round, error=None)  # another kind of message
    return edit


@pytest.mark.parametrize("kind", ["step", "round", "client", "message"])
def test_a_reply_to_another_step_round_or_client_is_refused(kind):
    n, bad = 8, 2
    deltas, levels = grid_table(n)
    edit = another(kind)

    def edit_replies(requests, replies):
        return [edit(q, r) if step_of(q) == SHARE and q.client_id == bad else r for q, r in zip(requests, replies)]

    out = secure_round(grid_settings(n), Scripted(deltas, edit_replies=edit_replies), n)
    assert out.rejected == {bad: "secagg_bad_reply: not an answer to secagg.share of round 1"}
    assert_exact_sum(out, levels, [c for c in range(n) if c != bad])


def test_a_duplicated_masked_input_is_counted_once():
    n = 8
    deltas, levels = grid_table(n)

    def edit_replies(requests, replies):  # client 3's masked input arrives twice, once in client 2's place
        if step_of(requests[0]) != TRAIN:
            return replies
        return [replies[3] if q.client_id == 2 else r for q, r in zip(requests, replies)]

    out = secure_round(grid_settings(n), Scripted(deltas, edit_replies=edit_replies), n)
    assert list(out.rejected) == [2] and out.rejected[2].startswith("invalid_reply: the reply is addressed to client 3")
    # client 2 counts as dropped after it masked with everyone: its mask key is rebuilt, its pair masks removed
    assert out.measurements["secagg.dropped"] == 1
    assert_exact_sum(out, levels, [0, 1, 3, 4, 5, 6, 7])


def test_a_masked_input_of_the_wrong_size_is_refused_at_the_door():
    n = 8
    deltas, levels = grid_table(n)

    def edit_replies(requests, replies):
        return [replace(r, update=replace(r.update, payload=r.update.payload[:-4]))
                if isinstance(r, TrainReply) and r.client_id == 5 else r for r in replies]

    out = secure_round(grid_settings(n), Scripted(deltas, edit_replies=edit_replies), n)
    assert out.rejected[5].startswith("invalid_update: a masked update must hold exactly 4004 bytes")
    assert_exact_sum(out, levels, [0, 1, 2, 3, 4, 6, 7])


def test_a_sealed_share_replayed_from_another_round_fails_authentication_on_its_client():
    n, victim = 8, 4
    deltas, levels = grid_table(n)
    old: dict[str, bytes] = {}

    def edit_request(q):  # in round 2 the server relays round 1's sealed shares to the victim
        if step_of(q) == COLLECT and q.client_id == victim:
            if q.round == 1:
                old.update(q.values)
            else:
                assert ids_from_bytes(old["from"], "from") == ids_from_bytes(q.values["from"], "from")
                return replace(q, values=dict(old))
        return q

    transport = Scripted(deltas, edit_request=edit_request)
    assert_exact_sum(secure_round(grid_settings(n), transport, n, rnd=1), levels, list(range(n)))
    out = secure_round(grid_settings(n), transport, n, rnd=2)
    reply = transport.answers(COLLECT, rnd=2)[victim]
    assert reply.error.code == "secagg" and "sealed data failed authentication" in reply.error.reason
    assert out.rejected == {victim: f"secagg_dropped: at secagg.collect: secagg: {reply.error.reason}"}
    assert_exact_sum(out, levels, [c for c in range(n) if c != victim])  # the victim's shares stay with the others


def test_a_share_relayed_to_another_client_than_it_was_sealed_for_fails_authentication():
    n, victim, sender, meant = 8, 1, 6, 2
    deltas, levels = grid_table(n)

    def edit_request(q):  # the victim gets the share client 6 sealed for client 2, in the place of its own
        if step_of(q) != COLLECT or q.client_id != victim:
            return q
        shared = transport.answers(SHARE)[sender].values
        to = ids_from_bytes(shared["to"], "to")
        wrong = shared["sealed"][SEALED_BYTES * to.index(meant):SEALED_BYTES * (to.index(meant) + 1)]
        senders = ids_from_bytes(q.values["from"], "from")
        at = senders.index(sender)
        sealed = q.values["sealed"]
        return replace(q, values={**q.values, "sealed": sealed[:SEALED_BYTES * at] + wrong
                                  + sealed[SEALED_BYTES * (at + 1):]})

    transport = Scripted(deltas, edit_request=edit_request)
    out = secure_round(grid_settings(n), transport, n)
    assert "sealed data failed authentication" in out.rejected[victim] and list(out.rejected) == [victim]
    assert_exact_sum(out, levels, [c for c in range(n) if c != victim])


@pytest.mark.parametrize("bad", [0, 7])  # its share among the t smallest ids, or among the surplus
def test_a_corrupt_share_at_unmasking_aborts_the_round_instead_of_unmasking_a_wrong_sum(bad):
    n = 8
    deltas, _ = grid_table(n)

    def edit_replies(requests, replies):  # the last share (its own seed's) with one bit flipped: the secret moves by
        # a small multiple, which still fits in 32 bytes, so only the surplus shares can tell
        return [replace(r, values={**r.values, "b_shares": r.values["b_shares"][:-1]
                                   + bytes([r.values["b_shares"][-1] ^ 1])})
                if isinstance(r, StepReply) and r.step == UNMASK and r.client_id == bad else r for r in replies]

    out = secure_round(grid_settings(n), Scripted(deltas, edit_replies=edit_replies), n)
    assert out.total is None and out.survivors == []
    assert "shares are inconsistent" in out.problem and out.problem.endswith("nothing was unmasked")


def test_unknown_malformed_and_foreign_steps_get_error_replies_never_exceptions():
    reply = client_step(StepRequest(0, 1, "secagg.bogus", {}, {"kept": np.ones(2)}))
    assert reply.error.code == "unknown_step" and "secagg.bogus" in reply.error.reason
    assert reply.state["kept"].tolist() == [1, 1]  # the client's state comes back as it was
    plan = Plan(1, (0, 1, 2, 3), 3, 2, bytes(32), 32, 1000, 1.0, 11).values()
    assert client_step(StepRequest(0, 1, ADVERTISE, plan, {})).error is None
    cases = [
        (ADVERTISE, {}, "plan is incomplete"),
        (ADVERTISE, {**plan, "numbers": plan["numbers"][:-1]}, "plan is incomplete or malformed"),
        (ADVERTISE, {**plan, "clients": plan["clients"][:-3]}, "not a list of 8-byte ids"),
        (ADVERTISE, {**plan, "clients": ids_to_bytes([1, 2, 3, 4])}, "does not name client 0"),
        (ADVERTISE, {**plan, "numbers": struct.pack("<qqqqqdd", 1, 3, 2, 32, 2**40, 1.0, 0.0)}, "do not sum within"),
        (ADVERTISE, {**plan, "numbers": struct.pack("<qqqqqdd", 2, 3, 2, 32, 1000, 1.0, 0.0)},
         "plan is for round 2, the request for round 1"),
        (SHARE, {"peers": ids_to_bytes([1, 2]), "keys": bytes(128)}, "holds no secure-aggregation keys"),
        (COLLECT, {}, "holds no secure-aggregation keys"),
        (UNMASK, {"survivors": ids_to_bytes([0, 1, 2])}, "holds no secure-aggregation keys"),
    ]
    for step, values, words in cases:
        reply = client_step(StepRequest(0, 1, step, values, {}))
        assert reply.error is not None and reply.error.code == "secagg" and words in reply.error.reason, (step, words)
    rng = np.random.default_rng(0)
    state = client_step(StepRequest(0, 1, ADVERTISE, plan, {})).state
    for _ in range(200):  # random bytes where the values go: answered, never raised
        values = {str(k): rng.bytes(int(rng.choice([0, 7, 8, 32, 64, 176]))) for k in
                  rng.choice(["peers", "keys", "from", "sealed", "survivors", "clients", "numbers"], 3)}
        reply = client_step(StepRequest(0, 1, str(rng.choice(STEPS)), values, dict(state)))
        assert isinstance(reply, StepReply) and reply.error is not None


def test_steps_out_of_order_or_repeated_are_refused_and_the_round_goes_on():
    n = 8
    deltas, levels = grid_table(n)
    refused: dict[str, StepReply | TrainReply] = {}

    def before_training(t: Scripted) -> None:
        survivors = ids_to_bytes(range(n))
        refused["unmask before training"] = t.ask(StepRequest(0, 1, UNMASK, {"survivors": survivors}))
        refused["second share"] = t.ask(t.sent(SHARE)[1])
        refused["second collect"] = t.ask(t.sent(COLLECT)[2])
        refused["advertise of another round"] = t.ask(replace(t.sent(ADVERTISE)[3], round=2))
        refused["unknown step"] = t.ask(StepRequest(4, 1, "secagg.consistency", {}))

    def before_unmasking(t: Scripted) -> None:
        refused["second training"] = t.ask(t.sent(TRAIN)[5])

    transport = Scripted(deltas, before={TRAIN: before_training, UNMASK: before_unmasking})
    out = secure_round(grid_settings(n), transport, n)
    assert_exact_sum(out, levels, list(range(n)))  # nothing refused disturbed what the clients keep
    refused["second unmask"] = transport.ask(transport.sent(UNMASK)[6])  # the round's secrets were wiped
    words = {"unmask before training": "came out of order", "second share": "already shared",
             "second collect": "already collected",
             "advertise of another round": "plan is for round 1, the request for round 2",
             "unknown step": "knows no step", "second training": "masked input was already sent",
             "second unmask": "holds no secure-aggregation keys of that round"}
    for what, reply in refused.items():
        assert reply.error is not None and words[what] in reply.error.reason, what
    assert refused["unknown step"].error.code == "unknown_step"
    assert refused["second unmask"].values == {}  # no share of anyone


# ------------------------------------------------------------------------------------------------ graphs


@pytest.mark.parametrize("mode, n", [("secagg", 12), ("secagg+", 40)])
def test_both_graphs_unmask_the_right_sum(mode, n):
    d = 50
    deltas, levels = grid_table(n, d)
    transport = Scripted(deltas)
    out = secure_round(grid_settings(n, mode), transport, n, d)
    assert_exact_sum(out, levels, list(range(n)))
    degree = int(out.measurements["secagg.degree"])
    if mode == "secagg":
        assert degree == n - 1 and out.measurements["secagg.threshold"] == math.ceil(0.5 * n)
    else:
        assert (degree, out.measurements["secagg.threshold"]) == (18, 14)  # secagg_plus_parameters(40)
    peers = {c: ids_from_bytes(r.values["to"], "to") for c, r in transport.answers(SHARE).items()}
    assert {len(p) for p in peers.values()} == {degree}  # each client shares with its neighbours only
    assert all(c in peers[v] for c in peers for v in peers[c])  # and the graph is symmetric
