"""Keyboard prediction on Shakespeare: next-character prediction with one client per speaking role.

The text is Karpathy's tinyshakespeare (shipped as ``files/tinyshakespeare.txt``). The
split into roles follows the exact rules of :func:`parse_roles` and :func:`load_shakespeare`,
so every run (and every benchmark) sees the same clients and the same windows.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from fedloom.data.dataset import FederatedDataset
from fedloom.data.partition import split_client
from fedloom.data.text import encode, vocabulary, windows
from fedloom.errors import DataError

ROLE_LINE = re.compile(r"[A-Z][A-Za-z ]+:")


def read_text(path: str | Path | None = None) -> str:
    """The UTF-8 text of ``path``, or of the shipped tinyshakespeare file when ``path`` is None."""
    try:
        if path is None:
            raw = resources.files("fedloom.data").joinpath("files/tinyshakespeare.txt").read_bytes()
        else:
            raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read Shakespeare text {path or 'tinyshakespeare.txt'}: {e}") from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path or 'tinyshakespeare.txt'} is not UTF-8 text: {e}") from e


def parse_roles(text: str) -> dict[str, str]:
    """Each speaking role's text, keyed by role in order of first appearance.

    The text is split on ``"\\n"``. Outside a speech, a line matching ``^[A-Z][A-Za-z ]+:$`` starts
    a speech of that role (the line without its colon); the following lines up to the next blank
    line (or the end) are the speech, joined with ``"\\n"``. Inside a speech such a line is just
    text. Other lines outside a speech are skipped. A role's text is its speeches joined with
    ``"\\n"`` in file order (a speech with no lines counts as an empty speech).
    """
    speeches: dict[str, list[str]] = {}
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        if not ROLE_LINE.fullmatch(lines[i]):
            i += 1
            continue
        role = lines[i][:-1]
        j = i + 1
        while j < len(lines) and lines[j] != "":
            j += 1
        speeches.setdefault(role, []).append("\n".join(lines[i + 1 : j]))
        i = j
    return {role: "\n".join(parts) for role, parts in speeches.items()}


def load_shakespeare(path: str | Path | None = None, seq_len: int = 80, min_chars: int = 200,
                     train_fraction: float = 0.8, max_clients: int | None = None) -> FederatedDataset:
    """One client per role with at least ``min_chars`` characters of text, ordered by role name.

    The vocabulary is the sorted set of characters of the whole file. A role's samples are the
    non-overlapping windows ``text[(seq_len+1)*i : (seq_len+1)*(i+1)]`` (input: the first
    ``seq_len`` characters, target: the last ``seq_len``); its first ``int(train_fraction * n)``
    windows are train and the rest test. ``max_clients`` keeps the first that many clients.
    ``path=None`` reads the shipped tinyshakespeare file.
    """
    if min_chars < 0:
        raise DataError(f"min_chars must be >= 0, got {min_chars}")
    text = read_text(path)
    vocab = vocabulary(text)
    roles = parse_roles(text)
    names = sorted(role for role, role_text in roles.items() if len(role_text) >= min_chars)
    if max_clients is not None:
        if max_clients < 1:
            raise DataError(f"max_clients must be >= 1 or None, got {max_clients}")
        names = names[:max_clients]
    if not names:
        raise DataError(f"no role in {path or 'tinyshakespeare.txt'} has >= {min_chars} characters of text")
    clients = []
    for k, role in enumerate(names):
        x, y = windows(encode(roles[role], vocab), seq_len)
        clients.append(split_client(k, x, y, train_fraction, name=role))
    info = {"seq_len": seq_len, "min_chars": min_chars, "roles": len(roles)}
    return FederatedDataset("shakespeare", clients, len(vocab), vocab=vocab, info=info)
