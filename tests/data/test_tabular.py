import gzip
from importlib import resources

import numpy as np
import pytest

from fedloom.data import load_breast_cancer, load_digits, tabular
from fedloom.errors import DataError


def test_digits_shapes_scale_and_labels():
    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert set(np.unique(y).tolist()) == set(range(10))
    raw = gzip.decompress(resources.files("fedloom.data").joinpath("files/digits.csv.gz").read_bytes())
    first = [float(v) for v in raw.decode().splitlines()[0].split(",")]
    np.testing.assert_allclose(x[0].reshape(-1), np.array(first[:64]) / 16, rtol=1e-6)
    assert y[0] == int(first[64]) == 0


def test_breast_cancer_shapes_and_standardization():
    x, y = load_breast_cancer()
    assert x.shape == (569, 30) and x.dtype == np.float32 and y.dtype == np.int64
    assert np.bincount(y).tolist() == [212, 357]  # malignant, benign
    np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=0), 1, atol=1e-4)
    raw = resources.files("fedloom.data").joinpath("files/breast_cancer.csv").read_text().splitlines()
    assert raw[0].startswith("569,30,")
    col0 = np.array([float(r.split(",")[0]) for r in raw[1:]])
    np.testing.assert_allclose(x[:, 0], (col0 - col0.mean()) / col0.std(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "shards"])
@pytest.mark.parametrize("name,n,classes", [("digits", 1797, 10), ("breast_cancer", 569, 2)])
def test_tabular_federation_keeps_every_sample(partition, name, n, classes):
    ds = tabular(name, 5, partition=partition, alpha=0.5, seed=1)
    assert ds.name == name and len(ds) == 5 and ds.num_classes == classes
    assert ds.num_train + ds.num_test == n
    assert ds.info["partition"] == partition
    x, y = load_digits() if name == "digits" else load_breast_cancer()
    rows = np.concatenate([c.x_train for c in ds.clients] + [c.x_test for c in ds.clients]).reshape(n, -1)
    order = np.lexsort(rows.T[::-1])
    np.testing.assert_array_equal(rows[order], x.reshape(n, -1)[np.lexsort(x.reshape(n, -1).T[::-1])])
    for c in ds.clients:
        assert c.num_train == int(0.8 * (c.num_train + c.num_test))
    again = tabular(name, 5, partition=partition, alpha=0.5, seed=1)
    np.testing.assert_array_equal(again[3].y_train, ds[3].y_train)


def test_tabular_shards_give_few_labels_per_client():
    ds = tabular("digits", 10, partition="shards", shards_per_client=2, seed=0)
    for c in ds.clients:
        labels = np.concatenate([c.y_train, c.y_test])
        assert len(np.unique(labels)) <= 4  # two label-sorted shards span at most 4 labels


@pytest.mark.parametrize("args", [("mnist", 5), ("digits", 5, "natural"), ("digits", 0), ("breast_cancer", 600)])
def test_tabular_rejects_bad_arguments(args):
    with pytest.raises(DataError):
        tabular(*args)
