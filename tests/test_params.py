import numpy as np
import pytest

from fedloom.errors import ShapeError
from fedloom.params import ParamSpec, flatten, unflatten


def test_flatten_unflatten_round_trip():
    params = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([7.0], np.float32), np.zeros((0,), np.float32)]
    spec = ParamSpec.of(params)
    vec = flatten(params)
    assert vec.shape == (7,)
    back = unflatten(vec, spec)
    for a, b in zip(params, back):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    back[0][0, 0] = 99.0
    assert params[0][0, 0] == 0.0  # a copy, not a view


def test_unflatten_rejects_wrong_size():
    spec = ParamSpec.of([np.zeros((2, 2), np.float32)])
    with pytest.raises(ShapeError, match="does not hold 4"):
        unflatten(np.zeros(5, np.float32), spec)


def test_spec_check_names_the_array():
    spec = ParamSpec.of([np.zeros(3, np.float32), np.zeros((2, 2), np.float32)])
    with pytest.raises(ShapeError, match="array 1"):
        spec.check([np.zeros(3, np.float32), np.zeros((2, 3), np.float32)], client_id=4)
    with pytest.raises(ShapeError, match="expected 2 arrays"):
        spec.check([np.zeros(3, np.float32)])
    with pytest.raises(ShapeError, match="<f8"):
        spec.check([np.zeros(3, np.float64), np.zeros((2, 2), np.float32)])
