"""Tasks waiting for clients and replies waiting for the round, with no network code.

The gRPC service (``deploy/service.py``) and the round logic meet here. The :class:`Dispatcher` lives in
the server's event loop (:class:`LoopThread`) and is only touched from it, so it needs no locks:
per-client task queues that long-polls wait on, the tasks whose replies are awaited, and when
each client was last heard from. The round logic runs in its own thread and reaches it through
:class:`DeployedTransport` (the same ``exchange(requests) -> replies`` as the simulation engines,
so :class:`~fedloom.server.SyncServer` runs unchanged): a round's requests become tasks, and the
replies that arrived (or error replies for clients that timed out, were lost or were refused)
come back.

Every reply is checked against the task it answers when it arrives
(:func:`~fedloom.server.validation.check_reply`); a refused one answers its task with the reason,
so the round learns at once and the client is told why.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fedloom.compression.updates import NO_COMPRESSION, Compression
from fedloom.errors import FedloomError
from fedloom.messages import ErrorReply, Reply, Request, TrainRequest, error_reply
from fedloom.server.validation import check_reply

T = TypeVar("T")
REPLY_SLACK_BYTES = 1 << 20  # framing and metrics a reply may carry beyond the model's own bytes


def reply_limit(request: Request, max_message_bytes: int) -> int:
    """The most bytes a reply to ``request`` may take on the wire.

    A train reply holds an update of the model it was sent, so it may be as large as the model's
    arrays plus :data:`REPLY_SLACK_BYTES`; an evaluation reply is a few numbers (the slack alone).
    """
    size = REPLY_SLACK_BYTES
    if isinstance(request, TrainRequest):
        size += sum(p.nbytes for p in request.params)
    return min(size, max_message_bytes)


@dataclass(frozen=True)
class Task:
    """One request addressed to one client, with the id its reply must carry and the reply's size limit."""

    task_id: str
    request: Request
    reply_limit: int


class LoopThread:
    """An asyncio event loop running in a daemon thread; other threads hand it coroutines with :meth:`call`."""

    def __init__(self, name: str = "fedloom-loop"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` in the loop and wait for its result (its exception is raised here)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Stop the loop after what is scheduled now, and wait for its thread."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


class Dispatcher:
    """Per-client task queues, the tasks whose replies are awaited, and when each client was last heard from.

    Only the event loop's thread may call it. ``max_examples`` bounds the example counts a reply
    may claim (see :func:`~fedloom.server.validation.check_reply`).
    """

    def __init__(self, max_examples: float | None = None, compression: Compression = NO_COMPRESSION,
                 masked_bytes: int = 0):
        self.max_examples = max_examples
        self.compression = compression  # a compressed update is decoded here once, to check it
        self.masked_bytes = masked_bytes  # secure aggregation: the length of a masked update (else 0)
        self._queues: dict[int, deque[Task]] = {}
        self._wake: dict[int, asyncio.Event] = {}
        self._open: dict[str, tuple[Task, asyncio.Future[Reply]]] = {}  # awaited task id -> task, its reply
        self._last_seen: dict[int, float] = {}
        self._closed = False

    def _event(self, client_id: int) -> asyncio.Event:
        return self._wake.setdefault(client_id, asyncio.Event())

    def close(self) -> None:
        """No more tasks: waiting polls return at once."""
        self._closed = True
        for event in self._wake.values():
            event.set()

    # -- clients -----------------------------------------------------------------------------------

    def seen(self, client_id: int) -> None:
        self._last_seen[client_id] = time.monotonic()

    def connected(self, within_s: float) -> list[int]:
        """Clients heard from in the last ``within_s`` seconds."""
        now = time.monotonic()
        return sorted(c for c, t in self._last_seen.items() if now - t <= within_s)

    def lost(self, client_id: int, after_s: float) -> bool:
        seen = self._last_seen.get(client_id)
        return seen is None or time.monotonic() - seen > after_s

    def wake(self, client_id: int) -> None:
        """The client was heard from, and its waiting polls check again whether they are still valid."""
        self.seen(client_id)
        self._event(client_id).set()

    def drop(self, client_id: int, code: str, reason: str) -> None:
        """Forget ``client_id`` (it was revoked): its open tasks are answered with an error, its polls wake."""
        self._last_seen.pop(client_id, None)
        self._queues.pop(client_id, None)
        for task, _ in list(self._open.values()):
            if task.request.client_id == client_id:
                self._answer(task.task_id, error_reply(task.request, code, reason))
        self._event(client_id).set()

    # -- the clients' side -------------------------------------------------------------------------

    async def next_task(self, client_id: int, wait_s: float, valid: Callable[[], bool] = lambda: True) -> Task | None:
        """The client's next task, waiting up to ``wait_s`` seconds for one (long-poll).

        None when the time is up, the dispatcher is closed, or ``valid()`` turns false (the
        client's session ended).
        """
        deadline = time.monotonic() + wait_s
        event = self._event(client_id)
        while True:
            self.seen(client_id)
            if self._closed or not valid():
                return None
            queue = self._queues.get(client_id)
            while queue:
                task = queue.popleft()
                if task.task_id in self._open:  # skip tasks whose round has given up on them
                    return task
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            event.clear()
            try:
                await asyncio.wait_for(event.wait(), left)
            except TimeoutError:
                pass

    def requeue(self, task: Task) -> None:
        """Put back a task whose hand-over failed (the poll broke while it was sent), if still awaited."""
        if task.task_id in self._open:
            self._queues.setdefault(task.request.client_id, deque()).appendleft(task)
            self._event(task.request.client_id).set()

    def owed(self, client_id: int) -> list[Task]:
        """The tasks whose replies are awaited from ``client_id``."""
        return [t for t, _ in self._open.values() if t.request.client_id == client_id]

    def deliver(self, client_id: int, task_id: str, reply: Reply) -> ErrorReply | None:
        """Take a client's reply; None when accepted, else why it was refused.

        A reply to another client's task, or to a task not awaited, is refused and changes nothing.
        A reply that does not answer its task (kind, round, shapes, impossible numbers) is refused
        and closes the task: the round records the reason. An error reply of any kind (a client that
        could not read its task says so in a step reply) answers the task with the client's reason.
        """
        self.seen(client_id)
        found = self._open.get(task_id)
        if found is None or found[0].request.client_id != client_id:
            return ErrorReply("not_awaited", f"no task {task_id[:64]!r} of this client is awaited "
                                             "(it may have timed out)")
        request = found[0].request
        error = getattr(reply, "error", None)
        if isinstance(error, ErrorReply) and getattr(reply, "round", None) == request.round:
            self._answer(task_id, error_reply(request, error.code[:64], error.reason[:2000]))
            return None
        try:
            check_reply(request, reply, self.max_examples, self.compression, self.masked_bytes)  # checked again later
        except FedloomError as exc:
            self._answer(task_id, error_reply(request, exc.code, f"refused by the server: {exc.message}"))
            return ErrorReply(exc.code, exc.message)
        self._answer(task_id, reply)
        return None

    def _answer(self, task_id: str, reply: Reply) -> None:
        _, future = self._open.pop(task_id)
        if not future.done():
            future.set_result(reply)

    # -- the round's side --------------------------------------------------------------------------

    async def exchange(self, requests: Sequence[Request], timeout_s: float, lost_after_s: float,
                       max_message_bytes: int) -> list[Reply]:
        """Queue one task per request and wait for the replies (see :class:`DeployedTransport`)."""
        loop = asyncio.get_running_loop()
        tasks = [Task(uuid.uuid4().hex, r, reply_limit(r, max_message_bytes)) for r in requests]
        for task in tasks:
            self._open[task.task_id] = (task, loop.create_future())
            self._queues.setdefault(task.request.client_id, deque()).append(task)
            self._event(task.request.client_id).set()
        futures = {t.task_id: self._open[t.task_id][1] for t in tasks}
        deadline = time.monotonic() + timeout_s
        while True:
            waiting = [t for t in tasks if not futures[t.task_id].done()]
            left = deadline - time.monotonic()
            if not waiting or left <= 0 or all(self.lost(t.request.client_id, lost_after_s) for t in waiting):
                break
            await asyncio.wait([futures[t.task_id] for t in waiting], timeout=min(0.5, left))
        out = []
        for t in tasks:
            future = futures[t.task_id]
            self._open.pop(t.task_id, None)  # withdrawn: a late reply is refused
            if future.done():
                out.append(future.result())
            elif self.lost(t.request.client_id, lost_after_s):
                out.append(error_reply(t.request, "client_lost", f"client {t.request.client_id} stopped answering"))
            else:
                out.append(error_reply(t.request, "timeout", f"no reply within {timeout_s:g} s"))
        return out


class DeployedTransport:
    """``exchange(requests) -> replies`` over real clients, through a :class:`Dispatcher` in a :class:`LoopThread`.

    A round waits at most ``timeout_s``; a client silent for ``lost_after_s`` (no poll, push or
    heartbeat) is given up on early. Either way its reply is an error reply and the round goes on.
    """

    def __init__(self, loop: LoopThread, dispatcher: Dispatcher, timeout_s: float, lost_after_s: float,
                 max_message_bytes: int):
        self.loop = loop
        self.dispatcher = dispatcher
        self.timeout_s = timeout_s
        self.lost_after_s = lost_after_s
        self.max_message_bytes = max_message_bytes

    def exchange(self, requests: Sequence[Request]) -> list[Reply]:
        return self.loop.call(self.dispatcher.exchange(requests, self.timeout_s, self.lost_after_s,
                                                       self.max_message_bytes))

    def connected(self) -> list[int]:
        """Clients heard from within ``lost_after_s``."""
        return self.loop.call(_call(self.dispatcher.connected, self.lost_after_s))

    def close(self) -> None:
        """Nothing to release: the loop and the gRPC server belong to whoever made them."""


async def _call(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)
