import numpy as np
import pytest

from fedloom.data import decode, load_shakespeare, parse_roles
from fedloom.errors import DataError

PLAY = "\n".join([
    "ZED:",                       # speech 1 of ZED
    "Hark: who goes there?",
    "ALICE:",                     # a role line inside a speech is just text
    "",
    "stray line outside a speech",
    "BOB:",
    "I speak.",
    "",
    "",
    "ZED:",                       # speech 2 of ZED
    "Again.",
    "",
    "lower:",                     # not a role line (lower case)
    "Tiny Part:",
    "No.",
    "",
    "BOB:",
    "Last words",
])


def test_parse_roles_follows_the_speech_rules():
    roles = parse_roles(PLAY)
    assert list(roles) == ["ZED", "BOB", "Tiny Part"]  # first-appearance order; ALICE is not a role
    assert roles["ZED"] == "Hark: who goes there?\nALICE:\nAgain."
    assert roles["BOB"] == "I speak.\nLast words"
    assert roles["Tiny Part"] == "No."


def test_parse_roles_keeps_empty_speeches_and_ignores_non_role_lines():
    roles = parse_roles("AB:\n\nB C:\nhi\n\nAB:\nyo\n\nX1:\nnot a role\n\nAB:extra\nno\nA:\nno\n")
    assert roles == {"AB": "\nyo", "B C": "hi"}  # AB's first speech is empty; "X1:", "AB:extra", "A:" are not roles


def _write(tmp_path, roles):
    text = "\n\n".join(f"{name}:\n{body}" for name, body in roles) + "\n"
    path = tmp_path / "play.txt"
    path.write_text(text, encoding="utf-8")
    return path, text


def test_load_shakespeare_clients_windows_and_splits(tmp_path):
    long_a = "abcdefghij" * 30        # 300 chars -> 300 // 11 = 27 windows of seq_len 10
    long_b = "klmnopqrst" * 22        # 2 speeches of 220 -> joined 441 chars -> 40 windows
    path, text = _write(tmp_path, [("BRAVO", long_b), ("ALPHA", long_a), ("SHORT", "x" * 199), ("BRAVO", long_b)])
    ds = load_shakespeare(path, seq_len=10, min_chars=200, train_fraction=0.8)
    assert ds.name == "shakespeare"
    assert ds.vocab == "".join(sorted(set(text))) and ds.num_classes == len(ds.vocab)
    assert [c.name for c in ds.clients] == ["ALPHA", "BRAVO"]  # SHORT (199 chars) dropped; sorted by name
    assert [c.client_id for c in ds.clients] == [0, 1]
    a, b = ds[0], ds[1]
    assert (a.num_train, a.num_test) == (21, 6)  # int(0.8 * 27) = 21
    assert (b.num_train, b.num_test) == (32, 8)
    assert a.x_train.shape == (21, 10) and a.x_train.dtype == np.int64 and a.y_train.dtype == np.int64
    assert decode(a.x_train[0], ds.vocab) == long_a[0:10] and decode(a.y_train[0], ds.vocab) == long_a[1:11]
    assert decode(a.x_test[0], ds.vocab) == long_a[11 * 21 : 11 * 21 + 10]
    role_b = long_b + "\n" + long_b
    assert decode(b.y_test[-1], ds.vocab) == role_b[11 * 39 + 1 : 11 * 40]
    assert [c.name for c in load_shakespeare(path, seq_len=10, max_clients=1).clients] == ["ALPHA"]
    assert len(load_shakespeare(path, seq_len=10, min_chars=100)) == 3


def test_load_shakespeare_bad_files(tmp_path):
    with pytest.raises(DataError):
        load_shakespeare(tmp_path / "missing.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("ROMEO:\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        load_shakespeare(bad)
    path, _ = _write(tmp_path, [("AB", "short")])
    with pytest.raises(DataError):
        load_shakespeare(path)


def test_shipped_tinyshakespeare():
    ds = load_shakespeare()
    assert len(ds.vocab) == 65 and ds.num_classes == 65 and ds.vocab[0] == "\n"
    assert 150 <= len(ds) <= 400
    names = [c.name for c in ds.clients]
    assert names == sorted(names) and "ROMEO" in names and "First Citizen" in names
    assert all(c.x_train.shape[1:] == (80,) for c in ds.clients)
    assert ds.num_train > 5000 and ds.num_test > 1000
    first = ds[names.index("First Citizen")]
    expected = ("Before we proceed any further, hear me speak.\n"
                "You are all resolved rather to die than to famish?\n"
                "First, you know Caius Marcius is chief enemy to the people.")
    assert decode(first.x_train[0], ds.vocab) == expected[:80]
    assert decode(first.y_train[0], ds.vocab) == expected[1:81]
    again = load_shakespeare()
    assert [c.name for c in again.clients] == names
    np.testing.assert_array_equal(again[7].x_test, ds[7].x_test)
