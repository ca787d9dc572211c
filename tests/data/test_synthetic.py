import numpy as np
import pytest

from fedloom.data import synthetic, synthetic_arrays
from fedloom.errors import DataError


def _reference(alpha, beta, k, d, c, seed, cap, only=None):
    """The generator written out step by step from the specification (the first ``only`` clients)."""
    rng = np.random.RandomState(seed)
    n = np.minimum(rng.lognormal(4, 2, k).astype(int) + 50, cap)
    u = rng.normal(0, alpha, k)
    b_mean = rng.normal(0, beta, k)
    v = np.stack([rng.normal(b_mean[i], 1, d) for i in range(k)])
    sigma = np.array([j ** -1.2 for j in range(1, d + 1)])
    out = []
    for i in range(k if only is None else only):
        w = rng.normal(u[i], 1, (c, d))
        b = rng.normal(u[i], 1, c)
        x = rng.normal(v[i], np.sqrt(sigma), (n[i], d))
        logits = np.array([[x[s] @ w[j] + b[j] for j in range(c)] for s in range(n[i])])
        out.append((x, logits.argmax(axis=1)))
    return out


def test_matches_the_generator_formula_by_hand():
    got = synthetic_arrays(alpha=0.5, beta=2.0, num_clients=4, dim=5, num_classes=3, seed=7, max_samples=80)
    ref = _reference(0.5, 2.0, 4, 5, 3, 7, 80)
    assert len(got) == 4
    for (x, y), (rx, ry) in zip(got, ref, strict=True):
        assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == rx.shape
        np.testing.assert_array_equal(x, rx.astype(np.float32))
        np.testing.assert_array_equal(y, ry)
        assert 50 <= len(y) <= 80


def test_benchmark_setting_shapes_and_determinism():
    ds = synthetic()  # W-A: alpha = beta = 1, 1000 clients, 60 features, 10 classes, seed 0
    assert ds.name == "synthetic" and len(ds) == 1000 and ds.num_classes == 10
    ref = _reference(1.0, 1.0, 1000, 60, 10, 0, 1000, only=3)
    for c, (rx, ry) in zip(ds.clients[:3], ref, strict=True):
        n_train = int(0.8 * len(ry))
        assert c.x_train.shape == (n_train, 60) and c.num_test == len(ry) - n_train
        np.testing.assert_array_equal(c.x_train, rx[:n_train].astype(np.float32))
        np.testing.assert_array_equal(c.y_train, ry[:n_train])
        np.testing.assert_array_equal(c.y_test, ry[n_train:])
    sizes = [c.num_train + c.num_test for c in ds.clients]
    assert min(sizes) >= 50 and max(sizes) <= 1000
    again = synthetic(num_clients=1000)
    np.testing.assert_array_equal(again[999].x_test, ds[999].x_test)
    assert not np.array_equal(synthetic(num_clients=2, seed=1)[0].y_train[:10], ds[0].y_train[:10])


@pytest.mark.parametrize("kw", [{"alpha": -1.0}, {"beta": -0.1}, {"num_clients": 0}, {"num_classes": 1},
                                {"train_fraction": 0.0}])
def test_rejects_bad_arguments(kw):
    with pytest.raises(DataError):
        synthetic(**({"num_clients": 2} | kw))
