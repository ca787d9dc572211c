"""The files users have: CSV and .npz, one table with a client column or a folder of one file per client."""

import subprocess
import sys

import numpy as np
import pytest

from fedloom.build import build_clients
from fedloom.config import load_config
from fedloom.data.readers import read_files
from fedloom.errors import ConfigError, DataError


def write_csv(path, rows, header="f1,f2,label,client"):
    path.write_text(header + "\n" + "\n".join(",".join(str(v) for v in r) for r in rows) + "\n")
    return path


def table(n=60, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    return x, (x.sum(axis=1) > 0).astype(int), np.array(["oslo", "lima", "pune"])[np.arange(n) % 3]


def test_one_csv_with_a_client_column_becomes_one_client_per_site(tmp_path):
    x, y, sites = table()
    path = write_csv(tmp_path / "all.csv", [(*xi, yi, s) for xi, yi, s in zip(x, y, sites)])
    fx, fy, ids = read_files(path)
    np.testing.assert_allclose(fx, x.astype(np.float32))
    np.testing.assert_array_equal(fy, y)
    assert sorted(set(ids)) == ["lima", "oslo", "pune"]
    _, data = build_clients(load_config(None, ["data.dataset=\"files\"", f"data.path=\"{path}\"", "model.name=\"mlp\"",
                                               "data.partition=\"natural\""]))
    assert [c.name for c in data.clients] == ["lima", "oslo", "pune"] and data.num_classes == 2
    assert data[0].num_train == 16 and data[0].x_train.dtype == np.float32


def test_a_csv_without_client_ids_is_partitioned(tmp_path):
    x, y, _ = table()
    path = write_csv(tmp_path / "plain.csv", [(*xi, yi) for xi, yi in zip(x, y)], header="f1,f2,label")
    cfg = ["data.dataset=\"files\"", f"data.path=\"{path}\"", "model.name=\"mlp\""]
    _, data = build_clients(load_config(None, [*cfg, "data.partition=\"iid\"", "data.num_clients=4"]))
    assert len(data) == 4 and sum(c.num_train + c.num_test for c in data.clients) == 60
    with pytest.raises(ConfigError, match="has no client ids: name a partition"):
        build_clients(load_config(None, [*cfg, "data.partition=\"natural\""]))


def test_a_folder_of_per_client_files_csv_or_npz(tmp_path):
    x, y, _ = table()
    write_csv(tmp_path / "north.csv", [(*xi, yi) for xi, yi in zip(x[:20], y[:20])], header="f1,f2,label")
    np.savez(tmp_path / "south.npz", x=x[20:], y=y[20:])
    fx, fy, ids = read_files(tmp_path)
    assert fx.shape == (60, 2) and sorted(set(ids)) == ["north", "south"] and list(ids).count("south") == 40


def test_an_npz_with_a_client_array_and_the_bad_files_users_make(tmp_path):
    x, y, sites = table()
    np.savez(tmp_path / "all.npz", x=x, y=y, client=sites)
    assert sorted(set(read_files(tmp_path / "all.npz")[2])) == ["lima", "oslo", "pune"]
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    np.savez(tmp_path / "pickled.npz", x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    with pytest.raises(DataError, match="without unpickling"):
        read_files(tmp_path / "pickled.npz")
    with pytest.raises(DataError, match="no label column 'label'"):
        read_files(write_csv(tmp_path / "nolabel.csv", [(1, 2, 3, "a")], header="f1,f2,y,client"))
    with pytest.raises(DataError, match="row 3 has 3 fields, the header 4"):
        read_files(write_csv(tmp_path / "ragged.csv", [(1, 2, 0, "a"), (1, 2, 0)]))
    with pytest.raises(DataError, match="feature columns must be numbers"):
        read_files(write_csv(tmp_path / "words.csv", [("one", 2, 0, "a")]))
    with pytest.raises(DataError, match="unknown file type"):
        read_files(tmp_path / "objects.npy")
    with pytest.raises(DataError, match="needs arrays 'x' and 'y'"):
        np.savez(tmp_path / "other.npz", a=x)
        read_files(tmp_path / "other.npz")


def test_a_csv_trains_from_the_cli(tmp_path):
    x, y, sites = table(600)
    path = write_csv(tmp_path / "sites.csv", [(*xi, yi, s) for xi, yi, s in zip(x, y, sites)])
    (tmp_path / "run.toml").write_text(f'[run]\nname = "csv"\nout_dir = "{tmp_path}"\n[data]\ndataset = "files"\n'
                                       f'path = "{path}"\npartition = "natural"\n[model]\nname = "mlp"\n'
                                       '[client]\nlr = 0.1\n[server]\nclients_per_round = 3\n')
    out = subprocess.run([sys.executable, "-m", "fedloom.cli", "simulate", str(tmp_path / "run.toml"), "--quiet",
                          "--rounds", "5"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split("final test accuracy ")[1].split()[0]) > 0.8


def test_a_parquet_table_with_a_client_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    x, y, sites = table()
    pq.write_table(pa.table({"f1": x[:, 0], "f2": x[:, 1], "label": y, "client": sites}), tmp_path / "all.parquet")
    _, data = build_clients(load_config(None, ["data.dataset=\"files\"", f"data.path=\"{tmp_path / 'all.parquet'}\"",
                                               "model.name=\"mlp\"", "data.partition=\"natural\""]))
    assert [c.name for c in data.clients] == ["lima", "oslo", "pune"]
    np.testing.assert_allclose(np.concatenate([data[1].x_train, data[1].x_test]), x[sites == "oslo"], rtol=1e-6)


def test_a_hugging_face_dataset_saved_to_disk_by_column_or_by_partition(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    images = rng.random((90, 8, 8)).astype(np.float32)
    labels = (images.mean(axis=(1, 2)) > 0.5).astype(int)
    saved = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"pixels": images.tolist(), "digit": labels.tolist(), "hospital": [f"h{i % 3}" for i in range(90)]})})
    saved.save_to_disk(str(tmp_path / "scans"))
    base = ["data.dataset=\"hf\"", f"data.path=\"{tmp_path / 'scans'}\"", "model.name=\"mlp\"",
            "data.label_column=\"digit\"", "data.client_column=\"hospital\""]
    _, data = build_clients(load_config(None, [*base, "data.partition=\"natural\""]))
    assert [c.name for c in data.clients] == ["h0", "h1", "h2"] and data[0].x_train.shape[1:] == (8, 8)
    np.testing.assert_allclose(data[0].x_train[0], images[0])
    _, data = build_clients(load_config(None, [*base, "data.partition=\"iid\"", "data.num_clients=5"]))
    assert len(data) == 5 and sum(c.num_train + c.num_test for c in data.clients) == 90
    with pytest.raises(DataError, match="has the splits \\['train'\\], not 'test'"):
        build_clients(load_config(None, [*base, "data.partition=\"natural\"", "data.hf_split=\"test\""]))
    with pytest.raises(DataError, match="cannot load a Hugging Face dataset"):
        build_clients(load_config(None, ["data.dataset=\"hf\"", f"data.path=\"{tmp_path}\"", "model.name=\"mlp\"",
                                         "data.partition=\"natural\""]))
