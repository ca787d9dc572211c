"""Character-level text: a vocabulary, encoding to ids and back, and next-character windows."""

from __future__ import annotations

import numpy as np

from fedloom.errors import DataError


def vocabulary(text: str) -> str:
    """The sorted set of the characters of ``text``, as one string (character ``i`` has id ``i``)."""
    return "".join(sorted(set(text)))


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def encode(text: str, vocab: str) -> np.ndarray:
    """The ids of ``text``'s characters in ``vocab`` (int64, one per character).

    Raises :class:`DataError` naming the first character that is not in ``vocab``.
    """
    if len(set(vocab)) != len(vocab):
        raise DataError("vocabulary has repeated characters")
    codes = _code_points(text)
    if len(codes) == 0:
        return np.zeros(0, dtype=np.int64)
    vocab_codes = _code_points(vocab).astype(np.int64)
    size = int(max(codes.max(), vocab_codes.max() if len(vocab_codes) else 0)) + 1
    table = np.full(size, -1, dtype=np.int64)
    table[vocab_codes] = np.arange(len(vocab_codes), dtype=np.int64)
    ids = table[codes]
    bad = np.flatnonzero(ids < 0)
    if len(bad):
        pos = int(bad[0])
        raise DataError(f"character {text[pos]!r} at position {pos} is not in the vocabulary "
                        f"({len(bad)} unknown characters in all)")
    return ids


def decode(ids: np.ndarray | list[int], vocab: str) -> str:
    """The text whose character ids in ``vocab`` are ``ids`` (the inverse of :func:`encode`)."""
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    bad = np.flatnonzero((arr < 0) | (arr >= len(vocab)))
    if len(bad):
        raise DataError(f"id {int(arr[bad[0]])} at position {int(bad[0])} is outside a vocabulary of {len(vocab)}")
    return "".join(vocab[i] for i in arr.tolist())


def windows(ids: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping next-character samples from a sequence of ids.

    Window ``i`` is ``ids[(seq_len+1)*i : (seq_len+1)*(i+1)]`` for ``i < len(ids) // (seq_len+1)``;
    its input is the first ``seq_len`` ids and its target the last ``seq_len`` (the next id at
    every position). Returns ``(x, y)``, both int64 of shape ``(n, seq_len)``; a trailing
    remainder shorter than a window is dropped.
    """
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    arr = np.asarray(ids, dtype=np.int64)
    if arr.ndim != 1:
        raise DataError(f"ids must be one-dimensional, got shape {arr.shape}")
    n = len(arr) // (seq_len + 1)
    block = arr[: n * (seq_len + 1)].reshape(n, seq_len + 1)
    return np.ascontiguousarray(block[:, :-1]), np.ascontiguousarray(block[:, 1:])
