"""Every stage on tiny hand-computed cases, and chains equal to their stages applied by hand."""

import math

import numpy as np
import pytest

from fedloom.aggregation.aggregator import chain
from fedloom.aggregation.reducers import coordinate_median, weighted_mean
from fedloom.client.pipeline import ClientPipeline
from fedloom.errors import ConfigError
from fedloom.messages import TrainConfig, TrainRequest, Update
from fedloom.params import ParamSpec
from fedloom.seeding import keyed_rng
from fedloom.server.selection import UniformSelector
from fedloom.stages.attacks import HUGE_CLAIM, Attack, attackers
from fedloom.stages.base import ClientContext, Context, Contribution, SecureNoise, SeededNoise
from fedloom.stages.clipping import CenteredClip, Clip, MaxNorm, NormBound
from fedloom.stages.privacy import GaussianNoise, LocalNoise
from fedloom.stages.weighting import Weighting

SPEC = ParamSpec(((2,),), ("<f4",))


def c(cid, delta, examples=1.0, scale=1.0, **metrics):
    return Contribution(cid, [np.array(delta, np.float32)], examples, examples, scale, metrics)


def run(aggregator, contributions, round=1, expected=None):
    state = aggregator.init(SPEC)
    return aggregator.aggregate(contributions, state, round, expected or len(contributions))


def test_weighting_modes():
    ctx = Context(1, 1)
    assert Weighting("examples").update(c(0, [0, 0], 40), {}, ctx).weight == 40
    assert Weighting("uniform").update(c(0, [0, 0], 40), {}, ctx).weight == 1
    assert Weighting("capped", 25).update(c(0, [0, 0], 40), {}, ctx).weight == 25
    assert Weighting("capped", 25).update(c(0, [0, 0], 10), {}, ctx).weight == 10
    with pytest.raises(ConfigError):
        Weighting("capped")


def test_examples_weighting_and_uniform_weighting_by_hand():
    updates = [c(0, [1, 0], 1), c(1, [4, 4], 3)]
    np.testing.assert_allclose(run(chain(Weighting("examples"), weighted_mean), updates).delta[0], [3.25, 3.0])
    np.testing.assert_allclose(run(chain(Weighting("uniform"), weighted_mean), updates).delta[0], [2.5, 2.0])


def test_clip_on_the_client_and_again_on_the_server():
    stage = Clip(1.0)
    state = stage.init(SPEC)
    assert stage.broadcast(state) == {"bound": 1.0}
    ctx = ClientContext(0, 1, [np.zeros(2, np.float32)], {"clip.bound": 1.0})
    sent = stage.client(Update([np.array([3, 4], np.float32)], 5.0), ctx)
    np.testing.assert_allclose(sent.values[0], [0.6, 0.8])
    assert sent.metrics["clip_norm"] == pytest.approx(5.0)
    liar = stage.update(c(1, [30, 40]), state, Context(1, 2))  # a client that skipped its clip
    np.testing.assert_allclose(liar.delta[0], [0.6, 0.8], rtol=1e-6)
    _, m = stage.observe([np.zeros(2, np.float32)], [liar, stage.update(c(2, [0.1, 0]), state, Context(1, 2))],
                         state, Context(1, 2))
    assert m == {"clip_bound": 1.0, "clipped": 0.5}


def test_adaptive_clipping_moves_the_bound_geometrically():
    stage = Clip(1.0, target_quantile=0.5, lr=0.2)
    state = stage.init(SPEC)
    ctx = Context(1, 4)
    kept = [stage.update(c(i, [n, 0]), state, ctx) for i, n in enumerate([0.5, 0.5, 2.0, 2.0])]
    new, _ = stage.observe([np.zeros(2, np.float32)], kept, state, ctx)  # half unclipped: on target
    assert float(new["bound"]) == pytest.approx(1.0)
    kept = [stage.update(c(i, [0.5, 0]), state, ctx) for i in range(4)]  # all under: the bound shrinks
    new, _ = stage.observe([np.zeros(2, np.float32)], kept, state, ctx)
    assert float(new["bound"]) == pytest.approx(math.exp(-0.2 * (1.0 - 0.5)))


def test_norm_bound_and_centered_clip_by_hand():
    np.testing.assert_allclose(NormBound(2.0).update(c(0, [3, 4]), {}, Context(1, 1)).delta[0], [1.2, 1.6])
    stage = CenteredClip(1.0)
    state = stage.init(SPEC)
    np.testing.assert_allclose(stage.update(c(0, [3, 4]), state, Context(1, 1)).delta[0], [0.6, 0.8])
    state, _ = stage.observe([np.array([10, 0], np.float32)], [], state, Context(1, 1))
    # now around the last aggregate [10, 0]: [13, 4] is 5 away, clipped to distance 1
    np.testing.assert_allclose(stage.update(c(0, [13, 4]), state, Context(2, 1)).delta[0], [10.6, 0.8])


def test_centered_clipping_chain_equals_the_paper_step():
    agg = chain(Weighting("uniform"), CenteredClip(1.0), weighted_mean)
    state = agg.init(SPEC)
    first = agg.aggregate([c(0, [3, 4]), c(1, [0, 0.5])], state, 1, 2)
    np.testing.assert_allclose(first.delta[0], [0.3, 0.65])  # mean of [0.6, 0.8] and [0, 0.5]
    second = agg.aggregate([c(0, [100, 0.65]), c(1, [0.3, 0.65])], first.state, 2, 2)
    np.testing.assert_allclose(second.delta[0], [0.8, 0.65], rtol=1e-6)  # v + mean(clip(x - v)): [0.3 + 0.5, 0.65]


def test_a_chain_equals_its_stages_applied_by_hand():
    updates = [c(0, [3, 4], 10), c(1, [0.3, 0.4], 30), c(2, [-6, 8], 20)]
    got = run(chain(Weighting("capped", 20), NormBound(1.0), weighted_mean), updates)
    by_hand = []
    for u in updates:
        d = u.delta[0] * min(1.0, 1.0 / np.linalg.norm(u.delta[0]))
        by_hand.append((d, min(u.examples, 20)))
    expected = sum(d * w for d, w in by_hand) / sum(w for _, w in by_hand)
    np.testing.assert_allclose(got.delta[0], expected, rtol=1e-6)
    assert got.kept == [0, 1, 2] and got.rejected == {}


def test_staleness_scales_weights_and_damps_the_aggregate_as_fedbuff_did():
    updates = [c(0, [1, 1], 1, scale=1.0), c(1, [4, 0], 3, scale=0.5)]
    got = run(chain(Weighting("examples"), weighted_mean), updates)
    # FedBuff's pre-scaled form: (1 * [1, 1] + 3 * 0.5 * [4, 0]) / (1 + 3)
    np.testing.assert_allclose(got.delta[0], [1.75, 0.25], rtol=1e-6)


def test_an_update_above_the_norm_limit_is_refused_with_its_norm():
    got = run(chain(MaxNorm(1e6), weighted_mean), [c(0, [3e38, 3e38]), c(1, [0.5, 0.5])])
    assert got.kept == [1] and got.rejected[0].startswith("max_norm: its L2 norm 4.24e+38 is above 1e+06")
    np.testing.assert_allclose(got.delta[0], [0.5, 0.5])


def test_a_non_finite_aggregate_is_not_applied():
    noisy = chain(Weighting("uniform"), Clip(1e38), weighted_mean, GaussianNoise(1e10))
    bad = run(noisy, [c(0, [3e38, 3e38])])
    assert bad.delta is None and bad.problem == "the aggregate is not finite"


def test_dp_noise_uses_the_fixed_denominator_and_the_clip_bound():
    agg = chain(Weighting("uniform"), Clip(1.0), weighted_mean, GaussianNoise(2.0), noise=SeededNoise(7))
    got = run(agg, [c(0, [0.6, 0]), c(1, [0, 0.6])], round=3, expected=4)
    std = 2.0 * 1.0 / 4
    noise = keyed_rng(7, 3, 5, 0).normal(0.0, std, (2,))
    np.testing.assert_allclose(got.delta[0], np.array([0.3, 0.3]) * 2 / 4 + noise, rtol=1e-5)
    assert got.measurements["dp_noise.noise_std"] == pytest.approx(std)
    assert int(got.state[-1]["rounds"]) == 1


@pytest.mark.parametrize("parts, words", [
    ((Weighting(), NormBound()), "exactly one reducer, got 0"),
    ((weighted_mean, coordinate_median), "exactly one reducer, got 2"),
    ((weighted_mean, NormBound()), "norm_bound acts on each update: put it before the reducer"),
    ((GaussianNoise(), weighted_mean), "dp_noise acts on the aggregate: put it after the reducer"),
    ((NormBound(), NormBound(2.0), weighted_mean), "appears twice"),
    ((Weighting("uniform"), weighted_mean, GaussianNoise()), "put a Clip stage before the reducer"),
    ((Weighting("uniform"), Clip(), coordinate_median, GaussianNoise()), "coordinate_median has another sensitivity"),
    ((Weighting("examples"), Clip(), weighted_mean, GaussianNoise()), "use uniform weighting"),
    ((Weighting("uniform"), LocalNoise(), Clip(), weighted_mean), "put it after the Clip stage"),
])
def test_invalid_chains_are_refused_saying_why(parts, words):
    with pytest.raises(ConfigError) as e:
        chain(*parts)
    assert words in str(e.value)


def test_the_client_pipeline_runs_client_halves_in_order_on_a_delta():
    agg = chain(Weighting("uniform"), Clip(1.0), LocalNoise(0.5), weighted_mean)
    pipeline = ClientPipeline(agg.client_stages(), SeededNoise(3))
    assert [s.name for s in pipeline.stages] == ["clip", "local_noise"]
    sent = [np.array([1.0, 1.0], np.float32)]
    config = TrainConfig(round=2, stage=agg.broadcast(agg.init(SPEC)))
    request = TrainRequest(5, 2, sent, config)
    out, state = pipeline.apply(request, Update([np.array([4.0, 5.0], np.float32)], 3.0, kind="params"))  # delta [3, 4]
    assert state is None  # these halves keep nothing between rounds
    noise = keyed_rng(3, 2, 5, 11, 0).normal(0.0, 0.5 * 1.0, (2,))
    np.testing.assert_allclose(out.values[0], np.array([0.6, 0.8]) + noise, rtol=1e-5)
    assert out.kind == "delta" and out.metrics["clip_norm"] == pytest.approx(5.0)


@pytest.mark.parametrize("kind, expected", [("sign_flip", [-30, -40]), ("scale", [30, 40])])
def test_attacks_transform_only_the_attackers_updates(kind, expected):
    stage = Attack(kind, frozenset({1}), strength=10.0)
    update = Update([np.array([3, 4], np.float32)], 5.0)
    honest = ClientContext(0, 1, [np.zeros(2, np.float32)], {})
    bad = ClientContext(1, 1, [np.zeros(2, np.float32)], {})
    assert stage.client(update, honest) is update
    np.testing.assert_allclose(stage.client(update, bad).values[0], expected)


def test_the_weight_and_gaussian_attacks_and_who_attacks():
    update = Update([np.array([3, 4], np.float32)], 5.0)
    ctx = ClientContext(1, 1, [np.zeros(2, np.float32)], {}, SeededNoise(0))
    assert Attack("weight", frozenset({1})).client(update, ctx).weight == HUGE_CLAIM
    noisy = Attack("gaussian", frozenset({1}), strength=2.0).client(update, ctx).values[0]
    np.testing.assert_allclose(noisy, keyed_rng(0, 1, 1, 13, 0).normal(0, 2.0, (2,)), rtol=1e-6)
    chosen = attackers(0.2, 50, seed=0)
    assert len(chosen) == 10 and chosen == attackers(0.2, 50, seed=0) != attackers(0.2, 50, seed=1)


def test_no_round_selects_the_attackers_as_a_block():
    # The attackers once came from the same random stream as round 4's selection: that round was all attackers.
    bad = attackers(0.2, 100, seed=0)
    selector = UniformSelector(0)
    most = max(len(bad & set(selector.select(r, range(100), 20)[0])) for r in range(1, 2001))
    assert most <= 12  # hypergeometric: 20 of 100 with 20 bad; P(>= 13) is about 1e-6 per round


def test_secure_noise_is_gaussian_of_the_asked_std():
    z = SecureNoise().normal((200_000,), 3.0)
    assert abs(z.mean()) < 0.05 and z.std() == pytest.approx(3.0, rel=0.02)
    assert not np.array_equal(z[:10], SecureNoise().normal((10,), 3.0))
