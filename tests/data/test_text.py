import numpy as np
import pytest

from fedloom.data import decode, encode, vocabulary, windows
from fedloom.errors import DataError


def test_vocabulary_is_sorted_unique_characters():
    assert vocabulary("hello, world\n") == "\n ,dehlorw"
    assert vocabulary("") == ""
    assert vocabulary("ßaé") == "aßé"


def test_encode_decode_round_trip():
    vocab = vocabulary("the quick brown fox, é!")
    ids = encode("fox é", vocab)
    assert ids.dtype == np.int64
    assert ids.tolist() == [vocab.index(c) for c in "fox é"]
    assert decode(ids, vocab) == "fox é"
    assert decode([], vocab) == "" and encode("", vocab).shape == (0,)


def test_encode_names_the_first_unknown_character():
    with pytest.raises(DataError, match=r"'z' at position 2"):
        encode("abzqz", "ab")
    with pytest.raises(DataError, match="'€'"):
        encode("a€", "ab")


def test_decode_rejects_ids_outside_the_vocabulary():
    with pytest.raises(DataError):
        decode([0, 2], "ab")
    with pytest.raises(DataError):
        decode([-1], "ab")


def test_windows_are_non_overlapping_next_character_pairs():
    ids = np.arange(23)
    x, y = windows(ids, 4)  # windows of 5: [0..4], [5..9], ..., [15..19]; 20..22 dropped
    assert x.shape == y.shape == (4, 4) and x.dtype == y.dtype == np.int64
    assert x[0].tolist() == [0, 1, 2, 3] and y[0].tolist() == [1, 2, 3, 4]
    assert x[3].tolist() == [15, 16, 17, 18] and y[3].tolist() == [16, 17, 18, 19]
    for i in range(4):
        np.testing.assert_array_equal(x[i], ids[5 * i : 5 * i + 4])
        np.testing.assert_array_equal(y[i], ids[5 * i + 1 : 5 * i + 5])


def test_windows_of_short_input_are_empty():
    x, y = windows(np.arange(4), 4)
    assert x.shape == y.shape == (0, 4)
    with pytest.raises(DataError):
        windows(np.arange(10), 0)
    with pytest.raises(DataError):
        windows(np.zeros((2, 5)), 2)
