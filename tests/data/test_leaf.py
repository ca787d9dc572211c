import json

import numpy as np
import pytest

from fedloom.data import decode, load_leaf
from fedloom.errors import DataError


def _leaf(user_data):
    users = list(user_data)
    return {"users": users, "num_samples": [len(user_data[u]["y"]) for u in users], "user_data": user_data}


def _write(path, doc):
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


NUMERIC = {
    "u2": {"x": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 10.0]], "y": [0, 1, 2, 1, 0]},
    "u1": {"x": [[0.5, 0.5], [1.5, 1.5]], "y": [3, 3]},
}


def test_numeric_file_split_by_fraction(tmp_path):
    ds = load_leaf(_write(tmp_path / "train.json", _leaf(NUMERIC)), train_fraction=0.6)
    assert ds.name == "leaf" and [c.name for c in ds.clients] == ["u1", "u2"]  # sorted user ids
    assert ds.num_classes == 4 and ds.vocab is None
    u1, u2 = ds[0], ds[1]
    assert u2.x_train.dtype == np.float32 and u2.y_train.dtype == np.int64
    np.testing.assert_array_equal(u2.x_train, [[1, 2], [3, 4], [5, 6]])  # int(0.6 * 5) = 3
    assert u2.y_test.tolist() == [1, 0] and (u1.num_train, u1.num_test) == (1, 1)


def test_folder_of_files_with_separate_test_split(tmp_path):
    train, test = tmp_path / "train", tmp_path / "test"
    train.mkdir()
    test.mkdir()
    _write(train / "a.json", _leaf({"u2": NUMERIC["u2"]}))
    _write(train / "b.json", _leaf({"u1": NUMERIC["u1"]}))
    (train / "notes.txt").write_text("ignored")
    _write(test / "all.json", _leaf({"u1": {"x": [[9.0, 9.0]], "y": [5]}, "u3": {"x": [[0.0, 1.0]], "y": [1]}}))
    ds = load_leaf(train, test)
    assert [c.name for c in ds.clients] == ["u1", "u2", "u3"]
    assert [(c.num_train, c.num_test) for c in ds.clients] == [(2, 1), (5, 0), (0, 1)]
    assert ds[0].y_test.tolist() == [5] and ds.num_classes == 6
    assert ds[1].x_test.shape == (0, 2) and ds[2].x_train.shape == (0, 2)


def test_string_inputs_are_encoded_as_characters(tmp_path):
    data = {"THE_KING": {"x": ["abcd", "bcda", "cdab"], "y": ["e", "a", "b"]},
            "A_FOOL": {"x": ["d d!"], "y": [" "]}}
    ds = load_leaf(_write(tmp_path / "s.json", _leaf(data)), train_fraction=0.5)
    assert ds.vocab == " !abcde" and ds.num_classes == 7
    fool, king = ds[0], ds[1]
    assert fool.name == "A_FOOL" and (fool.num_train, fool.num_test) == (0, 1)
    assert king.x_train.shape == (1, 4) and king.x_train.dtype == np.int64 and king.y_train.dtype == np.int64
    assert decode(king.x_train[0], ds.vocab) == "abcd"
    assert decode(king.y_train[0], ds.vocab) == "bcde"  # the next character at every position, as char_lstm predicts
    assert decode(king.x_test.reshape(-1), ds.vocab) == "bcdacdab"
    assert load_leaf(tmp_path / "s.json", vocab="abcde !xyz").vocab == "abcde !xyz"
    with pytest.raises(DataError, match="THE_KING"):
        load_leaf(tmp_path / "s.json", vocab="abcd !")


@pytest.mark.parametrize("doc,match", [
    ({"users": ["u"], "num_samples": [1]}, "user_data"),
    (_leaf(NUMERIC) | {"num_samples": [5, 3]}, "'u1'.*num_samples says 3"),
    ({"users": ["u"], "num_samples": [1], "user_data": {}}, "'u'.*missing"),
    ({"users": ["u"], "num_samples": [1], "user_data": {"u": {"x": [[1.0]]}}}, "'u'"),
    (_leaf({"u": {"x": [[1.0, 2.0], [3.0]], "y": [0, 1]}}), "'u'.*shaped"),
    (_leaf({"u": {"x": ["abc", "ab"], "y": ["a", "b"]}}), "'u'.*different lengths"),
    (_leaf({"u": {"x": ["abc"], "y": [1]}}), "'u'.*single character"),
    (_leaf({"u": {"x": [[1.0]], "y": [0.5]}}), "'u'.*integers"),
    (_leaf({"u": {"x": [[1.0]], "y": [0]}, "v": {"x": [[1.0, 2.0]], "y": [0]}}), "different shapes"),
    (_leaf({"u": {"x": [[1.0], "a"], "y": [0, 1]}}), "mix"),
    (_leaf({}), "no users"),
])
def test_malformed_files_raise_data_error_naming_file_and_user(tmp_path, doc, match):
    path = _write(tmp_path / "bad.json", doc)
    with pytest.raises(DataError, match=match) as err:
        load_leaf(path)
    if "'u" in match:
        assert "bad.json" in str(err.value)


def test_unreadable_paths(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_leaf(tmp_path / "nope.json")
    with pytest.raises(DataError, match="no .json"):
        load_leaf(tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="broken.json"):
        load_leaf(tmp_path / "broken.json")
    _write(tmp_path / "a.json", _leaf({"u": {"x": [[1.0]], "y": [0]}}))
    _write(tmp_path / "b.json", _leaf({"u": {"x": [[1.0]], "y": [0]}}))
    (tmp_path / "broken.json").unlink()
    with pytest.raises(DataError, match="also appears"):
        load_leaf(tmp_path)
