"""The asynchronous server's journal: an accepted update is on disk before its client hears "accepted".

FedBuff's buffer lives in memory between server updates, so a server killed mid-buffer would lose
the updates it had accepted. Each accepted update's change from the model it was sent (checked at
the door, decoded, as a delta) is written first. The updates that arrive while one write is under
way go into the next file together (a group commit): one file per batch of ``.npy`` records, each
update's arrays in turn (temp file, fsync, rename, fsync of the folder; read back without
unpickling), then one transaction adding their rows to the ``updates`` table (``deploy/state.py``),
and only then are their pushes answered.

A server update marks the updates it used in the transaction that marks it done
(``ServerState.complete_round``). After a restart the buffer is exactly the journaled updates that no
done update used, in the order they were accepted: none lost, none applied twice. A file whose
updates were all used is deleted. A client that pushes again a reply the journal holds (its answer
was lost in the crash) is told it was accepted, and nothing is added.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fedloom.deploy.state import ServerState, write_durably
from fedloom.errors import StateError
from fedloom.messages import TrainReply, Update
from fedloom.params import ParamSpec

log = logging.getLogger("fedloom")


@dataclass(frozen=True)
class Entry:
    """One accepted update: its task, its client, the task's number and the model version it was sent, and the
    update as a checked delta."""

    task_id: str
    client_id: int
    dispatch: int
    version_sent: int
    update: Update

    def reply(self) -> TrainReply:
        return TrainReply(self.client_id, self.dispatch, update=self.update)


class Journal:
    """Group-committed journal of a run's accepted updates under ``folder``, indexed in ``store``.

    :meth:`write` may be called from any thread; one writer thread commits.
    """

    def __init__(self, store: ServerState, run_id: int, folder: Path):
        self.store, self.run_id, self.folder = store, run_id, folder
        self._sweep()
        self._pending: list[tuple[Entry, Future[None]]] = []
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="fedloom-journal", daemon=True)
        self._thread.start()

    def write(self, entry: Entry) -> Future[None]:
        """Journal ``entry``; the future is done once it is durable (or holds why it could not be)."""
        future: Future[None] = Future()
        with self._cv:
            if self._closed:
                future.set_exception(StateError("the journal is closed: the server is stopping", stage="state"))
                return future
            self._pending.append((entry, future))
            self._cv.notify()
        return future

    def close(self) -> None:
        """Commit what is pending, then stop the writer."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if not self._pending:
                    return
                batch, self._pending = self._pending, []
            try:
                self._commit([e for e, _ in batch])
            except Exception as exc:  # noqa: BLE001 - each push is answered with why, the server goes on
                error = exc if isinstance(exc, StateError) else StateError(
                    f"cannot journal {len(batch)} updates in {self.folder}: {exc}", stage="state")
                log.error("%s", error)
                for _, future in batch:
                    future.set_exception(error)
            else:
                for _, future in batch:
                    future.set_result(None)

    def _commit(self, entries: list[Entry]) -> None:
        name = f"batch-{time.time_ns():020d}-{secrets.token_hex(4)}.npy"

        def write(f: BinaryIO) -> None:
            for e in entries:
                for a in e.update.values:
                    np.lib.format.write_array(f, np.ascontiguousarray(a), allow_pickle=False)

        write_durably(self.folder / name, write)
        self.store.journal_updates(self.run_id, [
            (e.task_id, e.client_id, e.dispatch, e.version_sent, float(e.update.weight),
             json.dumps({k: float(v) for k, v in e.update.metrics.items()}), name, slot)
            for slot, e in enumerate(entries)])

    def buffered(self, spec: ParamSpec) -> list[Entry]:
        """The journaled updates no done server update used, oldest first, read back and checked against ``spec``."""
        entries, files, n = [], {}, len(spec.shapes)
        for row in self.store.buffered(self.run_id):
            path = self.folder / row["file"]
            try:
                if row["file"] not in files:
                    files[row["file"]] = _read_records(path)
                values = files[row["file"]][row["slot"] * n: (row["slot"] + 1) * n]
                if len(values) != n:
                    raise ValueError(f"it ends before update {row['slot'] + 1}")
            except (OSError, ValueError) as exc:
                raise StateError(f"journal file {path} cannot be read back ({exc}): an accepted update is lost. "
                                 "Restore the state folder from a backup", stage="state") from None
            if [v.shape for v in values] != [tuple(s) for s in spec.shapes] or not all(
                    np.isfinite(v).all() for v in values):
                raise StateError(f"journal file {path} holds an update of other shapes or NaN: it was not written "
                                 "by this run's server", stage="state")
            metrics = {k: float(v) for k, v in json.loads(row["metrics_json"]).items()}
            entries.append(Entry(row["task_id"], row["client_id"], row["dispatch"], row["version_sent"],
                                 Update(values, float(row["weight"]), "delta", metrics)))
        return entries

    def _sweep(self) -> None:
        """Before the writer starts: delete what a crash mid-commit left (a temp file; a batch file written but not
        yet indexed, whose updates no client was told were accepted). A file the index does not know that is older
        than one it knows means the database lost committed rows: refused, as a database that lost rounds is."""
        if not self.folder.is_dir():
            return
        holding, spent = self.store.journal_files(self.run_id)
        known = holding | spent
        newest = max(known, default="")
        for path in sorted(self.folder.iterdir()):
            if ".tmp-" in path.name or (path.name not in known and path.name > newest):
                path.unlink(missing_ok=True)
            elif path.name not in known:
                raise StateError(f"journal file {path} is not in {self.store.path}, which knows later ones: the "
                                 "database has lost accepted updates (was server.db-wal deleted or truncated, or an "
                                 "older copy restored?). Restore server.db and server.db-wal together from a backup",
                                 stage="state")

    def prune(self) -> None:
        """Delete the journal files whose updates were all used."""
        _, spent = self.store.journal_files(self.run_id)
        for name in spent:
            (self.folder / name).unlink(missing_ok=True)


def _read_records(path: Path) -> list[np.ndarray]:
    """The ``.npy`` records of a journal file, in order (never unpickled)."""
    out, size = [], path.stat().st_size
    with open(path, "rb") as f:
        while f.tell() < size:
            out.append(np.lib.format.read_array(f, allow_pickle=False))
    return out
