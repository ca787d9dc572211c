import numpy as np
import pytest

from fedloom.aggregation import weighted_mean
from fedloom.aggregation.reducers import coordinate_median, krum, trimmed_mean
from fedloom.errors import RoundError


def test_weighted_mean_hand_computed():
    a = [np.array([1.0, 2.0], np.float32), np.array([[0.0]], np.float32)]
    b = [np.array([4.0, -1.0], np.float32), np.array([[3.0]], np.float32)]
    out = weighted_mean([a, b], [1, 2])  # weights 1/3 and 2/3
    np.testing.assert_allclose(out[0], [3.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(out[1], [[2.0]], rtol=1e-6)
    assert out[0].dtype == np.float32
    np.testing.assert_array_equal(a[0], [1.0, 2.0])  # arguments untouched


def test_weighted_mean_single_update_is_identity():
    a = [np.array([0.1, 0.2, 0.3], np.float32)]
    np.testing.assert_array_equal(weighted_mean([a], [7])[0], a[0])


@pytest.mark.parametrize("values,weights", [([], []), ([[np.zeros(1)]], [0.0]), ([[np.zeros(1)]], [1, 2])])
def test_weighted_mean_rejects_bad_input(values, weights):
    with pytest.raises(RoundError):
        weighted_mean(values, weights)


def one(*values):
    """Updates of a single array each."""
    return [[np.array(v, np.float32)] for v in values]


def test_coordinate_median_by_hand():
    out = coordinate_median(one([1, 10], [2, -5], [100, 0]), [1, 1, 1])
    np.testing.assert_array_equal(out[0], [2, 0])
    out = coordinate_median(one([1, 10], [2, -5], [100, 0], [4, 4]), [1, 1, 1, 1])  # even: middle two averaged
    np.testing.assert_array_equal(out[0], [3, 2])


def test_trimmed_mean_by_hand():
    values = one([1], [2], [3], [4], [1000])
    np.testing.assert_allclose(trimmed_mean(0.2)(values, [1] * 5)[0], [3.0])  # drops 1 and 1000
    np.testing.assert_allclose(trimmed_mean(0.0)(values, [1] * 5)[0], [202.0])
    with pytest.raises(RoundError, match="drops all of 2"):
        trimmed_mean(0.5)(one([1], [2]), [1, 1])


def test_krum_picks_the_update_closest_to_its_neighbours():
    values = one([0, 0], [1, 0], [0, 1], [1, 1], [50, 50])  # four honest corners of a unit square, one outlier
    # f = 1: n - f - 2 = 2 nearest neighbours. Squared distances between corners are 1 (edges) or 2 (diagonals):
    # each corner's two nearest are its two edge neighbours, score 1 + 1 = 2; the outlier's is far larger.
    assert krum(1, 1).select(values) == [0]  # ties resolved by order: the first corner
    np.testing.assert_array_equal(krum(1, 1)(values, [1] * 5)[0], [0, 0])
    np.testing.assert_allclose(krum(1, 4)(values, [1] * 5)[0], [0.5, 0.5])  # Multi-Krum: the four corners
    np.testing.assert_allclose(krum(1, 0)(values, [1] * 5)[0], [0.5, 0.5])  # m = 0: n - f = 4, the outlier out
    with pytest.raises(RoundError, match="needs more than 4 updates, got 4"):
        krum(1)(values[:4], [1] * 4)


@pytest.mark.parametrize("reducer", [coordinate_median, trimmed_mean(0.1), krum(1, 3)])
def test_robust_reducers_keep_shapes_dtypes_and_leave_arguments_alone(reducer):
    rng = np.random.RandomState(0)
    values = [[rng.normal(size=(2, 3)).astype(np.float32), rng.normal(size=4).astype(np.float32)] for _ in range(6)]
    copies = [[a.copy() for a in v] for v in values]
    out = reducer(values, [1.0] * 6)
    assert [(a.shape, a.dtype) for a in out] == [((2, 3), np.float32), ((4,), np.float32)]
    for v, c in zip(values, copies):
        for a, b in zip(v, c):
            np.testing.assert_array_equal(a, b)
