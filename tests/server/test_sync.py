"""The synchronous server's round logic, driven through the in-process transport."""

import numpy as np
import pytest
import torch

from fedloom.client import TorchClientWork
from fedloom.data.dataset import ClientDataset, FederatedDataset
from fedloom.messages import (
    ErrorReply,
    EvaluateReply,
    EvaluateRequest,
    Evaluation,
    TrainConfig,
    TrainReply,
    Update,
)
from fedloom.models import LogisticRegression
from fedloom.server import Strategy, SyncServer, UniformSelector
from fedloom.transport import InProcessTransport


def federation(sizes, dim=5, classes=3, seed=0):
    rng = np.random.RandomState(seed)
    clients = []
    for cid, n in enumerate(sizes):
        x = rng.normal(size=(n, dim)).astype(np.float32)
        y = rng.randint(0, classes, n).astype(np.int64)
        cut = max(1, int(0.8 * n))
        clients.append(ClientDataset(cid, x[:cut], y[:cut], x[cut:], y[cut:]))
    return FederatedDataset("toy", clients, classes)


def test_fedavg_one_client_one_step_equals_centralised_sgd():
    data = federation([20])
    work = TorchClientWork(lambda: LogisticRegression(5, 3))
    params = work.initial_params(0)
    strategy = Strategy(1, TrainConfig(lr=0.3, batch_size=20, max_steps=1))
    server = SyncServer(strategy, 1)
    state = server.init(params)
    reqs, state = server.train_requests(state)
    _, state = server.apply(state, reqs, InProcessTransport(work, data).exchange(reqs))

    torch.manual_seed(0)
    model = LogisticRegression(5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    c = data[0]
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(c.x_train)), torch.from_numpy(c.y_train))
    loss.backward()
    opt.step()
    for got, want in zip(state.params, model.parameters()):
        np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_uniform_selection_is_seeded_per_round():
    sel = UniformSelector(seed=0)
    assert sel.select(3, range(1000), 10)[0] == list(np.random.RandomState([0, 3]).choice(1000, 10, replace=False))
    assert sel.select(3, range(1000), 10)[0] != sel.select(4, range(1000), 10)[0]
    assert len(set(sel.select(1, range(50), 50)[0])) == 50


class Scripted:
    """Client work that returns what the test tells it to, per client id."""

    def __init__(self, replies):
        self.replies = replies

    def train(self, params, data, config):
        out = self.replies[data.client_id]
        if isinstance(out, Exception):
            raise out
        return out

    def evaluate(self, params, data, config):
        return Evaluation(loss=float(data.client_id), accuracy=0.5, num_examples=data.num_test)


def test_bad_updates_are_rejected_with_reasons_and_the_round_goes_on():
    data = federation([10, 10, 10, 10, 10])
    params = [np.zeros(2, np.float32)]
    good = [np.array([1.0, 2.0], np.float32)]
    replies = {
        0: Update(good, weight=1.0),
        1: Update([np.array([np.nan, 0.0], np.float32)], weight=1.0),
        2: Update([np.zeros(3, np.float32)], weight=1.0),
        3: RuntimeError("disk full"),
        4: Update(good, weight=-1.0),
    }
    server = SyncServer(Strategy(5), 5)
    state = server.init(params)
    reqs, state = server.train_requests(state)
    result, new = server.apply(state, reqs, InProcessTransport(Scripted(replies), data).exchange(reqs))
    assert result.accepted == [0]
    assert "NaN" in result.rejected[1]
    assert "expected <f4[2]" in result.rejected[2]
    assert "disk full" in result.rejected[3]
    assert "weight" in result.rejected[4]
    np.testing.assert_array_equal(new.params[0], [1.0, 2.0])
    np.testing.assert_array_equal(state.params[0], [0.0, 0.0])  # old state untouched


def test_round_without_enough_updates_keeps_the_model():
    data = federation([10, 10])
    params = [np.zeros(2, np.float32)]
    replies = {0: Update([np.ones(2, np.float32)], 1.0), 1: RuntimeError("crash")}
    server = SyncServer(Strategy(2, min_updates=2), 2)
    state = server.init(params)
    reqs, state = server.train_requests(state)
    result, new = server.apply(state, reqs, InProcessTransport(Scripted(replies), data).exchange(reqs))
    assert new.round == 1 and result.accepted == [0]
    np.testing.assert_array_equal(new.params[0], [0.0, 0.0])


def test_replies_from_clients_not_asked_are_ignored():
    server = SyncServer(Strategy(1), 3)
    state = server.init([np.zeros(1, np.float32)])
    reqs, state = server.train_requests(state)
    stranger = 1 - reqs[0].client_id if reqs[0].client_id < 2 else 0
    replies = [TrainReply(stranger, 1, update=Update([np.ones(1, np.float32)], 1.0))]
    result, new = server.apply(state, reqs, replies)
    assert stranger in result.rejected and reqs[0].client_id in result.rejected
    assert result.rejected[reqs[0].client_id] == "no_reply: no reply"
    np.testing.assert_array_equal(new.params[0], [0.0])


def test_params_kind_updates_become_deltas():
    server = SyncServer(Strategy(1), 1)
    state = server.init([np.full(2, 3.0, np.float32)])
    reqs, state = server.train_requests(state)
    reply = TrainReply(0, 1, update=Update([np.full(2, 5.0, np.float32)], 2.0, kind="params"))
    _, new = server.apply(state, reqs, [reply])
    np.testing.assert_array_equal(new.params[0], [5.0, 5.0])


def _evaluate_requests(n):
    return [EvaluateRequest(c, 1, [np.zeros(1, np.float32)]) for c in range(n)]


def test_federated_evaluation_is_example_weighted():
    replies = [EvaluateReply(0, 1, Evaluation(1.0, 0.2, 10)), EvaluateReply(1, 1, Evaluation(3.0, 0.8, 30)),
               EvaluateReply(2, 1, error=ErrorReply("client_failed", "no data"))]
    fed = SyncServer.summarize(_evaluate_requests(3), replies)
    assert fed.loss == pytest.approx(2.5) and fed.accuracy == pytest.approx(0.65)
    assert fed.num_clients == 2 and fed.num_examples == 40


def test_federated_evaluation_leaves_out_impossible_claims_and_other_kinds():
    honest = [EvaluateReply(0, 1, Evaluation(0.5, 0.75, 100))]
    lies = [EvaluateReply(1, 1, Evaluation(0.1, 1.5, 100)),  # accuracy over 1
            EvaluateReply(2, 1, Evaluation(float("nan"), 0.9, 100)),
            TrainReply(3, 1, update=Update([np.zeros(1, np.float32)], 1.0)),  # a train reply to an evaluation
            EvaluateReply(4, 2, Evaluation(0.1, 1.0, 100)),  # another round
            EvaluateReply(0, 1, Evaluation(0.0, 1.0, 10**15))]  # a second reply from client 0
    fed = SyncServer.summarize(_evaluate_requests(5), honest + lies)
    assert (fed.accuracy, fed.loss, fed.num_clients, fed.num_examples) == (0.75, 0.5, 1, 100)


def test_a_huge_reported_loss_does_not_overflow_the_mean():
    replies = [EvaluateReply(0, 1, Evaluation(1e300, 0.5, 1000)), EvaluateReply(1, 1, Evaluation(1e300, 0.5, 3000))]
    fed = SyncServer.summarize(_evaluate_requests(2), replies)
    assert fed.loss == pytest.approx(1e300)


def test_replies_of_the_wrong_kind_are_rejected_not_raised():
    server = SyncServer(Strategy(2), 2)
    state = server.init([np.zeros(2, np.float32)])
    reqs, state = server.train_requests(state)
    a, b = (r.client_id for r in reqs)
    replies = [EvaluateReply(a, 1, Evaluation(0.1, 0.9, 10)), reqs[1]]  # an evaluation, and the request itself
    result, new = server.apply(state, reqs, replies)
    assert result.accepted == [] and new.round == 1
    assert result.rejected[a].startswith("invalid_reply: a TrainRequest is answered by a TrainReply, got an")
    assert "got a TrainRequest" in result.rejected[b]


def test_the_selector_learns_reported_losses_and_measured_durations():
    from fedloom.server import OortSelector

    data = federation([30, 12, 25, 8])
    work = TorchClientWork(lambda: LogisticRegression(5, 3))
    server = SyncServer(Strategy(3, TrainConfig(lr=0.1, batch_size=10), selector=OortSelector(seed=1)), 4)
    state = server.init(work.initial_params(0))
    reqs, state = server.train_requests(state)
    asked = [r.client_id for r in reqs]
    assert state.selection.selections == 1 and len(asked) == 3
    replies = InProcessTransport(work, data).exchange(reqs)
    bad = next(r for r in replies if r.client_id == asked[2])
    bad.update.metrics["loss_sq"] = float("nan")  # impossible: the update is refused, the selector learns no loss
    result, state = server.apply(state, reqs, replies, durations={asked[0]: 3.0, asked[1]: 9.0, asked[2]: 4.0})
    assert state.round == 1 and sorted(result.accepted) == sorted(asked[:2])
    assert "'loss_sq'" in result.rejected[asked[2]] and "not finite" in result.rejected[asked[2]]
    sel = state.selection
    for cid, m in ((r.client_id, r.update.metrics) for r in replies[:2]):
        assert sel.utility[cid] == pytest.approx(m["examples"] * np.sqrt(m["loss_sq"]))
    assert sel.utility[asked[2]] == 0.0 and sel.last_round[asked[2]] == 1  # duration known, loss not
    assert list(sel.duration[asked]) == [3.0, 9.0, 4.0]
    assert all(sel.last_round[c] == 0 for c in range(4) if c not in asked)


def test_a_client_that_never_replied_teaches_only_its_waiting_time():
    from fedloom.server import PowerOfChoiceSelector

    data = federation([10, 10, 10])
    work = TorchClientWork(lambda: LogisticRegression(5, 3))
    server = SyncServer(Strategy(3, TrainConfig(lr=0.1), selector=PowerOfChoiceSelector(d=3)), 3)
    state = server.init(work.initial_params(0))
    reqs, state = server.train_requests(state)
    replies = InProcessTransport(work, data).exchange(reqs)
    result, state = server.apply(state, reqs, replies[:2], durations={reqs[2].client_id: 7.0})
    assert result.rejected == {reqs[2].client_id: "no_reply: no reply"}
    assert state.selection.loss_sq_mean[reqs[2].client_id] != state.selection.loss_sq_mean[reqs[2].client_id]  # nan
    assert all(state.selection.num_examples[r.client_id] == 8 for r in reqs[:2])
