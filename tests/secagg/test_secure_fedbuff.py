"""FedBuff with each buffer summed securely: cohorts, their buffers, and what cannot be asked of them."""

import pytest

from fedloom.config import load_config
from fedloom.errors import ConfigError
from fedloom.simulation.runner import simulate

BASE = ['data.dataset="synthetic"', "data.num_clients=40", "server.clients_per_round=20", "model.name=\"logreg\"",
        'engine.executor="sequential"', 'aggregation.weighting="uniform"', 'server.aggregation="fedbuff"',
        "server.buffer_size=6", 'hetero.population="silo"', "privacy.clip=100", "client.lr=0.01",
        'secagg.mode="secagg+"', "eval.every=1"]


def test_secure_fedbuff_learns_from_buffers_of_one_cohort_each(tmp_path):
    cfg = load_config(None, [*BASE, "run.rounds=8", f'run.out_dir="{tmp_path}"'])
    run = simulate(cfg, progress=False)
    rows = run.history
    assert len(rows) == 8
    applied = [r for r in rows if not r.get("unchanged")]
    assert len(applied) >= 6
    for r in applied:  # a buffer: the first buffer_size arrivals of its cohort, all of them in the secure sum
        assert 3 <= r["accepted"] <= 6 and r["secagg.survivors"] == r["accepted"]
        assert r["secagg.threshold"] <= r["accepted"]
        assert 0 < r["staleness_factor"] <= 1
    assert rows[-1]["test_accuracy"] > rows[0]["test_accuracy"] + 0.05
    with pytest.raises(ConfigError, match="secure FedBuff run cannot be resumed"):
        simulate(cfg, progress=False, resume=run.run_dir)


def test_fedasync_is_refused_with_secure_aggregation():
    with pytest.raises(ConfigError, match="no sum to hide it in"):
        load_config(None, [*BASE, 'server.aggregation="fedasync"'])


def test_cohorts_that_cannot_exchange_keys_spend_their_buffer_instead_of_stalling_the_run():
    # no device answers within a deadline of 0.1 ms: every cohort's key exchange fails
    cfg = load_config(None, [*BASE, "run.rounds=3", "hetero.deadline_s=0.0001"])
    run = simulate(cfg, progress=False, write=False)
    assert [r["round"] for r in run.history] == [1, 2, 3]
    assert all(r["unchanged"] == 1 and r["accepted"] == 0 for r in run.history)
    assert "model left unchanged" not in run.failed and "secure aggregation aborted" in run.failed
