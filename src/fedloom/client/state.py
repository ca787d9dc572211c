"""Client state on disk, by version: what a client keeps between the rounds it takes part in.

A client's state (``messages.ClientState``: named arrays, e.g. an error-feedback residual or
FedBN's local layers) is written as one ``.npz`` file per version, ``<client>-<round>.npz``, the
round in which it was made. Reading for round ``r`` takes the newest version made before ``r``,
so a round that is asked again (a resumed simulation, a deployed server that restarted mid-round)
sees the state the first attempt saw, never what that attempt left behind.

Only the clients a round touches are ever in memory: 10,000 clients of a 1M-value model with an
error-feedback residual each take 40 GB of disk (4 bytes per value per client that has taken
part) and a round's worth of memory. :meth:`StateFiles.prune` keeps each client's newest version
at or before a checkpoint's round and anything newer; :meth:`StateFiles.rewind` drops the
versions after it, which is how a resumed run finds the state of its checkpoint.

A round of several exchanges (secure aggregation) keeps what lasts only that round (keys under
``round/``, ``secagg/client.py``) apart, in ``round/<client>.npz``: each step reads it and writes it
back, a train request of that round gets it besides the state made before the round, and it is
removed when the round's last step leaves it empty.

Files are written to a temporary name and renamed, so a crash leaves whole versions only; they
are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from fedloom.errors import StateError
from fedloom.messages import ClientState, Reply, Request, StepReply, StepRequest, TrainReply, TrainRequest

_NAME = re.compile(r"^(\d+)-(\d+)\.npz$")
ROUND = "round/"  # the keys of a client's state that last one round


class StateFiles:
    """The versioned state of many clients (a simulation) or of one (a deployed client), in one folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)  # created at the first save
        self._temporary: tempfile.TemporaryDirectory | None = None
        self.versions: dict[int, list[int]] = {}  # client -> rounds of its versions, ascending
        for path in self.folder.iterdir() if self.folder.is_dir() else ():
            m = _NAME.match(path.name)
            if m:
                self.versions.setdefault(int(m[1]), []).append(int(m[2]))
            elif path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # a write cut short
        for rounds in self.versions.values():
            rounds.sort()

    @classmethod
    def temporary(cls) -> StateFiles:
        """A store in a temporary folder, removed with it (a run without a run folder)."""
        folder = tempfile.TemporaryDirectory(prefix="fedloom-client-state-")
        files = cls(folder.name)
        files._temporary = folder
        return files

    def _path(self, client_id: int, round: int) -> Path:
        return self.folder / f"{client_id}-{round}.npz"

    def load(self, client_id: int, round: int | None = None) -> ClientState:
        """The newest state ``client_id`` made before ``round`` (None: the newest); empty when it has none."""
        made = [r for r in self.versions.get(client_id, ()) if round is None or r < round]
        if not made:
            return {}
        return self._read(client_id, self._path(client_id, made[-1]))

    def _round_path(self, client_id: int) -> Path:
        return self.folder / "round" / f"{client_id}.npz"

    def load_round(self, client_id: int, round: int) -> ClientState:
        """What ``client_id`` keeps for the steps of ``round`` (empty when it keeps nothing for that round)."""
        path = self._round_path(client_id)
        if not path.exists():
            return {}
        state = self._read(client_id, path)
        number = state.get(ROUND + "number")
        return state if number is not None and int(number) == round else {}

    def save_round(self, client_id: int, state: ClientState) -> None:
        """Keep ``state`` (keys under ``round/``) for the round's next steps; an empty one removes the file."""
        path = self._round_path(client_id)
        if not state:
            path.unlink(missing_ok=True)
            return
        self._write(path, state)

    def _read(self, client_id: int, path: Path) -> ClientState:
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError) as exc:
            raise StateError(f"client {client_id}'s state {path} cannot be read: {exc}") from None

    def save(self, client_id: int, round: int, state: ClientState) -> None:
        """Keep ``state`` as what ``client_id`` made in ``round`` (replacing an earlier attempt at that round)."""
        self._write(self._path(client_id, round), state)
        rounds = self.versions.setdefault(client_id, [])
        if round not in rounds:
            rounds.append(round)
            rounds.sort()

    def _write(self, path: Path, state: ClientState) -> None:
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create the client state folder {path.parent}: {exc.strerror or exc}") from None
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:  # its own eyes only
            np.savez(f, **state)
        os.replace(tmp, path)

    def prune(self, round: int, keep: int = 1) -> None:
        """Drop versions no read for a round after ``round`` can need: each client keeps its newest ``keep``
        versions at or before ``round``, and every later one."""
        for client_id, rounds in self.versions.items():
            upto = [r for r in rounds if r <= round]
            for r in upto[:-keep] if keep else upto:
                self._path(client_id, r).unlink(missing_ok=True)
                rounds.remove(r)

    def rewind(self, round: int) -> None:
        """Forget every version made after ``round`` (a run resumed from that round's checkpoint)."""
        for client_id, rounds in self.versions.items():
            for r in [r for r in rounds if r > round]:
                self._path(client_id, r).unlink(missing_ok=True)
                rounds.remove(r)

    @property
    def clients(self) -> list[int]:
        """The clients with any state."""
        return sorted(c for c, rounds in self.versions.items() if rounds)


def with_state(request: Request, files: StateFiles) -> Request:
    """``request`` carrying its client's state: for training, the newest made before its round (and what the client
    keeps for that round's steps); for evaluation, the newest; for a step, what it keeps for the round's steps."""
    cid = request.client_id
    if isinstance(request, StepRequest):
        return replace(request, state=files.load_round(cid, request.round))
    if isinstance(request, TrainRequest):
        return replace(request, state={**files.load(cid, request.round), **files.load_round(cid, request.round)})
    return replace(request, state=files.load(cid))


def keep_state(request: Request, reply: Reply, files: StateFiles) -> Reply:
    """Save the state a train or step reply brings back (as made in its request's round), and the reply without it.

    What lasts one round (keys under ``round/``) goes apart (:meth:`StateFiles.save_round`); the rest is a
    version of the client's state, saved when it holds anything or the client had state before.
    """
    if not isinstance(reply, TrainReply | StepReply) or reply.state is None:
        return reply
    cid = request.client_id
    if reply.error is None and reply.client_id == cid:
        this_round = {k: v for k, v in reply.state.items() if k.startswith(ROUND)}
        if isinstance(reply, StepReply) or this_round or files.load_round(cid, request.round):
            files.save_round(cid, this_round)
        lasting = {k: v for k, v in reply.state.items() if not k.startswith(ROUND)}
        if isinstance(reply, TrainReply) and (lasting or cid in files.clients):
            files.save(cid, request.round, lasting)
    return replace(reply, state=None)
