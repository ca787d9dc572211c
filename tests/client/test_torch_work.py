import numpy as np
import pytest
import torch

from fedloom.client import TorchClientWork, handle
from fedloom.client.torch_work import set_params
from fedloom.data.dataset import ClientDataset
from fedloom.messages import EvaluateConfig, TrainConfig, TrainRequest
from fedloom.models import CharLSTM, LogisticRegression


def client(n=23, dim=4, classes=3, cid=2, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = rng.randint(0, classes, n).astype(np.int64)
    return ClientDataset(cid, x, y, x[:5], y[:5])


def manual(params, data, cfg, mu=0.0):
    """Local SGD written out by hand, with FedProx's proximal term in the loss."""
    model = LogisticRegression(4, 3)
    with torch.no_grad():
        for p, a in zip(model.parameters(), params):
            p.copy_(torch.from_numpy(a))
    anchor = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    rng = np.random.RandomState([cfg.seed, cfg.round, data.client_id])
    steps = 0
    for _ in range(cfg.local_epochs):
        order = rng.permutation(data.num_train)
        for s in range(0, data.num_train, cfg.batch_size):
            if cfg.max_steps is not None and steps >= cfg.max_steps:
                break
            idx = order[s : s + cfg.batch_size]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(data.x_train[idx])),
                                                     torch.from_numpy(data.y_train[idx]))
            loss = loss + mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
            loss.backward()
            opt.step()
            steps += 1
    return [p.detach().numpy() for p in model.parameters()], steps


@pytest.mark.parametrize("cfg,mu", [
    (TrainConfig(lr=0.5, batch_size=5, local_epochs=2, seed=3, round=4), 0.0),
    (TrainConfig(lr=0.5, batch_size=5, local_epochs=1, max_steps=3, seed=1, round=2), 0.0),
    (TrainConfig(lr=0.5, batch_size=4, local_epochs=2, mu=0.7, seed=0, round=1), 0.7),
])
def test_local_sgd_matches_a_hand_written_loop(cfg, mu):
    work = TorchClientWork(lambda: LogisticRegression(4, 3))
    params = work.initial_params(0)
    data = client()
    update = work.train(params, data, cfg)
    want, steps = manual(params, data, cfg, mu)
    assert update.kind == "delta" and update.weight == data.num_train
    assert update.metrics["steps"] == steps
    for d, p0, w in zip(update.values, params, want):
        np.testing.assert_allclose(p0 + d, w, rtol=1e-5, atol=1e-6)


def test_fedprox_pulls_towards_the_global_model():
    work = TorchClientWork(lambda: LogisticRegression(4, 3))
    params = work.initial_params(0)
    plain = work.train(params, client(), TrainConfig(lr=0.5, batch_size=4, local_epochs=3))
    prox = work.train(params, client(), TrainConfig(lr=0.5, batch_size=4, local_epochs=3, mu=1.0))
    norm = lambda u: sum(float((v ** 2).sum()) for v in u.values)  # noqa: E731
    assert norm(prox) < norm(plain)


def test_step_cap_and_examples_count():
    work = TorchClientWork(lambda: LogisticRegression(4, 3))
    update = work.train(work.initial_params(0), client(n=23), TrainConfig(batch_size=5, max_steps=2))
    assert update.metrics["steps"] == 2 and update.metrics["examples"] == 10


def test_training_does_not_touch_the_sent_params():
    work = TorchClientWork(lambda: LogisticRegression(4, 3))
    params = work.initial_params(0)
    before = [p.copy() for p in params]
    work.train(params, client(), TrainConfig(lr=1.0))
    for a, b in zip(params, before):
        np.testing.assert_array_equal(a, b)


def char_task(n, T, vocab=7, seed=0):
    """``n`` random character windows of length ``T``, a small LSTM's client work and its initial parameters."""
    rng = np.random.RandomState(seed)
    x = rng.randint(0, vocab, (n, T)).astype(np.int64)
    y = rng.randint(0, vocab, (n, T)).astype(np.int64)
    work = TorchClientWork(lambda: CharLSTM(vocab, 4, 8, 1))
    return x, y, work, work.initial_params(0)


@torch.no_grad()
def lstm_logits(params, x, vocab=7):
    """The logits of a separately built LSTM holding ``params``."""
    model = CharLSTM(vocab, 4, 8, 1)
    set_params(model, params)
    return model(torch.from_numpy(x))


def test_sequence_evaluation_counts_every_position():
    vocab = 7
    x, y, work, params = char_task(9, 6)
    ev = work.evaluate(params, ClientDataset(0, x, y, x, y), EvaluateConfig(batch_size=4))
    out = lstm_logits(params, x)
    assert ev.accuracy == pytest.approx(float((out.argmax(-1) == torch.from_numpy(y)).float().mean()))
    loss = torch.nn.functional.cross_entropy(out.reshape(-1, vocab), torch.from_numpy(y).reshape(-1))
    assert ev.loss == pytest.approx(float(loss), rel=1e-5)
    assert ev.num_examples == 9


def test_a_failing_client_becomes_an_error_reply():
    work = TorchClientWork(lambda: LogisticRegression(4, 3))
    bad = [np.zeros((2, 2), np.float32)]
    reply = handle(TrainRequest(2, 1, bad, TrainConfig()), work, client())
    assert reply.update is None and reply.error.code == "client_failed"
    empty = ClientDataset(2, np.zeros((0, 4), np.float32), np.zeros(0, np.int64),
                          np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    reply = handle(TrainRequest(2, 1, work.initial_params(0), TrainConfig()), work, empty)
    assert reply.error.code == "bad_data" and "no training examples" in reply.error.reason


def test_loss_sq_is_the_mean_squared_per_sample_loss():
    """Oort's statistical utility needs per-sample losses; with lr 0 they are the initial model's."""
    vocab, T = 7, 5
    x, y, work, params = char_task(11, T, seed=1)
    update = work.train(params, ClientDataset(0, x, y, x, y), TrainConfig(lr=0.0, batch_size=4, local_epochs=2))
    out = lstm_logits(params, x)
    per_sample = torch.nn.functional.cross_entropy(out.reshape(-1, vocab), torch.from_numpy(y).reshape(-1),
                                                   reduction="none").view(11, T).mean(1).numpy()
    assert update.metrics["loss_sq"] == pytest.approx(float((per_sample ** 2).mean()), rel=1e-5)
    assert update.metrics["loss"] == pytest.approx(float(per_sample.mean()), rel=1e-5)
    assert update.metrics["loss_sq"] > update.metrics["loss"] ** 2  # the samples' losses differ


def test_a_scalar_loss_function_reports_squared_batch_losses():
    data = client(n=8)
    scalar = TorchClientWork(lambda: LogisticRegression(4, 3), loss_fn=torch.nn.functional.cross_entropy)
    per_sample = TorchClientWork(lambda: LogisticRegression(4, 3))
    params = scalar.initial_params(0)
    cfg = TrainConfig(lr=0.0, batch_size=8, local_epochs=1)
    a, b = scalar.train(params, data, cfg), per_sample.train(params, data, cfg)
    for x, y in zip(a.values, b.values):
        np.testing.assert_allclose(x, y)  # the same descent either way
    assert a.metrics["loss"] == pytest.approx(b.metrics["loss"], rel=1e-6)
    assert a.metrics["loss_sq"] == pytest.approx(b.metrics["loss"] ** 2, rel=1e-6)  # one batch: its mean, squared
    assert b.metrics["loss_sq"] > a.metrics["loss_sq"]
