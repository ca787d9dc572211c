"""Tasks waiting for clients and replies waiting for the server, with no network code.

The gRPC service (``server.py``) and the round logic meet here. The round logic hands a round's
requests to :class:`DeployedTransport` (the same ``exchange(requests) -> replies`` interface as the
simulation engines, so ``SyncServer`` runs unchanged); the transport queues one task per client in
the :class:`Dispatcher`; clients long-poll for their next task and push the result back; the
transport returns the replies that arrived, and error replies for clients that timed out or were
lost (no heartbeat). A reply for a task the server is not waiting for is refused.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fedloom.messages import Reply, Request, error_reply


@dataclass(frozen=True)
class Task:
    """One request addressed to one client, with the id its reply must carry."""

    task_id: str
    request: Request


class Dispatcher:
    """Per-client task queues, the replies awaited, and when each client was last heard from.

    One lock guards everything; each client waits on its own condition and the round on another,
    so a task, a reply or a heartbeat wakes only who it concerns (with hundreds of clients
    polling, waking all of them on every event costs the server a core).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._replies_ready = threading.Condition(self._lock)
        self._task_ready: dict[int, threading.Condition] = {}
        self._queues: dict[int, deque[Task]] = {}
        self._awaited: dict[str, int] = {}  # task id -> client id
        self._replies: dict[str, Reply] = {}
        self._last_seen: dict[int, float] = {}
        self._closed = False

    def _cond(self, client_id: int) -> threading.Condition:
        cond = self._task_ready.get(client_id)
        if cond is None:
            cond = self._task_ready[client_id] = threading.Condition(self._lock)
        return cond

    def close(self) -> None:
        """No more tasks: waiting pollers return at once."""
        with self._lock:
            self._closed = True
            for cond in self._task_ready.values():
                cond.notify_all()

    def seen(self, client_id: int) -> None:
        with self._lock:
            self._last_seen[client_id] = time.monotonic()

    def last_seen(self, client_id: int) -> float | None:
        with self._lock:
            return self._last_seen.get(client_id)

    def connected(self, within_s: float) -> list[int]:
        """Clients heard from in the last ``within_s`` seconds."""
        now = time.monotonic()
        with self._lock:
            return sorted(c for c, t in self._last_seen.items() if now - t <= within_s)

    def submit(self, tasks: Sequence[Task]) -> None:
        with self._lock:
            for task in tasks:
                cid = task.request.client_id
                self._queues.setdefault(cid, deque()).append(task)
                self._awaited[task.task_id] = cid
                self._cond(cid).notify_all()

    def next_task(self, client_id: int, wait_s: float, active: Callable[[], bool] = lambda: True) -> Task | None:
        """The client's next task, waiting up to ``wait_s`` seconds for one (long-poll).

        ``active`` is checked every second, so a poll whose client has gone away ends early.
        """
        deadline = time.monotonic() + wait_s
        with self._lock:
            cond = self._cond(client_id)
            while True:
                self._last_seen[client_id] = time.monotonic()
                queue = self._queues.get(client_id)
                while queue:
                    task = queue.popleft()
                    if task.task_id in self._awaited:  # skip tasks whose round has given up on them
                        return task
                left = deadline - time.monotonic()
                if left <= 0 or self._closed or not active():
                    return None
                cond.wait(min(left, 1.0))

    def deliver(self, client_id: int, task_id: str, reply: Reply) -> str | None:
        """Accept a client's reply; returns a reason when it is refused."""
        with self._lock:
            self._last_seen[client_id] = time.monotonic()
            owner = self._awaited.get(task_id)
            if owner is None:
                return f"no task {task_id!r} is awaited (it may have timed out)"
            if owner != client_id or reply.client_id != client_id:
                return f"task {task_id!r} belongs to another client"
            del self._awaited[task_id]
            self._replies[task_id] = reply
            self._replies_ready.notify_all()
            return None

    def collect(self, tasks: Sequence[Task], deadline: float, lost: Callable[[int], bool]) -> dict[str, Reply]:
        """Wait until every task has a reply, the deadline passes, or only lost clients are left.

        Tasks still unanswered are withdrawn: a late reply to them is refused.
        """
        ids = {t.task_id: t.request.client_id for t in tasks}
        with self._lock:
            while True:
                waiting = [tid for tid in ids if tid not in self._replies]
                if not waiting or time.monotonic() >= deadline:
                    break
                self._lock.release()  # lost() reads last_seen under the lock
                try:
                    gone = all(lost(ids[t]) for t in waiting)
                finally:
                    self._lock.acquire()
                if gone:
                    break
                self._replies_ready.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            got = {tid: self._replies.pop(tid) for tid in ids if tid in self._replies}
            for tid in ids:
                self._awaited.pop(tid, None)
            return got


class DeployedTransport:
    """``exchange(requests) -> replies`` over real clients, through a :class:`Dispatcher`.

    A round waits at most ``timeout_s``; a client silent for ``lost_after_s`` (no poll, push or
    heartbeat) is given up on early. Either way its reply is an error reply and the round goes on.
    """

    def __init__(self, dispatcher: Dispatcher, timeout_s: float, lost_after_s: float):
        self.dispatcher = dispatcher
        self.timeout_s = timeout_s
        self.lost_after_s = lost_after_s

    def _lost(self, client_id: int) -> bool:
        seen = self.dispatcher.last_seen(client_id)
        return seen is None or time.monotonic() - seen > self.lost_after_s

    def exchange(self, requests: Sequence[Request]) -> list[Reply]:
        tasks = [Task(uuid.uuid4().hex, r) for r in requests]
        self.dispatcher.submit(tasks)
        got = self.dispatcher.collect(tasks, time.monotonic() + self.timeout_s, self._lost)
        out = []
        for t in tasks:
            if t.task_id in got:
                out.append(got[t.task_id])
            elif self._lost(t.request.client_id):
                out.append(error_reply(t.request, "client_lost", f"client {t.request.client_id} stopped answering"))
            else:
                out.append(error_reply(t.request, "timeout", f"no reply within {self.timeout_s:g} s"))
        return out

    def close(self) -> None:
        """Nothing to release: the gRPC server is owned by whoever made the dispatcher."""
