"""Secure aggregation in whole simulations: the same model as a plain run on every local engine, distributed DP
noise, a compressed uplink that stays compressed when masked, the settings it refuses, and a device population
that drops out mid-protocol."""

import math

import numpy as np
import pytest
import torch

from fedloom.build import build_secure
from fedloom.config import load_config
from fedloom.errors import ConfigError
from fedloom.params import flatten
from fedloom.simulation.runner import simulate

SETTINGS = ['data.dataset="synthetic"', "data.num_clients=20", 'model.name="logreg"', "server.clients_per_round=10",
            "run.rounds=2", 'engine.executor="sequential"', 'aggregation.weighting="uniform"', "privacy.clip=1000",
            "client.lr=0.01", "eval.every=2"]
SECURE = 'secagg.mode="secagg+"'


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The models here are tiny: one thread trains them fastest, more only contend on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config(*extra: str):
    return load_config(None, [*SETTINGS, *extra])


def run(*extra: str):
    return simulate(config(*extra), progress=False, write=False)


def largest_difference(a, b) -> float:
    return float(np.abs(flatten(a) - flatten(b)).max())


@pytest.fixture(scope="module")
def plain():
    """The plain run, sequential: the engines train alike (float32 to 1e-8, far below the fixed point's step)."""
    return run()


@pytest.mark.parametrize("engine", ["sequential", "vectorized", "process"])
def test_a_secure_run_ends_with_the_plain_runs_model_within_the_fixed_point_error(engine, plain):
    cfg = config(f'engine.executor="{engine}"', "engine.workers=2", SECURE)
    secure = simulate(cfg, progress=False, write=False)
    settings = build_secure(cfg, 20)
    step = settings.bound / settings.levels  # the fixed point's resolution: 1000 / (2**31 // 10)
    # each round's mean is off by less than a step (stochastic rounding); 2 rounds, training in between
    assert 0 < largest_difference(plain.params, secure.params) < 2 * 2 * step
    for row in secure.history:
        assert row["accepted"] == row["secagg.survivors"] == 10 and row["rejected"] == 0 and "unchanged" not in row
        assert row["secagg.degree"] == 6 < 9  # a sparse graph: 6 neighbours of the 9 others
    assert secure.history[-1]["test_accuracy"] == pytest.approx(plain.history[-1]["test_accuracy"], abs=0.01)
    assert secure.history[-1]["bytes_up"] > plain.history[-1]["bytes_up"]  # 32-bit words, and the keys and shares


DP = ["privacy.clip=1.0", "privacy.noise_multiplier=0.5"]


def test_distributed_dp_noise_comes_from_the_clients_and_is_accounted_like_central_dp():
    secure = run(SECURE, *DP)
    central = run(*DP)
    epsilon = [row["distributed_noise.epsilon"] for row in secure.history]
    assert epsilon[0] < epsilon[1]
    assert epsilon == pytest.approx([row["dp_noise.epsilon"] for row in central.history])  # the same guarantee
    for row in secure.history:
        assert row["secagg.survivors"] == 10
        # each client adds std z C / sqrt(9) (9: the survivors a round needs); the mean of 10 carries more than the
        # central z C / 10, never less
        assert row["distributed_noise.noise_std"] == pytest.approx(0.5 * 1.0 * math.sqrt(10 / 9) / 10)
        assert row["distributed_noise.noise_std"] >= central.history[0]["dp_noise.noise_std"]
    # the noise is really in the model: one round with and without it differ by the reported noise, not more
    noisy = run(SECURE, *DP, "run.rounds=1")
    quiet = run(SECURE, "privacy.clip=1.0", "run.rounds=1")
    noise = flatten(noisy.params) - flatten(quiet.params)
    std = noisy.history[0]["distributed_noise.noise_std"]
    assert 0.85 * std < noise.std() < 1.15 * std
    assert abs(noise.mean()) < 5 * std / math.sqrt(noise.size)


MLP = ['model.name="mlp"', "client.lr=0.05", "privacy.clip=1.0", "run.rounds=4", "eval.every=1"]


def test_a_uniform8_uplink_is_masked_in_a_few_more_bits_and_the_model_still_learns():
    plain = run(*MLP)  # float32 updates
    wide = run(*MLP, SECURE)  # masked in 32-bit words
    cfg = config(*MLP, SECURE, 'compression.uplink="uniform8"')
    narrow = simulate(cfg, progress=False, write=False)
    bits = build_secure(cfg, 20).bits  # uniform8's levels, 127 a sign, summed over 10 clients without wrapping
    assert bits == (127 * 10).bit_length() + 1 == 12 <= 8 + math.ceil(math.log2(10)) + 1
    values = flatten(plain.params).size + 1  # the model's values and the weight
    saved = sum(r["bytes_up"] for r in wide.history) - sum(r["bytes_up"] for r in narrow.history)
    assert saved == pytest.approx(4 * 10 * (4 * values - math.ceil(values * bits / 8)), rel=0.01)
    assert narrow.history[-1]["total_bytes_up"] < 0.5 * plain.history[-1]["total_bytes_up"]
    assert all(r["secagg.survivors"] == 10 for r in narrow.history)
    assert narrow.history[-1]["train_loss"] < 0.6 * narrow.history[0]["train_loss"]
    assert narrow.history[-1]["test_accuracy"] > plain.history[-1]["test_accuracy"] - 0.05


REFUSED = [
    (['aggregation.reducer="median"'], "aggregation.reducer", "use mean"),
    (['aggregation.reducer="krum"'], "aggregation.reducer", "shows the server only the sum"),
    (['aggregation.weighting="examples"'], "aggregation.weighting", "use uniform, or capped"),
    (["aggregation.norm_bound=1.0"], "aggregation.norm_bound", "clipped to privacy.clip on its client"),
    (['compression.uplink="topk0.1"'], "compression.uplink", "cannot be summed masked"),
    (['compression.uplink="uniform8"', "compression.error_feedback=true"], "compression.error_feedback",
     "no residual"),
    (['server.aggregation="fedasync"', 'hetero.population="silo"'], "server.aggregation", "no sum to hide it in"),
    (["privacy.noise_multiplier=1.0", "privacy.target_quantile=0.5"], "privacy.target_quantile",
     "adaptive clipping counts unclipped updates"),
    (["server.clients_per_round=2"], "server.clients_per_round", "at least 3 clients"),
    (["secagg.bits=40"], "secagg.bits", "2..32"),
]


@pytest.mark.parametrize("extra, key, words", REFUSED)
def test_what_needs_one_update_on_the_server_is_refused_when_the_config_is_read(extra, key, words):
    with pytest.raises(ConfigError, match=words) as refused:
        config(SECURE, *extra)
    assert refused.value.key == key
    config(*extra)  # the same settings without secure aggregation are fine


def test_a_mobile_population_run_goes_through_dropouts_and_records_each_rounds_survivors():
    rounds = 4
    secure = run(SECURE, 'hetero.population="mobile"', f"run.rounds={rounds}")
    assert [row["round"] for row in secure.history] == list(range(1, rounds + 1))
    assert not secure.failed
    applied = [row for row in secure.history if "unchanged" not in row]
    assert applied  # some rounds unmasked a sum
    for row in applied:
        assert row["secagg.threshold"] <= row["secagg.survivors"] == row["accepted"] <= 10
    for row in secure.history:
        if "unchanged" in row:  # an aborted round revealed nothing and kept no update
            assert row["accepted"] == 0 and "secagg.survivors" not in row
    assert sum(row.get("rejected.secagg_dropped", 0) for row in secure.history) > 0  # devices left mid-protocol
    assert secure.history[-1]["sim_time_s"] > 0


def test_a_secure_run_resumes_to_the_same_model_bit_for_bit(tmp_path):
    # the keys are fresh each round and their masks cancel exactly: only the seeded rounding decides the sum
    whole = simulate(config("run.rounds=4", SECURE, f'run.out_dir="{tmp_path}"'), progress=False)
    half = simulate(config("run.rounds=2", SECURE, f'run.out_dir="{tmp_path}"'), progress=False)
    resumed = simulate(config("run.rounds=4", SECURE), progress=False, resume=half.run_dir)
    assert all(np.array_equal(a, b) for a, b in zip(whole.params, resumed.params))
    assert [r["round"] for r in resumed.history] == [1, 2, 3, 4]


def test_local_noise_under_secure_aggregation_is_accounted_and_budgeted():
    cfg = config("run.rounds=5", SECURE, "privacy.noise_multiplier=1.0", "privacy.local=true", "privacy.clip=1.0",
                 "privacy.epsilon_budget=22")
    result = simulate(cfg, progress=False, write=False)
    spent = [row["local_noise.epsilon"] for row in result.history]
    assert spent == sorted(spent) and spent[0] > 0
    assert result.stopped.startswith("privacy budget") and len(spent) < 5


@pytest.mark.parametrize("setting, key, words", [
    (['server.aggregation="fedbuff"', 'hetero.population="silo"', "server.buffer_size=12",
      "server.concurrency=10"], "server.buffer_size", "must not exceed server.concurrency"),
    (["secagg.corrupt_fraction=0.6", "secagg.dropout_fraction=0.5"], "secagg.corrupt_fraction", "below 1"),
    (["secagg.corrupt_fraction=0.9", "secagg.dropout_fraction=0.05"], "secagg.corrupt_fraction", "no degree"),
])
def test_secagg_plus_settings_that_cannot_hold_are_refused_when_read(setting, key, words):
    with pytest.raises(ConfigError) as err:
        config(SECURE, *setting)
    assert err.value.key == key and words in str(err.value)
