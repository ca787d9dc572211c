"""Oort and power-of-choice selectors: small hand-checked cases."""

import dataclasses
import math

import numpy as np
import pytest

from fedloom.errors import ConfigError, StateError
from fedloom.server.adaptive import (
    ClientFeedback,
    OortSelector,
    OortState,
    PowerOfChoiceSelector,
)


def fb(cid, rnd=1, n=10, loss_sq=1.0, dur=1.0):
    return ClientFeedback(client_id=cid, round=rnd, num_examples=n, loss_sq_mean=loss_sq, duration_s=dur)


def snapshot(state):
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in vars(state).items()}


def same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key])
        else:
            assert a[key] == b[key], key


# ------------------------------------------------------------------ Oort


def test_observe_records_utility_round_and_duration():
    sel = OortSelector()
    state = sel.observe(sel.init(3), [fb(1, rnd=2, n=20, loss_sq=4.0, dur=3.5)])
    assert state.utility[1] == 20 * 2.0  # |B| * sqrt(mean squared loss)
    assert state.last_round[1] == 2 and state.duration[1] == 3.5
    assert state.last_round[0] == 0 and math.isnan(state.duration[0])


def test_epsilon_zero_exploits_highest_utility():
    sel = OortSelector(epsilon=0.0, epsilon_min=0.0, pacer_start_percentile=100)
    # utilities 10 * sqrt(loss_sq): 10, 20, 30, 40, 50 -- well apart, so the 0.95 cut-off admits only the top 2
    state = sel.observe(sel.init(5), [fb(c, loss_sq=float((c + 1) ** 2)) for c in range(5)])
    for rnd in (1, 2, 3):
        picks, _ = sel.select(rnd, list(range(5)), 2, state)
        assert sorted(picks) == [3, 4]


def test_staleness_bonus_matches_formula():
    sel = OortSelector(pacer_start_percentile=100)
    state = sel.observe(sel.init(2), [fb(0, rnd=2, n=10, loss_sq=1.0)])
    util = sel.utilities(5, [0, 1], state)
    assert list(util) == [0]  # never-tried clients have no utility
    assert util[0] == pytest.approx(10 + math.sqrt(0.1 * math.log(5) / 2))


def test_system_penalty_is_exactly_t_over_t_to_the_alpha():
    sel = OortSelector(alpha=2.0, pacer_start_percentile=50)
    feedback = [
        fb(0, n=10, loss_sq=1.0, dur=1.0),  # fast, U = 10
        fb(1, n=10, loss_sq=1.0, dur=2.0),
        fb(2, n=10, loss_sq=1.0, dur=3.0),
        fb(3, n=20, loss_sq=1.0, dur=10.0),  # slow, U = 20
    ]
    state = sel.observe(sel.init(4), feedback)
    assert sel.preferred_duration(state) == 3.0  # sorted durations [1, 2, 3, 10][floor(4 * 0.5)]
    util = sel.utilities(1, [0, 1, 2, 3], state)  # round 1: log(1) = 0, no bonus
    assert util[0] == 10.0
    assert util[3] == pytest.approx(20.0 * (3.0 / 10.0) ** 2)  # 1.8, below the fast client's 10
    assert util[3] < util[0]
    unpenalised = sel.utilities(1, [3], dataclasses.replace(state, pacer_percentile=100.0))  # T = inf
    assert unpenalised[3] == 20.0


def test_utility_clipped_to_percentile():
    sel = OortSelector(utility_clip_percentile=50, pacer_start_percentile=100)
    state = sel.observe(sel.init(4), [fb(c, loss_sq=float((c + 1) ** 2)) for c in range(4)])  # 10, 20, 30, 40
    util = sel.utilities(1, [0, 1, 2, 3], state)
    assert [util[c] for c in range(4)] == [10.0, 20.0, 30.0, 30.0]  # clipped at sorted[floor(4 * 0.5)] = 30


def test_exploration_picks_untried_clients():
    sel = OortSelector(epsilon=0.5, epsilon_min=0.5, pacer_start_percentile=100)
    state = sel.observe(sel.init(20), [fb(c, loss_sq=float((c + 1) ** 2)) for c in range(4)])
    picks, new = sel.select(1, list(range(20)), 4, state)
    assert len(picks) == 4 and len(set(picks)) == 4
    assert sorted(picks[:2]) == [2, 3]  # floor(0.5 * 4) = 2 exploited: the top two
    assert all(p >= 4 for p in picks[2:])  # the rest never tried
    assert new.last_exploit == {2, 3}


def test_all_untried_explores_uniformly_and_fills_k():
    sel = OortSelector(epsilon=0.0, epsilon_min=0.0)
    picks, _ = sel.select(1, list(range(10)), 3, sel.init(10))
    assert len(set(picks)) == 3 and all(0 <= p < 10 for p in picks)


def test_fewer_candidates_than_k_returns_all():
    sel = OortSelector()
    state = sel.observe(sel.init(5), [fb(1)])
    picks, _ = sel.select(1, [4, 1, 2], 5, state)
    assert sorted(picks) == [1, 2, 4]


def test_epsilon_decays_each_round_to_floor():
    sel = OortSelector(epsilon=0.9, epsilon_decay=0.5, epsilon_min=0.2)
    state = sel.init(4)
    seen = []
    for rnd in range(1, 6):
        seen.append(state.epsilon)
        _, state = sel.select(rnd, [0, 1, 2, 3], 2, state)
    assert seen == pytest.approx([0.9, 0.45, 0.225, 0.2, 0.2])
    assert OortSelector().init(1).epsilon == 0.9


def test_pacer_relaxes_t_after_utility_stalls():
    sel = OortSelector(epsilon=0.0, epsilon_min=0.0, pacer_start_percentile=25, pacer_step=50, pacer_window=1)
    durations = [1.0, 2.0, 3.0, 4.0]
    state = sel.observe(sel.init(4), [fb(c, n=10, dur=d) for c, d in enumerate(durations)])
    assert sel.preferred_duration(state) == 2.0  # [1, 2, 3, 4][floor(4 * 0.25)]

    picks, state = sel.select(1, [0, 1, 2, 3], 2, state)
    assert state.pacer_percentile == 25  # nothing to compare yet
    state = sel.observe(state, [fb(c, rnd=1, n=100, dur=durations[c]) for c in picks])  # utility 200
    picks, state = sel.select(2, [0, 1, 2, 3], 2, state)
    assert state.util_history == (200.0,) and state.pacer_percentile == 25
    state = sel.observe(state, [fb(c, rnd=2, n=50, dur=durations[c]) for c in picks])  # utility fell to 100
    picks, state = sel.select(3, [0, 1, 2, 3], 2, state)
    assert state.util_history == (200.0, 100.0)
    assert state.pacer_percentile == 75 and state.preferred_duration == 4.0  # [1, 2, 3, 4][3]

    state = sel.observe(state, [fb(c, rnd=3, n=80, dur=durations[c]) for c in picks])  # rose: no change
    _, state = sel.select(4, [0, 1, 2, 3], 2, state)
    assert state.pacer_percentile == 75


def test_pacer_percentile_capped_at_100_means_no_penalty():
    sel = OortSelector(pacer_start_percentile=100)
    state = sel.observe(sel.init(2), [fb(0, dur=1.0), fb(1, dur=50.0)])
    assert sel.preferred_duration(state) == math.inf


def test_oort_never_mutates_its_input_state():
    sel = OortSelector(epsilon=0.5)
    state = sel.observe(sel.init(6), [fb(c, loss_sq=float(c + 1), dur=c + 1.0) for c in range(3)])
    before = snapshot(state)
    feedback = [fb(4, rnd=2)]
    picks, new = sel.select(2, list(range(6)), 3, state)
    after_observe = sel.observe(new, feedback)
    same(before, snapshot(state))
    assert new is not state and after_observe is not new
    assert not state.utility.flags.writeable  # arrays are read-only, so no caller can mutate them either
    with pytest.raises(ValueError):
        state.utility[0] = 1.0


def test_oort_reproducible_and_round_keyed():
    sel = OortSelector(seed=7, epsilon=0.5, epsilon_min=0.5, cutoff_fraction=0.1)
    state = sel.observe(sel.init(50), [fb(c, loss_sq=1.0 + c % 3) for c in range(20)])
    a, sa = sel.select(9, list(range(50)), 10, state)
    b, sb = sel.select(9, list(range(50)), 10, state)
    assert a == b
    assert isinstance(sa, OortState) and sa.epsilon == sb.epsilon
    # draws of round 9 do not depend on which rounds were drawn before
    sel.select(3, list(range(50)), 10, state)
    assert sel.select(9, list(range(50)), 10, state)[0] == a
    others = {tuple(sel.select(r, list(range(50)), 10, state)[0]) for r in range(1, 6)}
    assert len(others) > 1
    assert OortSelector(seed=8, epsilon=0.5, epsilon_min=0.5).select(9, list(range(50)), 10, state)[0] != a


def test_exploit_samples_by_utility_among_cutoff():
    # utilities 10, 10, 10, 1: cut-off 0.95 * 10 admits 0, 1, 2; two are drawn, never client 3
    sel = OortSelector(epsilon=0.0, epsilon_min=0.0, pacer_start_percentile=100)
    state = sel.observe(sel.init(4), [fb(0), fb(1), fb(2), fb(3, loss_sq=0.01)])
    chosen = {tuple(sorted(sel.select(r, [0, 1, 2, 3], 2, state)[0])) for r in range(1, 40)}
    assert chosen == {(0, 1), (0, 2), (1, 2)}


@pytest.mark.parametrize(
    "field, value",
    [
        ("alpha", -1.0),
        ("epsilon", 1.5),
        ("epsilon_decay", 0.0),
        ("epsilon_min", -0.1),
        ("pacer_start_percentile", 101),
        ("pacer_step", -5),
        ("pacer_window", 0),
        ("staleness_weight", -0.1),
        ("utility_clip_percentile", 0),
        ("cutoff_fraction", 1.5),
    ],
)
def test_oort_bad_hyperparameters_raise_config_error(field, value):
    with pytest.raises(ConfigError) as info:
        OortSelector(**{field: value})
    assert info.value.key == f"oort.{field}"
    assert field in str(info.value)


def test_bad_calls_raise():
    sel = OortSelector()
    state = sel.init(3)
    with pytest.raises(ConfigError) as info:
        sel.select(0, [0, 1], 1, state)
    assert info.value.key == "select.round"
    with pytest.raises(ConfigError):
        sel.select(1, [0, 1], -1, state)
    with pytest.raises(StateError):
        sel.select(1, [0, 7], 1, state)
    with pytest.raises(StateError):
        sel.observe(state, [fb(9)])
    with pytest.raises(StateError):
        sel.observe(state, [fb(0, loss_sq=float("nan"))])


# ------------------------------------------------------------------ power-of-choice


def test_power_of_choice_takes_highest_loss_among_all_when_d_covers_everyone():
    sel = PowerOfChoiceSelector(d=6)
    losses = [0.5, 3.0, 1.0, 9.0, 2.0, 0.1]
    state = sel.observe(sel.init(6), [fb(c, loss_sq=loss) for c, loss in enumerate(losses)])
    picks, new = sel.select(1, list(range(6)), 2, state)
    assert picks == [3, 1] and new is state


def test_power_of_choice_picks_highest_loss_among_sampled():
    sel = PowerOfChoiceSelector(d=4, seed=3)
    rng = np.random.RandomState(0)
    losses = rng.uniform(size=20)
    state = sel.observe(sel.init(20), [fb(c, n=5 + c, loss_sq=float(losses[c])) for c in range(20)])
    global_top = set(np.argsort(-losses)[:2])
    missed = 0
    for rnd in range(1, 60):
        drawn = sel.sample_candidates(rnd, list(range(20)), 2, state)
        assert len(drawn) == 4 and len(set(drawn)) == 4
        picks, _ = sel.select(rnd, list(range(20)), 2, state)
        assert picks == sorted(drawn, key=lambda c: -losses[c])[:2]
        missed += set(picks) != global_top
    assert missed > 0  # d < n: sometimes the global top is not in the candidate set


def test_power_of_choice_unseen_clients_first():
    sel = PowerOfChoiceSelector(d=5)
    state = sel.observe(sel.init(5), [fb(c, loss_sq=100.0) for c in range(4)])
    picks, _ = sel.select(1, list(range(5)), 1, state)
    assert picks == [4]


def test_power_of_choice_samples_proportionally_to_size():
    sizes = [10, 20, 30, 40]
    sel = PowerOfChoiceSelector(d=1, seed=11)
    state = sel.observe(sel.init(4), [fb(c, n=n) for c, n in enumerate(sizes)])
    rounds = 4000
    counts = np.zeros(4)
    for rnd in range(1, rounds + 1):
        (pick,), _ = sel.select(rnd, [0, 1, 2, 3], 1, state)
        counts[pick] += 1
    expected = np.array(sizes) / sum(sizes)
    np.testing.assert_allclose(counts / rounds, expected, atol=0.03)


def test_power_of_choice_unknown_size_gets_mean_weight():
    sel = PowerOfChoiceSelector(d=1, seed=5)
    state = sel.observe(sel.init(3), [fb(0, n=10), fb(1, n=30)])  # client 2 unseen: weight 20
    counts = np.zeros(3)
    for rnd in range(1, 3001):
        counts[sel.sample_candidates(rnd, [0, 1, 2], 1, state)[0]] += 1
    np.testing.assert_allclose(counts / 3000, [1 / 6, 1 / 2, 1 / 3], atol=0.03)


def test_power_of_choice_reproducible_and_pure():
    sel = PowerOfChoiceSelector(d=5, seed=2)
    state = sel.observe(sel.init(30), [fb(c, n=c + 1, loss_sq=float(c % 7)) for c in range(30)])
    before = snapshot(state)
    a, _ = sel.select(4, list(range(30)), 3, state)
    sel.select(2, list(range(30)), 3, state)
    assert sel.select(4, list(range(30)), 3, state)[0] == a
    same(before, snapshot(state))
    assert len(sel.select(1, [3, 4], 3, state)[0]) == 2  # fewer candidates than k: all of them


def test_power_of_choice_bad_d():
    with pytest.raises(ConfigError) as info:
        PowerOfChoiceSelector(d=0)
    assert info.value.key == "power_of_choice.d"


def test_oort_feedback_without_a_loss_or_a_duration_keeps_what_it_knew():
    sel = OortSelector()
    state = sel.observe(sel.init(3), [fb(0, rnd=1, n=10, loss_sq=4.0, dur=5.0)])
    assert state.utility[0] == pytest.approx(20.0) and state.duration[0] == 5.0
    # a straggler the server stopped waiting for: a (lower-bound) duration, no loss
    state = sel.observe(state, [fb(0, rnd=2, loss_sq=None, dur=30.0), fb(1, rnd=2, loss_sq=None, dur=30.0)])
    assert state.utility[0] == pytest.approx(20.0) and state.duration[0] == 30.0 and state.last_round[0] == 2
    assert state.utility[1] == 0.0 and state.last_round[1] == 2  # explored now: it will not be re-explored
    # a report without a measured duration (no clock) keeps the last duration
    state = sel.observe(state, [fb(0, rnd=3, n=10, loss_sq=1.0, dur=None)])
    assert state.utility[0] == pytest.approx(10.0) and state.duration[0] == 30.0


def test_power_of_choice_ignores_feedback_without_a_loss():
    sel = PowerOfChoiceSelector(d=2)
    state = sel.observe(sel.init(2), [fb(0, n=7, loss_sq=2.0), fb(1, loss_sq=None, dur=9.0)])
    assert list(state.num_examples) == [7, -1] and state.loss_sq_mean[0] == 2.0 and math.isnan(state.loss_sq_mean[1])
