"""Privacy accounting: epsilon is what dp-accounting gives for the same mechanism; budgets end training in time."""

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from fedloom.config import load_config
from fedloom.errors import ConfigError
from fedloom.simulation.runner import simulate
from fedloom.stages.privacy import Accountant, GaussianNoise, noise_for_epsilon, update_multiplier


def direct(event, relation):
    acc = RdpAccountant(neighboring_relation=relation)
    acc.compose(event)
    return acc.get_epsilon(1e-5)


def test_epsilon_is_dp_accountings_for_the_sampling_the_run_uses():
    fixed = Accountant(1.1, "fixed", 1000, 10, 1e-5).epsilon(200)
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.SampledWithoutReplacementDpEvent(
        1000, 10, dp_accounting.GaussianDpEvent(1.1 / 2)), 200)  # replace-one: the sum's sensitivity is 2C
    assert fixed == pytest.approx(direct(event, dp_accounting.NeighboringRelation.REPLACE_ONE))
    poisson = Accountant(1.1, "poisson", 1000, 10, 1e-5).epsilon(200)
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        0.01, dp_accounting.GaussianDpEvent(1.1)), 200)
    assert poisson == pytest.approx(direct(event, dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE))
    none = Accountant(1.1, "none", 1000, 10, 1e-5).epsilon(3)
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.1 / 2), 3)
    assert none == pytest.approx(direct(event, dp_accounting.NeighboringRelation.REPLACE_ONE))
    assert Accountant(1.1, "fixed", 1000, 10, 1e-5).epsilon(0) == 0.0
    assert poisson < fixed < none * 100  # sampling amplifies; nothing composes to more


def test_the_noise_for_a_target_epsilon_reaches_it():
    z = noise_for_epsilon(4.0, 60, "fixed", 100, 10, 1e-5)
    eps = Accountant(z, "fixed", 100, 10, 1e-5).epsilon(60)
    assert eps <= 4.0 and eps == pytest.approx(4.0, rel=0.01)
    assert Accountant(z * 0.9, "fixed", 100, 10, 1e-5).epsilon(60) > 4.0


def test_adaptive_clipping_takes_its_share_of_the_noise():
    assert update_multiplier(1.0, 0.0) == 1.0
    assert update_multiplier(1.0, 5.0) == pytest.approx((1 - 1 / 100) ** -0.5)
    with pytest.raises(ConfigError, match="leaves nothing for the updates"):
        update_multiplier(1.0, 0.4)


def test_a_budget_stops_the_round_that_would_exceed_it():
    acc = Accountant(1.0, "fixed", 100, 10, 1e-5)
    stage = GaussianNoise(1.0, acc, budget=acc.epsilon(5) + 1e-9)
    assert stage.stop_reason({"rounds": np.array(4)}) is None
    reason = stage.stop_reason({"rounds": np.array(5)})
    assert reason.startswith("privacy budget: another round would reach epsilon") and "after 5 private rounds" in reason


TINY = ["data.dataset=\"breast_cancer\"", "data.partition=\"iid\"", "data.num_clients=20", "model.name=\"logreg\"",
        "client.lr=0.1", "server.clients_per_round=5", "engine.executor=\"sequential\"", "eval.every=1",
        "aggregation.weighting=\"uniform\"", "privacy.noise_multiplier=1.0", "privacy.clip=0.5"]


def test_a_simulation_reports_epsilon_every_round_and_stops_at_its_budget():
    acc = Accountant(1.0, "fixed", 20, 5, 1e-5)
    cfg = load_config(None, [*TINY, "run.rounds=10", f"privacy.epsilon_budget={acc.epsilon(4) + 1e-6}"])
    result = simulate(cfg, progress=False, write=False)
    assert [r["round"] for r in result.history] == [1, 2, 3, 4]
    assert [r["dp_noise.epsilon"] for r in result.history] == pytest.approx([acc.epsilon(i) for i in range(1, 5)])
    assert result.stopped.startswith("privacy budget") and "after 4 private rounds" in result.stopped
    assert all(r["clip.clip_bound"] == 0.5 for r in result.history)


def test_a_budget_too_small_for_one_round_is_refused_when_the_run_is_built():
    cfg = load_config(None, [*TINY, "privacy.epsilon_budget=0.001"])
    with pytest.raises(ConfigError, match="not even one round fits"):
        simulate(cfg, progress=False, write=False)


@pytest.mark.parametrize("setting, key", [
    ("aggregation.reducer=\"median\"", "aggregation.reducer"),
    ("aggregation.weighting=\"examples\"", "aggregation.weighting"),
    ("server.selection=\"oort\"", "server.selection"),
    ("aggregation.centered_clip=1.0", "aggregation.centered_clip"),
])
def test_combinations_dp_cannot_cover_are_refused_with_the_key(setting, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [*TINY, setting])
    assert e.value.key == key
