"""The aggregation pipeline in whole runs: the client halves give the same model on every engine, robust options
defend against the simulated attacks, FedBuff goes through the same aggregator, and the metrics say what happened."""

import numpy as np
import pytest

from fedloom.build import build_clients
from fedloom.config import load_config
from fedloom.simulation.runner import simulate
from fedloom.stages.attacks import attackers

BASE = ["data.dataset=\"synthetic\"", "data.num_clients=40", "model.name=\"logreg\"", "client.lr=0.05",
        "client.max_steps=5", "server.clients_per_round=10", "run.rounds=4", "eval.every=2"]
PRIVATE = ["aggregation.weighting=\"uniform\"", "privacy.noise_multiplier=0.8", "privacy.clip=0.3",
           "privacy.local=true"]


def run(*overrides):
    return simulate(load_config(None, [*BASE, *overrides]), progress=False, write=False)


@pytest.mark.parametrize("engine", ["vectorized", "process", "ray"])
def test_client_halves_give_the_same_model_on_every_engine(engine):
    settings = [*PRIVATE, "attack.kind=\"scale\"", "attack.fraction=0.2", "attack.strength=3.0"]
    reference = run(*settings, "engine.executor=\"sequential\"")
    other = run(*settings, f"engine.executor=\"{engine}\"", "engine.workers=2")
    for a, b in zip(reference.params, other.params):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    plain = run("engine.executor=\"sequential\"")
    assert not np.allclose(plain.params[0], reference.params[0])  # the stages did something


def test_local_noise_and_clipping_are_applied_on_the_client():
    result = run(*PRIVATE, "engine.executor=\"sequential\"")
    assert all(r["clip.clip_bound"] == pytest.approx(0.3) for r in result.history)
    eps = [r["local_noise.epsilon"] for r in result.history]
    assert eps == sorted(eps) and eps[0] > 0


def honest_accuracy(result):
    """Accuracy on the test data of the clients that attack with fraction 0.2 (no defence serves the attackers)."""
    work, dataset = build_clients(result.config)
    bad = attackers(0.2, len(dataset), result.config.run.seed)
    honest = [c for c in dataset.clients if c.client_id not in bad]
    x, y = np.concatenate([c.x_test for c in honest]), np.concatenate([c.y_test for c in honest])
    return work.evaluate_params(result.params, x, y).accuracy


DIGITS = ["data.dataset=\"digits\"", "data.partition=\"dirichlet\"", "data.alpha=0.5", "data.num_clients=100",
          "model.name=\"mlp\"", "model.hidden=[64]", "client.lr=0.1", "client.batch_size=10", "client.local_epochs=2",
          "server.clients_per_round=20", "run.rounds=30", "eval.every=30", "engine.executor=\"vectorized\""]


@pytest.mark.parametrize("attack, defence", [
    ("scale", "aggregation.centered_clip=0.4"),
    ("weight", "aggregation.weighting=\"capped\" aggregation.max_weight=14"),
    ("sign_flip", "aggregation.centered_clip=0.4"),
    ("gaussian", "aggregation.reducer=\"multi_krum\" aggregation.byzantine=5 aggregation.norm_bound=0.4"),
])
def test_a_robust_option_resists_an_attack_that_ruins_fedavg(attack, defence):
    clean = honest_accuracy(simulate(load_config(None, DIGITS), progress=False, write=False))
    attacked = [*DIGITS, "attack.fraction=0.2", f"attack.kind=\"{attack}\"", "attack.strength=20.0"]
    fedavg = honest_accuracy(simulate(load_config(None, attacked), progress=False, write=False))
    robust = honest_accuracy(simulate(load_config(None, [*attacked, *defence.split()]), progress=False, write=False))
    assert fedavg < clean - 0.15 and robust > clean - 0.1, (clean, fedavg, robust)


def test_fedbuff_aggregates_through_the_same_chain():
    result = run("hetero.population=\"silo\"", "server.aggregation=\"fedbuff\"", "server.buffer_size=4",
                 "aggregation.reducer=\"trimmed_mean\"", "aggregation.trim=0.25", "aggregation.norm_bound=0.5",
                 "engine.executor=\"sequential\"")
    assert len(result.history) == 4 and np.isfinite(result.history[-1]["test_accuracy"])


def test_a_corrupt_update_is_refused_by_the_norm_limit_and_the_round_says_why():
    result = run("attack.kind=\"scale\"", "attack.fraction=0.1", "attack.strength=1e30",
                 "engine.executor=\"sequential\"")
    assert any(r["rejected"] > 0 for r in result.history)
    assert np.isfinite(result.history[-1]["test_accuracy"]) and result.history[-1]["test_accuracy"] > 0.3
