import numpy as np
import pytest

from fedloom.data import dirichlet, iid, natural, shards, split_client, to_federated
from fedloom.data.partition import classes, dirichlet_balanced, quantity, split
from fedloom.errors import DataError


def _assert_exact_cover(parts, n):
    assert all(p.dtype == np.int64 and p.ndim == 1 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == n
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


def _labels(n, classes, seed):
    return np.random.RandomState(seed).randint(0, classes, n)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n,k", [(1, 1), (10, 3), (97, 10), (1000, 7), (50, 50)])
def test_iid_covers_every_sample_once_in_near_equal_parts(seed, n, k):
    parts = iid(n, k, seed)
    assert len(parts) == k
    _assert_exact_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_is_deterministic_and_seed_dependent():
    a, b, c = iid(100, 4, 3), iid(100, 4, 3), iid(100, 4, 4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n,k,classes,alpha",
                         [(200, 5, 3, 0.5), (1000, 20, 10, 1.0), (300, 3, 2, 100.0), (60, 10, 4, 5)])
def test_dirichlet_covers_every_sample_once_with_min_size(seed, n, k, classes, alpha):
    y = _labels(n, classes, seed)
    parts = dirichlet(y, k, alpha, seed, min_size=2)
    assert len(parts) == k
    _assert_exact_cover(parts, n)
    assert min(len(p) for p in parts) >= 2


def test_dirichlet_is_deterministic_and_alpha_controls_skew():
    y = _labels(5000, 10, 0)
    a, b = dirichlet(y, 10, 0.1, seed=1), dirichlet(y, 10, 0.1, seed=1)
    assert all(np.array_equal(x, z) for x, z in zip(a, b, strict=True))

    def mean_classes_held(parts):  # classes making up 95% of each client's data, averaged
        held = []
        for p in parts:
            counts = np.sort(np.bincount(y[p], minlength=10))[::-1]
            held.append(int(np.searchsorted(np.cumsum(counts), 0.95 * len(p)) + 1))
        return np.mean(held)

    assert mean_classes_held(a) < 5 < mean_classes_held(dirichlet(y, 10, 1000.0, seed=1))


def test_dirichlet_client_order_is_not_sorted_by_class():
    y = np.repeat(np.arange(4), 100)
    for p in dirichlet(y, 2, 10.0, seed=0):
        assert not np.all(np.diff(y[p]) >= 0)


@pytest.mark.parametrize("kwargs", [{"alpha": 0.0}, {"alpha": -1.0}, {"num_clients": 0}, {"num_clients": 11},
                                    {"min_size": 6}])
def test_dirichlet_rejects_bad_arguments(kwargs):
    args = {"labels": np.arange(10) % 2, "num_clients": 2, "alpha": 1.0, "seed": 0} | kwargs
    with pytest.raises(DataError):
        dirichlet(**args)


def test_dirichlet_gives_up_with_a_clear_error():
    y = np.repeat(np.arange(2), 10)
    with pytest.raises(DataError, match="tries"):
        dirichlet(y, 10, 1e-3, seed=0, min_size=2)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n,k,spc", [(100, 5, 2), (1797, 10, 2), (103, 4, 3), (20, 10, 2), (7, 1, 1)])
def test_shards_cover_every_sample_once(seed, n, k, spc):
    y = _labels(n, 10, seed)
    parts = shards(y, k, spc, seed)
    assert len(parts) == k
    _assert_exact_cover(parts, n)
    size = n // (k * spc)
    sizes = sorted(len(p) for p in parts)
    assert sizes[:-1] == [size * spc] * (k - 1)  # only the client with the last shard gets the remainder
    assert sizes[-1] == size * spc + n % (k * spc)


def test_shards_are_label_sorted_runs():
    y = np.repeat(np.arange(10), 10)  # 10 classes x 10 samples; 10 shards of 10 = one class each
    parts = shards(y, 5, 2, seed=0)
    for p in parts:
        assert len(np.unique(y[p])) == 2
    assert sorted(c for p in parts for c in np.unique(y[p])) == list(range(10))
    assert all(np.array_equal(a, b) for a, b in zip(parts, shards(y, 5, 2, seed=0), strict=True))


def test_shards_reject_too_many_shards():
    with pytest.raises(DataError):
        shards(np.zeros(5), 3, 2, seed=0)
    with pytest.raises(DataError):
        shards(np.zeros(5), 1, 0, seed=0)


def test_natural_groups_by_sorted_key_keeping_order():
    keys = np.array(["bob", "amy", "bob", "cat", "amy", "bob"])
    names, parts = natural(keys)
    assert names == ["amy", "bob", "cat"]
    assert [p.tolist() for p in parts] == [[1, 4], [0, 2, 5], [3]]
    for seed in range(5):
        ints = np.random.RandomState(seed).randint(0, 7, 200)
        names, parts = natural(ints)
        assert names == sorted(set(ints.tolist()))
        _assert_exact_cover(parts, 200)
        for name, p in zip(names, parts, strict=True):
            assert np.all(ints[p] == name) and np.all(np.diff(p) > 0)
    assert natural([]) == ([], [])


def test_to_federated_splits_each_client_in_the_given_order():
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    y = np.arange(10)
    ds = to_federated("toy", x, y, [np.array([9, 0, 1, 2, 3]), np.array([4, 5, 6, 7, 8])], 10,
                      train_fraction=0.6, names=["a", "b"])
    assert ds.name == "toy" and len(ds) == 2 and ds.num_classes == 10
    assert ds[0].y_train.tolist() == [9, 0, 1] and ds[0].y_test.tolist() == [2, 3] and ds[0].name == "a"
    np.testing.assert_array_equal(ds[0].x_train, x[[9, 0, 1]])
    assert ds[1].y_train.tolist() == [4, 5, 6] and ds[1].name == "b"
    assert (ds.num_train, ds.num_test) == (6, 4)
    shuffled = to_federated("toy", x, y, [np.arange(10)], 10, seed=3)
    assert sorted(shuffled[0].y_train.tolist() + shuffled[0].y_test.tolist()) == list(range(10))
    assert shuffled[0].y_train.tolist() != list(range(8))


@pytest.mark.parametrize("parts,kw", [([np.array([0]), np.array([], np.int64)], {}), ([np.array([10])], {}),
                                      ([np.array([0])], {"names": ["a", "b"]}),
                                      ([np.array([0])], {"train_fraction": 0.0})])
def test_to_federated_rejects_bad_parts(parts, kw):
    with pytest.raises(DataError):
        to_federated("toy", np.zeros((10, 2)), np.zeros(10), parts, 2, **kw)


def test_split_client_uses_int_of_fraction():
    c = split_client(3, np.zeros((9, 1)), np.arange(9), 0.8, name="n")
    assert (c.client_id, c.num_train, c.num_test, c.name) == (3, 7, 2, "n")


def _every_index_once(parts, n):
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))


@pytest.mark.parametrize("sizes", ["lognormal", "power_law"])
def test_quantity_skew_keeps_labels_iid_and_makes_sizes_unequal(sizes):
    parts = quantity(10_000, 100, seed=0, sizes=sizes, skew=1.0)
    _every_index_once(parts, 10_000)
    counts = np.array([len(p) for p in parts])
    assert counts.min() >= 1 and counts.max() > 4 * np.median(counts)  # a heavy tail
    assert [len(p) for p in quantity(10_000, 100, seed=0, sizes=sizes)] == counts.tolist()  # same seed, same split
    mild = np.array([len(p) for p in quantity(10_000, 100, seed=0, sizes="lognormal", skew=0.1)])
    assert mild.max() < 1.5 * np.median(mild)
    with pytest.raises(DataError, match="unknown size law"):
        quantity(10, 2, seed=0, sizes="zipf")


def test_classes_gives_each_client_exactly_k_classes():
    labels = np.repeat(np.arange(10), 50)
    parts = classes(labels, 20, classes_per_client=2, seed=0)
    _every_index_once(parts, 500)
    assert all(len(np.unique(labels[p])) == 2 for p in parts)
    with pytest.raises(DataError, match="cannot hold all 10 classes"):
        classes(labels, 4, classes_per_client=2, seed=0)
    with pytest.raises(DataError, match="between 1 and the 10 classes"):
        classes(labels, 4, classes_per_client=11, seed=0)


def test_dirichlet_balanced_has_equal_sizes_and_skewed_labels():
    labels = np.repeat(np.arange(10), 100)

    def top_share(alpha):
        parts = dirichlet_balanced(labels, 20, alpha, seed=0)
        _every_index_once(parts, 1000)
        assert {len(p) for p in parts} == {50}
        return np.mean([np.bincount(labels[p]).max() / len(p) for p in parts])

    assert top_share(0.1) > 0.5 and top_share(100.0) < 0.35


def test_split_names_every_partition():
    labels = np.repeat(np.arange(4), 25)
    for name in ["iid", "dirichlet", "dirichlet_balanced", "shards", "classes", "lognormal", "power_law"]:
        _every_index_once(split(name, labels, 5, seed=1), 100)
    with pytest.raises(DataError, match="unknown partition"):
        split("natural", labels, 5, seed=1)
