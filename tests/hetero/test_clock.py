"""The simulated clock of a synchronous round: arrivals, over-selection, deadlines, dropouts, traffic."""

import math

import numpy as np
import pytest

from fedloom.config import load_config
from fedloom.hetero.clock import message_bytes, run_clock, shrink_to_deadline, steps_that_fit
from fedloom.hetero.profiles import REFERENCE_FLOPS, DeviceProfile, task_duration
from fedloom.messages import TrainConfig, TrainReply, TrainRequest, Update
from fedloom.simulation.runner import simulate

PARAMS = [np.zeros(1000, np.float32)]
FLOPS = REFERENCE_FLOPS  # one reference sample each: compute time = samples / compute_sps


def trip(cid, examples, rnd=1):
    req = TrainRequest(cid, rnd, PARAMS, TrainConfig(batch_size=10))
    rep = TrainReply(cid, rnd, update=Update([np.ones(1000, np.float32)], 50.0, metrics={"examples": examples}))
    return req, rep


def profile(sps, dropout=0.0):
    return DeviceProfile(compute_sps=sps, down_bps=8e6, up_bps=8e6, latency_s=0.5, dropout_p=dropout)


def expected(p, examples, req, rep):
    return task_duration(p, FLOPS, examples, message_bytes(req), message_bytes(rep))


def test_first_k_arrivals_are_kept_and_the_round_ends_with_the_kth():
    profiles = [profile(10.0), profile(100.0), profile(1.0)]
    trips = [trip(c, 40) for c in range(3)]
    reqs, reps = [t[0] for t in trips], [t[1] for t in trips]
    clock = run_clock(100.0, reqs, reps, profiles, FLOPS, k=2, deadline_s=0, seed=0)
    d = [expected(p, 40, q, r) for p, q, r in zip(profiles, reqs, reps)]
    assert d[1] < d[0] < d[2]  # 40 samples: 4.5 s, 0.9 s, 40.5 s (+ transfer)
    assert clock.end_s == pytest.approx(100.0 + d[0])
    assert clock.replies[0] is reps[0] and clock.replies[1] is reps[1]
    assert clock.replies[2].error.code == "not_kept" and "over-selected" in clock.replies[2].error.reason
    assert clock.trips == 3
    # what the server measured: the kept clients' round trips, and how long it waited for the third
    assert clock.durations == pytest.approx({0: d[0], 1: d[1], 2: d[0]})
    assert clock.bytes_down == sum(message_bytes(q) for q in reqs)
    assert clock.bytes_up == sum(message_bytes(r) for r in reps)


def test_deadline_drops_stragglers_and_the_server_waits_it_out():
    profiles = [profile(100.0), profile(1.0)]
    reqs, reps = zip(*[trip(c, 40) for c in range(2)])
    clock = run_clock(0.0, reqs, reps, profiles, FLOPS, k=2, deadline_s=10.0, seed=0)
    assert clock.replies[0] is reps[0]
    assert "straggler" in clock.replies[1].error.reason and "10 s deadline" in clock.replies[1].error.reason
    assert clock.end_s == 10.0
    assert clock.durations[1] == 10.0  # only a lower bound is known: the deadline


def test_dropouts_never_arrive_and_upload_nothing():
    profiles = [profile(100.0), profile(100.0, dropout=0.999999)]
    reqs, reps = zip(*[trip(c, 40) for c in range(2)])
    clock = run_clock(0.0, reqs, reps, profiles, FLOPS, k=2, deadline_s=0, seed=0)
    assert "dropped" in clock.replies[1].error.reason
    assert clock.bytes_up == message_bytes(reps[0])
    assert clock.replies[0] is reps[0]
    # fewer than k kept and no deadline: the round ends when the last event (arrival or drop) happened
    assert clock.end_s >= expected(profiles[0], 40, reqs[0], reps[0])


def test_partial_work_asks_for_the_steps_that_fit():
    slow = profile(2.0)
    req, rep = trip(0, 40)
    size = message_bytes(req)
    fit = steps_that_fit(slow, 20.0, FLOPS, 10, size, size)
    comm = task_duration(slow, FLOPS, 0, size, size)
    assert fit == math.floor((20.0 - comm) / (10 / 2.0))
    (shrunk,) = shrink_to_deadline([req], [slow], 20.0, FLOPS, [8])
    assert shrunk.config.max_steps == fit and 1 <= fit < 8
    assert task_duration(slow, FLOPS, fit * 10, size, size) <= 20.0
    (same,) = shrink_to_deadline([req], [profile(1000.0)], 20.0, FLOPS, [8])
    assert same is req  # a fast client keeps its full work


def test_simulated_time_does_not_depend_on_the_host(tmp_path):
    overrides = ["data.dataset=\"synthetic\"", "data.num_clients=50", "model.name=\"logreg\"", "run.rounds=4",
                 "server.clients_per_round=10", "eval.every=2", "hetero.population=\"mobile\"",
                 "hetero.over_select=1.3", "hetero.deadline_s=30.0", f"run.out_dir=\"{tmp_path}\""]
    a = simulate(load_config(None, overrides), progress=False)
    b = simulate(load_config(None, [*overrides, "engine.executor=\"sequential\""]), progress=False, write=False)
    times = [r["sim_time_s"] for r in a.history]
    assert times == [r["sim_time_s"] for r in b.history] and times == sorted(times) and times[0] > 0
    assert [r["trips"] for r in a.history] == [13, 26, 39, 52]
    assert all(r["accepted"] <= 10 for r in a.history)
    header = (a.run_dir / "metrics.csv").read_text().splitlines()[0]
    assert "sim_time_s,trips,bytes_down,bytes_up" in header
    assert "rejected.not_kept" in header  # over-selected and late clients, counted by their code
