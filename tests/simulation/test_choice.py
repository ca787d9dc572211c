"""``engine.executor = "auto"``: the engine it picks for what a run is, the line saying why, and runs that train
exactly as a run naming that engine does."""

import os

import numpy as np
import pytest
import torch

from fedloom.build import build_clients
from fedloom.config import load_config
from fedloom.simulation.choice import choose_engine, resolve_engine, step_seconds
from fedloom.simulation.runner import simulate

LOGREG = ["data.dataset=\"synthetic\"", "data.num_clients=20", "model.name=\"logreg\"", "client.lr=0.01",
          "server.clients_per_round=5", "run.rounds=3", "eval.every=3"]
LSTM = ["data.dataset=\"shakespeare\"", "data.num_clients=8", "model.hidden_size=16", "client.max_steps=3",
        "server.clients_per_round=4", "run.rounds=2", "eval.every=2", "eval.max_examples=200"]
LONG_LSTM = [*LSTM, "data.num_clients=40", "server.clients_per_round=10", "model.hidden_size=128",
             "client.max_steps=20"]  # rounds of about a second on one core


def choice(*settings):
    cfg = load_config(None, list(settings))
    work, data = build_clients(cfg)
    return choose_engine(cfg, work, data)


def test_auto_is_the_default_and_an_explicit_engine_always_wins():
    cfg = load_config(None, LOGREG)
    assert cfg.engine.executor == "auto"
    work, data = build_clients(cfg)
    for engine in ("sequential", "process", "ray"):
        explicit = load_config(None, [*LOGREG, f"engine.executor=\"{engine}\""])
        got = resolve_engine(explicit, work, data)
        assert got.engine == explicit.engine and got.reason == f"{engine}: as configured"


def test_a_model_batched_by_hand_is_vectorized_and_trains_as_the_vectorized_engine_does(tmp_path):
    got = choice(*LOGREG)
    assert got.engine.executor == "vectorized"
    assert got.reason.startswith("vectorized: the vectorized engine batches LogisticRegression")
    auto = simulate(load_config(None, [*LOGREG, f"run.out_dir=\"{tmp_path}\""]), progress=False)
    named = simulate(load_config(None, [*LOGREG, "engine.executor=\"vectorized\""]), progress=False, write=False)
    assert auto.engine == got.reason
    for a, b in zip(auto.params, named.params):
        np.testing.assert_array_equal(a, b)


def test_what_cannot_be_shared_out_trains_sequentially():
    assert choice(*LOGREG, "server.clients_per_round=1").reason == "sequential: one client per round"
    fedbuff = choice(*LOGREG, "server.aggregation=\"fedbuff\"", "server.buffer_size=2", "hetero.population=\"mobile\"")
    assert fedbuff.engine.executor == "sequential" and "one task at a time" in fedbuff.reason


def test_on_cuda_a_batchable_model_is_vectorized_and_the_lstm_too():
    # the choice reads the configured device; no GPU is needed to decide (the run itself would need one)
    for settings in (LOGREG, LSTM):
        work, data = build_clients(load_config(None, settings))
        got = choose_engine(load_config(None, [*settings, "engine.device=\"cuda\""]), work, data)
        assert got.engine.executor == "vectorized" and got.engine.device == "cuda"
        assert got.reason == "vectorized: on CUDA, a round's clients train together in one batch"


def test_the_lstm_goes_to_worker_processes_only_when_its_rounds_are_long_and_never_on_one_core():
    long_rounds = choice(*LONG_LSTM)
    assert "slower than nn.LSTM's fused kernel" in long_rounds.reason and "a local step takes" in long_rounds.reason
    if len(os.sched_getaffinity(0)) >= 2:
        assert long_rounds.engine.executor == "process" and not long_rounds.engine.vectorize
        assert long_rounds.engine.workers == min(len(os.sched_getaffinity(0)), 10)
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    try:
        one_core = choice(*LONG_LSTM)
    finally:
        os.sched_setaffinity(0, cores)
    assert one_core.engine.executor == "sequential" and one_core.reason.endswith("and there is one core")


def test_timing_a_step_leaves_torch_random_state_and_thread_count_as_they_were():
    cfg = load_config(None, LSTM)
    work, data = build_clients(cfg)
    torch.manual_seed(5)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    assert step_seconds(work, data, cfg, threads=1) > 0
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the pool needs two cores to be chosen")
def test_an_auto_run_of_the_lstm_equals_the_run_naming_the_chosen_engine():
    auto = simulate(load_config(None, LONG_LSTM), progress=False, write=False)
    assert auto.engine.startswith("process:")
    named = simulate(load_config(None, [*LONG_LSTM, "engine.executor=\"process\"", "engine.vectorize=false"]),
                     progress=False, write=False)
    for a, b in zip(auto.params, named.params):
        np.testing.assert_array_equal(a, b)
