"""A site's own data (``data.dataset = "site"``): each kind of file, a loader, and a server that holds none."""

import csv
import json

import numpy as np
import pytest

from fedloom.build import build_clients
from fedloom.client.torch_work import get_params
from fedloom.config import load_config
from fedloom.data.site import load_site, read_site, site_arrays
from fedloom.errors import ConfigError, DataError

VOCAB = " abcdefghijklmnopqrstuvwxyz.,"


def site_config(*settings: str):
    return load_config(None, ['data.dataset="site"', 'model.name="mlp"', "model.num_classes=3", *settings])


def write_csv(path, x, y, extra=None):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*(f"f{i}" for i in range(x.shape[1])), "label", *(["client"] if extra is not None else [])])
        for i in range(len(y)):
            w.writerow([*x[i], int(y[i]), *([extra[i]] if extra is not None else [])])


@pytest.fixture
def table():
    rng = np.random.default_rng(0)
    return rng.standard_normal((20, 4)).astype(np.float32), rng.integers(0, 3, 20)


def test_a_csv_site_is_one_client_with_the_configured_classes_and_its_rows_in_order(tmp_path, table):
    x, y = table
    write_csv(tmp_path / "mine.csv", x, y, extra=["someone-else"] * 20)  # a client column is ignored
    fed = load_site(site_config(f'data.path="{tmp_path / "mine.csv"}"', 'deploy.name="st-mary"'))
    assert len(fed) == 1 and fed.num_classes == 3 and fed[0].name == "st-mary"
    assert fed[0].num_train == 16 and fed[0].num_test == 4  # data.train_fraction 0.8, in file order
    np.testing.assert_allclose(np.concatenate([fed[0].x_train, fed[0].x_test]), x, atol=1e-6)
    assert np.concatenate([fed[0].y_train, fed[0].y_test]).tolist() == y.tolist()


def test_an_npz_site_reads_without_unpickling_and_labels_must_be_the_federations(tmp_path, table):
    x, y = table
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    got = site_arrays(site_config(f'data.path="{tmp_path / "mine.npz"}"'))
    assert got[0].dtype == np.float32 and got[1].tolist() == y.tolist()
    with pytest.raises(DataError, match="label 2 is outside the federation's 2 classes"):
        site_arrays(site_config(f'data.path="{tmp_path / "mine.npz"}"', "model.num_classes=2"))
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    with pytest.raises(DataError, match="without unpickling"):
        site_arrays(site_config(f'data.path="{tmp_path / "objects.npz"}"'))


def test_a_leaf_file_site_takes_all_its_users_samples_with_the_shared_vocabulary(tmp_path):
    doc = {"users": ["a", "b"], "num_samples": [2, 1],
           "user_data": {"a": {"x": ["hello", "world"], "y": ["x", "y"]}, "b": {"x": ["abcde"], "y": ["f"]}}}
    (tmp_path / "mine.json").write_text(json.dumps(doc))
    x, y = read_site(tmp_path / "mine.json", "label", "client", VOCAB, 5)
    assert x.shape == (3, 5) and y.shape == (3, 5)
    assert x[0].tolist() == [VOCAB.index(c) for c in "hello"]  # ids in the configured vocabulary, not the file's
    assert y[2].tolist() == [VOCAB.index(c) for c in "bcdef"]


def test_a_folder_of_text_is_cut_into_windows_and_an_unknown_character_is_named(tmp_path):
    (tmp_path / "letters").mkdir()
    (tmp_path / "letters" / "1.txt").write_text("to be or not to be, that is.")  # 28 characters: 4 windows of 7
    (tmp_path / "letters" / "2.txt").write_text("the question")  # 12: 1 window
    (tmp_path / "letters" / "notes.md").write_text("ignored")
    cfg = load_config(None, ['data.dataset="site"', f'data.path="{tmp_path / "letters"}"', f'data.vocab="{VOCAB}"',
                             "data.seq_len=6"])
    fed = load_site(cfg)
    assert fed.vocab == VOCAB and fed.num_classes == len(VOCAB) and fed[0].num_train + fed[0].num_test == 5
    (tmp_path / "letters" / "3.txt").write_text("Capital!")
    with pytest.raises(DataError, match=r"3.txt: character 'C' at position 0 is not in the vocabulary"):
        load_site(cfg)
    with pytest.raises(DataError, match="needs the vocabulary"):
        read_site(tmp_path / "letters", "label", "client", "", 6)


def test_a_sites_loader_returns_its_arrays_and_anything_else_is_refused(tmp_path, monkeypatch, table):
    (tmp_path / "hospital_data.py").write_text(
        "import numpy as np\n"
        "def mine():\n    return np.ones((5, 4)), np.array([0, 1, 2, 1, 0])\n"
        "def everyone():\n    return np.ones((5, 4)), np.zeros(5), np.arange(5)\n")
    monkeypatch.chdir(tmp_path)
    fed = load_site(site_config('data.loader="hospital_data:mine"'))
    assert fed[0].num_train == 4 and fed[0].x_train.dtype == np.float32
    with pytest.raises(ConfigError, match="a site's loader returns its \\(x, y\\) arrays"):
        load_site(site_config('data.loader="hospital_data:everyone"'))


def test_unknown_files_and_missing_paths_are_clear_errors(tmp_path):
    (tmp_path / "scan.dcm").write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match="unknown file type"):
        read_site(tmp_path / "scan.dcm", "label", "client", "", 80)
    with pytest.raises(DataError, match="no file or folder"):
        read_site(tmp_path / "gone.csv", "label", "client", "", 80)


def test_the_config_says_what_a_site_cannot_learn_from_its_own_data():
    with pytest.raises(ConfigError, match="model.num_classes.*give the number of classes"):
        load_config(None, ['data.dataset="site"', 'model.name="mlp"'])
    with pytest.raises(ConfigError, match="data.vocab"):
        load_config(None, ['data.dataset="site"', 'model.name="char_lstm"'])
    with pytest.raises(ConfigError, match="not 5; leave it 0"):
        load_config(None, ['data.dataset="site"', 'model.name="char_lstm"', 'data.vocab="abc"', "model.num_classes=5"])


def test_a_server_that_holds_no_data_builds_the_sites_model_from_the_config(tmp_path, table):
    x, y = table
    write_csv(tmp_path / "mine.csv", x, y)
    server_work, server_data = build_clients(site_config("model.input_shape=[4]"))
    assert len(server_data) == 0
    site_work, _ = build_clients(site_config(f'data.path="{tmp_path / "mine.csv"}"'))
    assert [p.shape for p in get_params(server_work.model)] == [p.shape for p in get_params(site_work.model)]
    assert get_params(server_work.model)[-1].shape == (3,)  # model.num_classes, though the site saw what it saw
    with pytest.raises(ConfigError, match="model.input_shape"):
        build_clients(site_config())
    with pytest.raises(DataError, match=r"samples of shape \[4\], but model.input_shape is \[5\]"):
        build_clients(site_config(f'data.path="{tmp_path / "mine.csv"}"', "model.input_shape=[5]"))
    text_server, _ = build_clients(load_config(None, ['data.dataset="site"', 'model.name="char_lstm"',
                                                      f'data.vocab="{VOCAB}"']))
    assert get_params(text_server.model)[-1].shape == (len(VOCAB),)


def test_a_simulation_of_one_sites_data_is_refused_with_what_to_do_instead(tmp_path, table):
    from fedloom.simulation.runner import simulate

    x, y = table
    write_csv(tmp_path / "mine.csv", x, y)
    with pytest.raises(ConfigError, match="a simulation needs every client's"):
        simulate(site_config(f'data.path="{tmp_path / "mine.csv"}"'), progress=False, write=False)
