import numpy as np
import pytest

from fedloom.aggregation import weighted_mean
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
