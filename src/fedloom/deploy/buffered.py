"""FedBuff and FedAsync over gRPC: the simulation's :class:`AsyncServer`, fed by real clients.

The server keeps ``server.concurrency`` tasks out (each on the model version current when it was
sent, to a connected client with no task), as :class:`~fedloom.simulation.timeline.AsyncRun` does on
the simulated clock: a client is drawn uniformly from the ready ones, seeded by the task's number.
Each arriving update is checked at the door and journaled (``deploy/journal.py``) before its push is
answered; the round loop's thread then adds it to the buffer with the staleness of the version it
trained on, and every ``buffer_size`` arrivals the aggregator and the server optimizer make the next
version, which the deployed server checkpoints like a synchronous round (marking the updates it used
in the same transaction). Updates that arrive together with the one that closes a buffer go to the
next buffer, with the staleness they have then.

After a restart the buffer is what the journal holds that no done version used, fed again in the
order it was accepted; tasks in flight at the crash are not known to the new server (their replies
are refused, and their clients asked again). Task numbers only grow across restarts: they are
reserved in blocks in the state database.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from fedloom.config import Config
from fedloom.deploy.journal import Entry, Journal
from fedloom.deploy.state import ServerState as StateStore
from fedloom.messages import TrainReply
from fedloom.params import ParamSpec
from fedloom.seeding import keyed_rng
from fedloom.server.asynchronous import Arrival, AsyncServer, AsyncState, buffer_result
from fedloom.server.sync import RoundResult, ServerState
from fedloom.transport.dispatch import DeployedTransport
from fedloom.transport.metered import Metered

log = logging.getLogger("fedloom")

RESERVE = 1000  # task numbers reserved in the state database at a time
WAIT_S = 0.5  # longest wait for an arrival before looking for free clients again


class DeployedAsync:
    """FedBuff/FedAsync on real clients; :meth:`next_update` waits for arrivals until the next server update."""

    def __init__(self, cfg: Config, server: AsyncServer, transport: Metered, state: AsyncState, journal: Journal,
                 store: StateStore, run_id: int, num_clients: int):
        self.cfg, self.server, self.transport, self.state = cfg, server, transport, state
        self.store, self.run_id, self.num_clients = store, run_id, num_clients
        self.engine: DeployedTransport = transport.engine  # type: ignore[assignment]
        self.concurrency = cfg.server.concurrency or cfg.server.clients_per_round
        self.pending: dict[str, tuple[int, int]] = {}  # task id -> (client, model version sent)
        self.dispatched = self.reserved = store.counter(run_id, "dispatched")
        self.queue: deque[tuple[str, int, TrainReply]] = deque(  # what arrived, still to add: journaled ones first
            (e.task_id, e.version_sent, e.reply()) for e in journal.buffered(ParamSpec.of(state.params)))
        if self.queue:
            log.info("the journal holds %d accepted updates no version used: they are added first", len(self.queue))
        self.buffered: list[str] = []  # the task ids of the updates in the buffer
        self.applied: list[str] = []  # those the last server update used (marked in its checkpoint's transaction)

    def _launch(self) -> None:
        """Send the current model to free ready clients, up to ``concurrency`` tasks out."""
        free = self.concurrency - len(self.pending)
        if free <= 0:
            return
        busy = {c for c, _ in self.pending.values()}
        ready = [c for c in self.engine.ready() if c < self.num_clients and c not in busy]
        requests = []
        while free > 0 and ready:
            self.dispatched += 1
            cid = ready.pop(keyed_rng(self.cfg.run.seed, self.dispatched, 3).randint(len(ready)))
            requests.append(self.server.request(self.state, cid, self.dispatched))
            free -= 1
        if not requests:
            return
        if self.dispatched > self.reserved:  # durable before any task carries the number
            self.reserved = self.dispatched + RESERVE
            self.store.set_counter(self.run_id, "dispatched", self.reserved)
        for task in self.engine.submit(requests, self.state.version):
            self.pending[task.task_id] = (task.request.client_id, self.state.version)

    def _arrive(self) -> None:
        """Wait for tasks to end (a short while), and queue what they brought, with the traffic they measured."""
        for task, reply, measured in self.engine.arrivals(WAIT_S):
            _, version = self.pending.pop(task.task_id)
            self.transport.bytes_down += measured.down_bytes
            self.transport.bytes_up += measured.up_bytes if isinstance(reply, TrainReply) and reply.update else 0
            self.queue.append((task.task_id, version, reply))  # type: ignore[arg-type]

    def next_update(self) -> tuple[RoundResult, ServerState]:
        """Add arrivals to the buffer until it closes; the arrivals make up the "round"."""
        arrivals: list[tuple[Arrival, TrainReply]] = []
        waited = time.monotonic()
        while True:
            if not self.queue:
                self._launch()
                self._arrive()
                if not self.pending and not self.queue and time.monotonic() - waited > 60:
                    log.warning("no client is ready for a task: waiting for clients to connect")
                    waited = time.monotonic()
                continue
            task_id, version, reply = self.queue.popleft()
            u = reply.update
            if u is None:
                error = reply.error
                reason = f"{error.code}: {error.reason}" if error is not None else "no update"
                arrival = Arrival(reply.client_id, self.state.version - version, False, reason)
            else:
                arrival, self.state = self.server.add(self.state, reply.client_id, version, u.values, float(u.weight),
                                                      u.metrics)
                self.buffered.append(task_id)
            arrivals.append((arrival, reply))
            if arrival.aggregated:
                self.applied, self.buffered = self.buffered, []
                return buffer_result(self.state, arrivals)


def journal_entry(task_id: str, version: int, reply: TrainReply) -> Entry:
    """The journal's record of a checked update to task ``task_id`` sent on model ``version``."""
    assert reply.update is not None
    return Entry(task_id, reply.client_id, reply.round, version, reply.update)
