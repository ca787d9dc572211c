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

What the server sees of each client is measured here: per task, the seconds its bytes took to hand
over, the client's seconds with it, the seconds its reply took to arrive, and the bytes each way
(:class:`Measured`); and per client, the intervals in which it was connected (:meth:`Dispatcher.presence`).
The deployed server keeps both in its SQLite state, the selector learns from the round trips, and
``fedloom trace`` turns them into a device population a simulation replays.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from fedloom.compression.updates import NO_COMPRESSION, Compression
from fedloom.errors import FedloomError
from fedloom.messages import ErrorReply, EvaluateRequest, Reply, Request, TrainReply, TrainRequest, Update, error_reply
from fedloom.server.validation import check_reply, to_delta

T = TypeVar("T")
REPLY_SLACK_BYTES = 1 << 20  # framing and metrics a reply may carry beyond the model's own bytes
MAX_WITHDRAWN = 10_000  # tasks whose late replies are still measured
MAX_RECEIVED = 100_000  # journaled tasks whose replies, pushed again, are answered "accepted"


def _has_update(reply: Reply) -> bool:
    return isinstance(reply, TrainReply) and reply.update is not None


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
    version: int = -1  # an asynchronous task: the model version it was sent (its update is journaled); else -1


@dataclass
class Timing:
    """When a task's parts happened (``time.monotonic()``; NaN: not yet) and its bytes each way."""

    queued: float = math.nan  # it was queued for its client
    handed: float = math.nan  # a poll of its client took it
    sent: float = math.nan  # its last chunk went to gRPC
    arriving: float = math.nan  # the first chunk of its reply arrived
    done: float = math.nan  # its reply was taken
    gave_up: float = math.nan  # its round stopped waiting for it
    wall: float = math.nan  # ``time.time()`` when it was handed over
    down_bytes: int = 0
    up_bytes: int = 0


@dataclass(frozen=True)
class Measured:
    """What the server measured of one task: the seconds it took to hand over (``down_s``), the client's seconds
    with it (``work_s``: decoding, training, encoding, and the network's latency), the seconds its reply took
    to arrive (``up_s``), the bytes each way, the examples it trained on and how it ended (``"ok"`` or the
    error code). Parts that did not happen are NaN (a task never taken, a reply that never came)."""

    client_id: int
    round: int
    kind: str
    outcome: str
    sent_at: float  # wall-clock seconds (``time.time()``) when the client took the task
    down_s: float
    work_s: float
    up_s: float
    down_bytes: int
    up_bytes: int
    examples: float
    waited_s: float = math.nan  # from hand-over to its round giving up on it (a lower bound of its round trip)

    @property
    def round_trip_s(self) -> float:
        return self.down_s + self.work_s + self.up_s


def measure_task(task: Task, timing: Timing, reply: Reply) -> Measured:
    error = getattr(reply, "error", None)
    update = reply.update if isinstance(reply, TrainReply) else None
    examples = float(update.metrics.get("examples", update.weight)) if update is not None else 0.0
    return Measured(task.request.client_id, task.request.round, type(task.request).__name__,
                    error.code if error is not None else "ok", timing.wall, timing.sent - timing.handed,
                    timing.arriving - timing.sent, timing.done - timing.arriving, timing.down_bytes, timing.up_bytes,
                    examples, timing.gave_up - timing.handed)


@dataclass
class Presence:
    """The intervals (wall-clock ``time.time()`` seconds) in which each client was connected: heard from with
    gaps of at most ``gap_s`` seconds (a poll, a push or a heartbeat)."""

    gap_s: float
    intervals: dict[int, list[list[float]]] = field(default_factory=dict)

    def seen(self, client_id: int, now: float) -> None:
        spans = self.intervals.setdefault(client_id, [])
        if spans and now - spans[-1][1] <= self.gap_s:
            spans[-1][1] = now
        else:
            spans.append([now, now])


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
                 masked_bytes: int = 0, presence_gap_s: float = 15.0):
        self.max_examples = max_examples
        self.compression = compression  # a compressed update is decoded here once, to check it
        self.masked_bytes = masked_bytes  # secure aggregation: the length of a masked update (else 0)
        self.presence = Presence(presence_gap_s)
        self._queues: dict[int, deque[Task]] = {}
        self._wake: dict[int, asyncio.Event] = {}
        self._open: dict[str, tuple[Task, asyncio.Future[Reply]]] = {}  # awaited task id -> task, its reply
        self._timing: dict[str, Timing] = {}  # the awaited tasks' measurements so far
        self._withdrawn: dict[str, tuple[Task, Timing]] = {}  # tasks a round stopped waiting for: late replies
        self.late: list[Measured] = []  # the late replies that came, measured
        self._last_seen: dict[int, float] = {}
        self._polled: dict[int, float] = {}  # when each client last asked for a task
        self._closed = False
        # The asynchronous server's: where an accepted update is made durable before its push is answered, the
        # tasks it awaits, the updates being written, and the journaled tasks (a push again is answered "accepted").
        self.journal: Callable[[Task, TrainReply], Awaitable[None]] | None = None
        self._durable: dict[str, tuple[Task, asyncio.Future[Reply]]] = {}
        self._writing: set[str] = set()
        self.received: OrderedDict[str, int] = OrderedDict()

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
        self.presence.seen(client_id, time.time())

    def connected(self, within_s: float) -> list[int]:
        """Clients heard from in the last ``within_s`` seconds."""
        now = time.monotonic()
        return sorted(c for c, t in self._last_seen.items() if now - t <= within_s)

    def busy(self) -> set[int]:
        """Clients still working on a task a round stopped waiting for (taken, and no poll since): asked again,
        they would start late."""
        return {t.request.client_id for t, timing in self._withdrawn.values()
                if timing.handed > self._polled.get(t.request.client_id, -math.inf)}

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
            if task.request.client_id == client_id and task.task_id not in self._writing:
                self._answer(task.task_id, error_reply(task.request, code, reason))
        self._event(client_id).set()

    # -- the clients' side -------------------------------------------------------------------------

    async def next_task(self, client_id: int, wait_s: float, valid: Callable[[], bool] = lambda: True) -> Task | None:
        """The client's next task, waiting up to ``wait_s`` seconds for one (long-poll).

        None when the time is up, the dispatcher is closed, or ``valid()`` turns false (the
        client's session ended).
        """
        deadline = time.monotonic() + wait_s
        self._polled[client_id] = time.monotonic()
        event = self._event(client_id)
        while True:
            self.seen(client_id)
            if self._closed or not valid():
                return None
            queue = self._queues.get(client_id)
            while queue:
                task = queue.popleft()
                if task.task_id in self._open:  # skip tasks whose round has given up on them
                    timing = self._timing[task.task_id]
                    timing.handed, timing.wall = time.monotonic(), time.time()
                    return task
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            event.clear()
            try:
                await asyncio.wait_for(event.wait(), left)
            except TimeoutError:
                pass

    def sent(self, task: Task, down_bytes: int) -> None:
        """The task's last chunk went to gRPC: ``down_bytes`` in all."""
        timing = self._timing.get(task.task_id)
        if timing is not None:
            timing.sent, timing.down_bytes = time.monotonic(), down_bytes

    def requeue(self, task: Task) -> None:
        """Put back a task whose hand-over failed (the poll broke while it was sent), if still awaited."""
        if task.task_id in self._open:
            self._queues.setdefault(task.request.client_id, deque()).appendleft(task)
            self._event(task.request.client_id).set()

    def owed(self, client_id: int) -> list[Task]:
        """The tasks whose replies are awaited from ``client_id``."""
        return [t for t, _ in self._open.values() if t.request.client_id == client_id]

    def expected(self, client_id: int) -> list[Task]:
        """The tasks whose replies may come from ``client_id``: awaited, or given up on by their round (a late
        reply is received to be measured, then refused)."""
        return self.owed(client_id) + [t for t, _ in self._withdrawn.values() if t.request.client_id == client_id]

    def deliver(self, client_id: int, task_id: str, reply: Reply, arriving: float = math.nan,
                up_bytes: int = 0) -> ErrorReply | None:
        """Take a client's reply (its first chunk arrived at ``arriving``, ``time.monotonic()``; ``up_bytes`` in all);
        None when accepted, else why it was refused.

        A reply to another client's task, or to a task not awaited, is refused and changes nothing.
        A reply that does not answer its task (kind, round, shapes, impossible numbers) is refused
        and closes the task: the round records the reason. An error reply of any kind (a client that
        could not read its task says so in a step reply) answers the task with the client's reason.
        """
        found = self._arrived(client_id, task_id, reply, arriving, up_bytes)
        if isinstance(found, ErrorReply) or found is None:
            return found
        self._answer(task_id, reply)
        return None

    async def receive(self, client_id: int, task_id: str, reply: Reply, arriving: float = math.nan,
                      up_bytes: int = 0) -> ErrorReply | None:
        """:meth:`deliver`, and for an asynchronous task's update: made durable by :attr:`journal` (as the checked
        delta it stands for) before it answers the task and the push is accepted."""
        found = self._arrived(client_id, task_id, reply, arriving, up_bytes)
        if isinstance(found, ErrorReply) or found is None:
            return found
        task, checked = found
        if task.version < 0 or self.journal is None:
            self._answer(task_id, reply)
            return None
        u = checked.update
        assert isinstance(task.request, TrainRequest) and u is not None
        entry = TrainReply(checked.client_id, checked.round,
                           update=Update(to_delta(u, task.request.params), u.weight, "delta", dict(u.metrics)))
        self._writing.add(task_id)
        try:
            await self.journal(task, entry)
        except Exception as exc:  # noqa: BLE001 - the update is not kept; its task and its client are told why
            self._answer(task_id, error_reply(task.request, "server_error", f"the server could not keep it: {exc}"))
            return ErrorReply("server_error", "the server could not keep the update (its journal failed: see its log); "
                                              "the task is over")
        finally:
            self._writing.discard(task_id)
        self.received[task_id] = client_id
        while len(self.received) > MAX_RECEIVED:
            self.received.popitem(last=False)
        self._answer(task_id, entry)
        return None

    def _arrived(self, client_id: int, task_id: str, reply: Reply, arriving: float,
                 up_bytes: int) -> ErrorReply | tuple[Task, Reply] | None:
        """The checks :meth:`deliver` makes: why ``reply`` is refused, None when it answered its task with the
        client's error, or its task and the reply as checked (a compressed update decoded), still to be answered."""
        self.seen(client_id)
        found = self._open.get(task_id)
        if found is None or found[0].request.client_id != client_id or task_id in self._writing:
            late = self._withdrawn.get(task_id)
            if late is not None and late[0].request.client_id == client_id:  # recorded, not used
                del self._withdrawn[task_id]
                try:  # what it claims (its example count) is checked as an awaited reply's would be
                    check_reply(late[0].request, reply, self.max_examples, self.compression, self.masked_bytes)
                except FedloomError as exc:
                    return ErrorReply(exc.code, exc.message)
                late[1].arriving, late[1].done, late[1].up_bytes = arriving, time.monotonic(), up_bytes
                self.late.append(replace(measure_task(*late, reply), outcome="late"))
            return ErrorReply("not_awaited", f"no task {task_id[:64]!r} of this client is awaited "
                                             "(it may have timed out)")
        request = found[0].request
        timing = self._timing[task_id]
        timing.arriving, timing.done, timing.up_bytes = arriving, time.monotonic(), up_bytes
        error = getattr(reply, "error", None)
        if isinstance(error, ErrorReply) and getattr(reply, "round", None) == request.round:
            self._answer(task_id, error_reply(request, error.code[:64], error.reason[:2000]))
            return None
        try:
            checked = check_reply(request, reply, self.max_examples, self.compression, self.masked_bytes)
        except FedloomError as exc:
            self._answer(task_id, error_reply(request, exc.code, f"refused by the server: {exc.message}"))
            return ErrorReply(exc.code, exc.message)
        return found[0], checked

    def _answer(self, task_id: str, reply: Reply) -> None:
        found = self._open.pop(task_id, None)
        if found is not None and not found[1].done():
            found[1].set_result(reply)

    # -- the asynchronous server's side ------------------------------------------------------------

    def _queue(self, task: Task, future: asyncio.Future[Reply]) -> None:
        self._open[task.task_id] = (task, future)
        self._timing[task.task_id] = Timing(queued=time.monotonic())
        self._queues.setdefault(task.request.client_id, deque()).append(task)
        self._event(task.request.client_id).set()

    def submit(self, requests: Sequence[TrainRequest], version: int, max_message_bytes: int) -> list[Task]:
        """Queue asynchronous tasks on model ``version``; their updates are journaled as they arrive and
        :meth:`arrivals` hands them over."""
        loop = asyncio.get_running_loop()
        tasks = [Task(uuid.uuid4().hex, r, reply_limit(r, max_message_bytes), version) for r in requests]
        for task in tasks:
            future = loop.create_future()
            self._durable[task.task_id] = (task, future)
            self._queue(task, future)
        return tasks

    async def arrivals(self, timeout_s: float, lost_after_s: float,
                       wait_s: float) -> tuple[list[tuple[Task, Reply, Measured]], list[Measured]]:
        """The asynchronous tasks that ended, each with its reply and measurements, after waiting up to ``wait_s`` for
        one; and the late replies measured meanwhile. A task whose client is lost, or that is not answered within
        ``timeout_s``, ends with an error reply (a reply that comes later is measured as ``late``, then refused)."""
        futures = [f for _, f in self._durable.values()]
        if futures and not any(f.done() for f in futures):
            await asyncio.wait(futures, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
        now, out = time.monotonic(), []
        for task_id, (task, future) in list(self._durable.items()):
            timing, cid = self._timing[task_id], task.request.client_id
            if future.done():
                reply = future.result()
            elif task_id in self._writing:
                continue
            elif self.lost(cid, lost_after_s):
                reply = error_reply(task.request, "client_lost", f"client {cid} stopped answering")
            elif now - timing.queued > timeout_s:
                reply = error_reply(task.request, "timeout", f"no reply within {timeout_s:g} s")
                timing.gave_up = now
                self._withdrawn[task_id] = (task, timing)  # its reply may still come: measured as late
                while len(self._withdrawn) > MAX_WITHDRAWN:
                    del self._withdrawn[next(iter(self._withdrawn))]
            else:
                continue
            del self._durable[task_id]
            self._open.pop(task_id, None)
            out.append((task, reply, measure_task(task, self._timing.pop(task_id), reply)))
        late, self.late = self.late, []
        return out, late

    # -- the round's side --------------------------------------------------------------------------

    async def exchange(self, requests: Sequence[Request], timeout_s: float, lost_after_s: float,
                       max_message_bytes: int, keep: int = 0,
                       deadline_s: float = 0.0) -> tuple[list[Reply], list[Measured]]:
        """Queue one task per request and wait for the replies (see :class:`DeployedTransport`); each task's
        measurements come with them, and those of late replies to earlier tasks.

        ``keep`` > 0 (over-selection): stop waiting once that many updates arrived; later ones are not kept.
        ``deadline_s`` > 0: stop waiting then; what has not arrived is not kept (a reply that comes later is
        refused and measured as ``late``)."""
        loop = asyncio.get_running_loop()
        tasks = [Task(uuid.uuid4().hex, r, reply_limit(r, max_message_bytes)) for r in requests]
        for task in tasks:
            self._queue(task, loop.create_future())
        futures = {t.task_id: self._open[t.task_id][1] for t in tasks}
        start = time.monotonic()
        deadline = start + (min(deadline_s, timeout_s) if deadline_s > 0 else timeout_s)

        def updates() -> list[Task]:  # the tasks answered with an update, in order of arrival
            done = [t for t in tasks if futures[t.task_id].done() and _has_update(futures[t.task_id].result())]
            return sorted(done, key=lambda t: self._timing[t.task_id].done)

        while True:
            waiting = [t for t in tasks if not futures[t.task_id].done()]
            left = deadline - time.monotonic()
            if (not waiting or left <= 0 or all(self.lost(t.request.client_id, lost_after_s) for t in waiting)
                    or (keep and len(updates()) >= keep)):
                break
            await asyncio.wait([futures[t.task_id] for t in waiting], timeout=min(0.5, left))
        arrived = updates() if keep else []
        kept = {t.task_id for t in arrived[:keep]} if keep else None
        enough = bool(keep) and len(arrived) >= keep  # once, not per task: a round may have thousands
        out = []
        for t in tasks:
            future = futures[t.task_id]
            self._open.pop(t.task_id, None)  # withdrawn: a late reply is refused
            if not future.done():
                self._timing[t.task_id].gave_up = time.monotonic()
            if future.done() and (kept is None or t.task_id in kept or not _has_update(future.result())):
                out.append(future.result())
                continue
            overdue = deadline_s > 0 and time.monotonic() >= start + deadline_s
            if future.done() or (enough and not overdue):
                why = f"over-selected: not among the first {keep} updates"
            elif overdue:
                why = f"straggler: no reply within the {deadline_s:g} s deadline"
            elif self.lost(t.request.client_id, lost_after_s):
                out.append(error_reply(t.request, "client_lost", f"client {t.request.client_id} stopped answering"))
                continue
            else:
                out.append(error_reply(t.request, "timeout", f"no reply within {timeout_s:g} s"))
                continue
            out.append(error_reply(t.request, "not_kept", why))
            if not future.done():  # its reply may still come: measured as late
                self._withdrawn[t.task_id] = (t, self._timing[t.task_id])
                while len(self._withdrawn) > MAX_WITHDRAWN:
                    del self._withdrawn[next(iter(self._withdrawn))]
        measured = [measure_task(t, self._timing.pop(t.task_id), r) for t, r in zip(tasks, out)]
        late, self.late = self.late, []
        return out, measured + late


class DeployedTransport:
    """``exchange(requests) -> replies`` over real clients, through a :class:`Dispatcher` in a :class:`LoopThread`.

    A round waits at most ``timeout_s``; a client silent for ``lost_after_s`` (no poll, push or
    heartbeat) is given up on early. Either way its reply is an error reply and the round goes on.
    The pacer may set ``keep`` (over-selection: a batch of train requests ends with that many updates)
    and ``deadline_s`` (wall-clock seconds a batch of train or step requests is waited for); what is
    not kept is answered ``not_kept``, as on the simulated clock.
    """

    def __init__(self, loop: LoopThread, dispatcher: Dispatcher, timeout_s: float, lost_after_s: float,
                 max_message_bytes: int):
        self.loop = loop
        self.dispatcher = dispatcher
        self.timeout_s = timeout_s
        self.lost_after_s = lost_after_s
        self.max_message_bytes = max_message_bytes
        self.measured: list[Measured] = []  # every task's since the last :meth:`take_measured`
        self.keep = 0
        self.deadline_s = 0.0
        self.speed: dict[int, tuple[float, float]] = {}  # client -> (its seconds per example, its transfer seconds)
        self._late: list[Measured] = []  # late replies :meth:`ready` took in since the last exchange
        self._last: list[Measured] = []  # the last exchange's, and late replies taken in since the one before

    def exchange(self, requests: Sequence[Request]) -> list[Reply]:
        train = bool(requests) and all(isinstance(r, TrainRequest) for r in requests)
        timed = bool(requests) and not any(isinstance(r, EvaluateRequest) for r in requests)
        replies, measured = self.loop.call(self.dispatcher.exchange(
            requests, self.timeout_s, self.lost_after_s, self.max_message_bytes, self.keep if train else 0,
            self.deadline_s if timed else 0.0))
        self._last, self._late = [*self._late, *measured], []
        self._absorb(measured)
        return replies

    def submit(self, requests: Sequence[TrainRequest], version: int) -> list[Task]:
        """Queue asynchronous tasks on model ``version`` (see :meth:`Dispatcher.submit`)."""
        return self.loop.call(_call(self.dispatcher.submit, requests, version, self.max_message_bytes))

    def arrivals(self, wait_s: float) -> list[tuple[Task, Reply, Measured]]:
        """The asynchronous tasks that ended, waiting up to ``wait_s`` seconds for one (:meth:`Dispatcher.arrivals`)."""
        out, late = self.loop.call(self.dispatcher.arrivals(self.timeout_s, self.lost_after_s, wait_s))
        self._absorb([m for _, _, m in out] + late)
        return out

    def _absorb(self, measured: list[Measured]) -> None:
        self.measured.extend(measured)
        for m in measured:  # the latest measured speed of each client that trained: what partial work is sized by
            if m.kind == "TrainRequest" and m.outcome in ("ok", "late") and m.examples > 0 and math.isfinite(m.work_s):
                self.speed[m.client_id] = (m.work_s / m.examples, m.down_s + m.up_s)

    def round_trips(self) -> dict[int, float]:
        """What the selector learns from, by client: the measured round trips of the last exchange's answered tasks
        and of late replies that came meanwhile, and for a task given up on the time it was waited for (a lower
        bound, as on the simulated clock)."""
        out = {}
        for m in self._last:
            trip = m.round_trip_s if m.outcome in ("ok", "late") else m.waited_s
            if math.isfinite(trip):
                out[m.client_id] = trip
        return out

    def take_measured(self) -> list[Measured]:
        """The tasks measured since the last call."""
        out, self.measured = self.measured, []
        return out

    def presence(self) -> dict[int, list[tuple[float, float]]]:
        """Each client's connected intervals so far (``time.time()`` seconds)."""
        return self.loop.call(_call(lambda: {c: [(a, b) for a, b in spans]
                                             for c, spans in self.dispatcher.presence.intervals.items()}))

    def connected(self) -> list[int]:
        """Clients heard from within ``lost_after_s``."""
        return self.loop.call(_call(self.dispatcher.connected, self.lost_after_s))

    def ready(self) -> list[int]:
        """Connected clients that are not still working on a task a round stopped waiting for (and what the late
        replies that came meanwhile measured is taken in)."""
        def look() -> tuple[list[int], list[Measured]]:
            late, self.dispatcher.late = self.dispatcher.late, []
            return sorted(set(self.dispatcher.connected(self.lost_after_s)) - self.dispatcher.busy()), late

        ready, late = self.loop.call(_call(look))
        self._absorb(late)
        self._late.extend(late)  # the selector hears of them with the next exchange's
        return ready

    def close(self) -> None:
        """Nothing to release: the loop and the gRPC server belong to whoever made them."""


async def _call(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)
