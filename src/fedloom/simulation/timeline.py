"""Simulated time: the synchronous clock of a run with a device population, and asynchronous runs.

:class:`SimulatedClock` runs synchronous rounds on simulated time (see ``hetero/clock.py``);
:class:`AsyncRun` runs FedBuff/FedAsync (``server/asynchronous.py``) as a discrete-event
simulation: ``concurrency`` clients train at once, each on the model version it was sent; an
arrival feeds the server's buffer and frees its slot for the next available client.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedloom.client.torch_work import TorchClientWork
from fedloom.config import Config
from fedloom.data.dataset import FederatedDataset
from fedloom.errors import ConfigError, RoundError
from fedloom.hetero.clock import message_bytes, run_clock, run_flops, shrink_to_deadline
from fedloom.hetero.profiles import DeviceProfile, load_population, mobile, silo, task_duration
from fedloom.messages import ErrorReply, Reply, Request, StepRequest, TrainReply, TrainRequest
from fedloom.params import Params
from fedloom.secagg.protocol import STEPS, SecureSum
from fedloom.seeding import keyed_rng
from fedloom.server.asynchronous import AsyncServer, AsyncState, buffer_result
from fedloom.server.sync import RoundResult, ServerState, SyncServer, mean_loss
from fedloom.server.validation import masked_door
from fedloom.transport.base import Transport


def load_profiles(cfg: Config, num_clients: int) -> list[DeviceProfile] | None:
    """The device population ``[hetero] population`` names, one profile per client; None without one."""
    name = cfg.hetero.population
    if not name:
        return None
    if name in ("mobile", "silo"):
        return (mobile if name == "mobile" else silo)(num_clients, cfg.run.seed)
    profiles = load_population(name)
    if len(profiles) != num_clients:
        raise ConfigError("hetero.population", f"{name} has {len(profiles)} devices but the data {num_clients} clients")
    return profiles


class SimulatedClock:
    """Simulated time and traffic of a run with a device population (see ``hetero/clock.py``).

    It paces synchronous rounds (a ``rounds.Pacer``): only available clients are asked, and a
    round keeps the first arrivals before its deadline, at simulated times from the device profiles.
    """

    def __init__(self, cfg: Config, profiles: list[DeviceProfile], flops: float, full_steps: list[int]):
        self.cfg, self.profiles, self.flops, self.full_steps = cfg, profiles, flops, full_steps
        self.now = 0.0
        self.trips = self.bytes_down = self.bytes_up = 0
        self.k = 0  # clients_per_round of the round in progress

    @classmethod
    def create(cls, cfg: Config, dataset: FederatedDataset, work: TorchClientWork) -> SimulatedClock:
        profiles = load_profiles(cfg, len(dataset))
        flops = run_flops(cfg, work.model, dataset)
        c = cfg.client
        full = [min(c.local_epochs * -(-d.num_train // c.batch_size), c.max_steps or np.inf) for d in dataset.clients]
        return cls(cfg, profiles, flops, [int(f) for f in full])  # type: ignore[arg-type]

    def _available(self) -> list[int]:
        while True:
            ready = [i for i, p in enumerate(self.profiles) if p.availability.is_available(self.now)]
            if ready:
                return ready
            nxt = min(p.availability.next_available(self.now) for p in self.profiles)
            if not np.isfinite(nxt):
                raise ConfigError("hetero.population", f"no device is ever available after {self.now:.0f} s")
            self.now = nxt

    def requests(self, server: SyncServer, state: ServerState) -> tuple[list[TrainRequest], ServerState]:
        """The pacer's first half (``rounds.Pacer``): the available clients, over-selected; partial work."""
        h = self.cfg.hetero
        self.k = server.strategy.clients_per_round
        candidates = self._available()
        requests, state = server.train_requests(state, candidates,
                                                k=min(len(candidates), math.ceil(h.over_select * self.k)))
        if h.deadline_s > 0 and h.stragglers == "partial":
            requests = shrink_to_deadline(requests, self.profiles, h.deadline_s, self.flops,
                                          [self.full_steps[r.client_id] for r in requests])
        return requests, state

    def settle(self, requests: Sequence[Request],
               replies: Sequence[Reply]) -> tuple[list[Reply], dict[int, float]]:
        """The pacer's second half: the first ``clients_per_round`` arrivals before the deadline, and the time.

        A step of a secure round (``StepRequest``) keeps every arrival before the deadline; each step costs the
        time of its messages' real sizes, and a device may drop out at any step."""
        step = STEPS.index(requests[0].step) + 1 if requests and isinstance(requests[0], StepRequest) else 0
        tick = run_clock(self.now, requests, replies, self.profiles, self.flops, len(requests) if step else self.k,
                         self.cfg.hetero.deadline_s, self.cfg.run.seed, step)
        self.now = tick.end_s
        self.trips += tick.trips
        self.bytes_down += tick.bytes_down
        self.bytes_up += tick.bytes_up
        return list(tick.replies), tick.durations


class AsyncRun:
    """FedBuff/FedAsync on the simulated clock; :meth:`next_update` runs events until the next server update."""

    def __init__(self, cfg: Config, clock: SimulatedClock, server: AsyncServer, transport: Transport,
                 params: Params, launch: bool = True):
        self.cfg, self.clock, self.server, self.transport = cfg, clock, server, transport
        self.state = server.init(params)
        self.events: list[tuple[float, int, TrainRequest | None, TrainReply | None, int]] = []
        self.in_flight: set[int] = set()
        self.dispatched = 0
        self._seq = 0  # tie-breaker for events at the same simulated time
        for _ in range(cfg.server.concurrency or cfg.server.clients_per_round) if launch else ():
            self._launch()

    def _push(self, at: float, request: TrainRequest | None, reply: TrainReply | None, version: int) -> None:
        self._seq += 1
        heapq.heappush(self.events, (at, self._seq, request, reply, version))

    def _launch(self) -> None:
        """Send the current model to a random available client that is not training; or wait for one."""
        c, now = self.clock, self.clock.now
        idle = [i for i in range(len(c.profiles)) if i not in self.in_flight]
        ready = [i for i in idle if c.profiles[i].availability.is_available(now)]
        if not ready:
            nxt = min((c.profiles[i].availability.next_available(now) for i in idle), default=math.inf)
            if math.isfinite(nxt):
                self._push(nxt, None, None, -1)  # wake up then
            return
        self.dispatched += 1
        dispatch = self.dispatched
        cid = ready[keyed_rng(self.cfg.run.seed, dispatch, 3).randint(len(ready))]
        request = self.server.request(self.state, cid, dispatch)
        (reply,) = self.transport.exchange([request])
        profile, down = c.profiles[cid], message_bytes(request)
        up = message_bytes(reply) if reply.update is not None else 0
        samples = reply.update.metrics.get("examples", reply.update.weight) if reply.update is not None else 0
        duration = task_duration(profile, c.flops, samples, down, up)
        rng = keyed_rng(self.cfg.run.seed, dispatch, cid, 2)
        if rng.random_sample() < profile.dropout_p:  # the device leaves mid-task: no upload, no reply
            reply = TrainReply(cid, dispatch, error=ErrorReply(DROPPED, "the device left mid-task"))
            up, duration = 0, duration * rng.random_sample()
        c.trips += 1
        c.bytes_down += down
        c.bytes_up += up
        self.in_flight.add(cid)
        self._push(now + duration, request, reply, self.state.version)

    def next_update(self) -> tuple[RoundResult, ServerState]:
        """Process arrivals until the server applies its next update; the arrivals make up the "round"."""
        arrivals = []
        while True:
            if not self.events:
                raise RoundError("no client can be reached any more: every device is gone for good")
            at, _, request, reply, version = heapq.heappop(self.events)
            self.clock.now = at
            if request is None:  # a wake-up: someone may be available now
                self._launch()
                continue
            self.in_flight.discard(request.client_id)
            arrival, self.state = self.server.receive(self.state, request, version, reply)  # type: ignore[arg-type]
            arrivals.append((arrival, reply))
            self._launch()
            if arrival.aggregated:
                break
        return buffer_result(self.state, arrivals)

    # -- checkpoints -------------------------------------------------------------------------------

    def snapshot(self) -> AsyncSnapshot:
        """What resumes this run besides the server state, between two server updates (the buffer is empty then):
        the events pending on the clock, the models their tasks were sent, and the counters."""
        return AsyncSnapshot(list(self.events), self.dispatched, self._seq)

    def restore(self, state: ServerState, snap: AsyncSnapshot) -> None:
        """Continue from ``state`` and a snapshot read back (:meth:`AsyncSnapshot.from_arrays`): each task in flight
        is sent again, alone and in dispatch order as it first was, so its reply (and its client's state) is the
        one it first gave; a task whose device dropped out drops out again."""
        self.state = replace(self.state, version=state.round, params=state.params, opt_state=state.opt_state,
                             aggregation=state.aggregation)
        self.dispatched, self._seq = snap.dispatched, snap.seq
        for at, seq, request, reply, version in sorted(snap.events, key=lambda e: e[1]):
            if request is not None and reply is None:
                (reply,) = self.transport.exchange([request])
            if request is not None:
                self.in_flight.add(request.client_id)
            heapq.heappush(self.events, (at, seq, request, reply, version))


class SecureAsyncRun(AsyncRun):
    """FedBuff with each buffer summed securely (Nguyen et al. 2022, section 5; ``secagg/``): buffers of cohorts.

    The server cannot scale or drop one masked update, and the masks of a buffer must cancel among
    exactly its members, so a buffer is one cohort: ``cohort`` clients chosen together when that many
    slots are free, who exchange keys (the protocol's first three steps, on the clock) and are sent the
    same model version. Each trains and uploads its masked update in its own time; the first
    ``buffer_size`` arrivals close the buffer (the rest of the cohort counts as dropped, and its late
    updates are discarded), the survivors unmask, and the sum is applied with the staleness factor of
    the version the cohort was sent (one factor for the whole buffer). Deviation from FedBuff: a client
    is dispatched with its cohort, not the moment its slot frees, and a buffer never mixes cohorts.
    """

    def __init__(self, cfg: Config, clock: SimulatedClock, server: AsyncServer, transport: Transport,
                 params: Params, cohort: int):
        super().__init__(cfg, clock, server, transport, params, launch=False)
        self.cohort = cohort
        self.slots = cfg.server.concurrency or cfg.server.clients_per_round
        self.open: dict[int, _Cohort] = {}
        self.late: dict[int, str] = {}  # refused since the last update: members whose buffer had closed
        self.failed: list[tuple[_Cohort, SecureSum]] = []  # cohorts whose key exchange failed, not yet reported
        self._launch()

    def _step(self, requests: list, replies: list, step: int, t0: float) -> tuple[list, float]:
        """One setup or unmasking exchange from ``t0``: every arrival before the deadline is kept; returns the kept
        replies and when the exchange ends (the clock itself moves with the events, which other cohorts share)."""
        c = self.clock
        tick = run_clock(t0, requests, replies, c.profiles, c.flops, len(requests), self.cfg.hetero.deadline_s,
                         self.cfg.run.seed, step)
        c.trips += tick.trips
        c.bytes_down += tick.bytes_down
        c.bytes_up += tick.bytes_up
        return tick.replies, tick.end_s

    def _launch(self) -> None:
        """Start cohorts while ``cohort`` slots are free and that many idle clients are available (else wait)."""
        c = self.clock
        while self.slots - len(self.in_flight) >= self.cohort and not self.failed:
            idle = [i for i in range(len(c.profiles)) if i not in self.in_flight]
            ready = [i for i in idle if c.profiles[i].availability.is_available(c.now)]
            if len(ready) < self.cohort:
                later = [c.profiles[i].availability.next_available(c.now) for i in idle]
                nxt = min((t for t in later if t > c.now), default=math.inf)
                if math.isfinite(nxt):
                    self._push(nxt, None, None, -1)
                return
            rnd = self.dispatched + 1
            self.dispatched += self.cohort
            order = keyed_rng(self.cfg.run.seed, rnd, 3).permutation(len(ready))[: self.cohort]
            members = sorted(ready[i] for i in order)
            requests = [self.server.request(self.state, cid, rnd) for cid in members]
            self.in_flight.update(members)
            self._start(rnd, requests)

    def _start(self, rnd: int, requests: list[TrainRequest]) -> None:
        secure = self.server.strategy.secure
        assert secure is not None
        dim = sum(p.size for p in self.state.params) + 1
        check = masked_door(self.server.strategy.compression, secure.payload_bytes(dim - 1))
        cohort = _Cohort(secure.round(rnd, requests, dim, check), self.state.version, requests)
        t = self.clock.now
        try:
            outgoing = next(cohort.exchanges)
            for step in (1, 2, 3):  # advertise, share, collect
                replies, t = self._step(outgoing, self.transport.exchange(outgoing), step, t)
                outgoing = cohort.exchanges.send((replies, {}))
        except StopIteration as stop:  # the cohort could not set up its keys: its slots free, its buffer is spent
            self.in_flight.difference_update(r.client_id for r in requests)
            self.failed.append((cohort, stop.value))
            return
        for r in requests:
            if r not in outgoing:
                self.in_flight.discard(r.client_id)
        cohort.training = list(outgoing)
        c = self.clock
        for request, reply in zip(outgoing, self.transport.exchange(outgoing)):
            cid, profile = request.client_id, c.profiles[request.client_id]
            down, up = message_bytes(request), message_bytes(reply) if reply.update is not None else 0
            samples = reply.update.metrics.get("examples", 0.0) if reply.update is not None else 0
            duration = task_duration(profile, c.flops, samples, down, up)
            rng = keyed_rng(self.cfg.run.seed, rnd, cid, 2)
            if rng.random_sample() < profile.dropout_p:
                reply = TrainReply(cid, rnd, error=ErrorReply(DROPPED, "the device left mid-task"))
                up, duration = 0, duration * rng.random_sample()
            c.trips += 1
            c.bytes_down += down
            c.bytes_up += up
            self._push(t + duration, request, reply, self.state.version)
        self.open[rnd] = cohort

    def next_update(self) -> tuple[RoundResult, ServerState]:
        """Process arrivals until a cohort's buffer closes and is applied (or a cohort fails to set up its keys:
        its buffer is spent, and the next cohort starts after it is reported)."""
        while True:
            if self.failed:
                cohort, outcome = self.failed.pop(0)
                result = self._result(cohort, outcome, *self.server.receive_sum(self.state, cohort.version, outcome))
                self._launch()
                return result
            if not self.events:
                raise RoundError("no client can be reached any more: every device is gone for good")
            at, _, request, reply, _ = heapq.heappop(self.events)
            self.clock.now = max(self.clock.now, at)  # an unmasking may have run past it: time never goes back
            if request is None:
                self._launch()
                continue
            self.in_flight.discard(request.client_id)
            cohort = self.open.get(request.round)
            if cohort is None:  # its buffer closed before it arrived
                self.late[request.client_id] = "not_kept: its cohort's buffer closed before it arrived"
                self._launch()
                continue
            cohort.arrived[request.client_id] = reply  # type: ignore[assignment]
            if not cohort.full(self.server.buffer_size):
                continue
            del self.open[request.round]
            return self._close(cohort)

    def _close(self, cohort: _Cohort) -> tuple[RoundResult, ServerState]:
        kept = [cid for cid, r in cohort.arrived.items() if r.error is None][: self.server.buffer_size]
        late = TrainReply(0, 0, error=ErrorReply("not_kept", "its buffer closed without it"))
        replies = [cohort.arrived[r.client_id] if r.client_id in kept or (
                   r.client_id in cohort.arrived and cohort.arrived[r.client_id].error is not None)
                   else replace(late, client_id=r.client_id, round=r.round) for r in cohort.training]
        try:
            outgoing = cohort.exchanges.send((replies, {}))
            unmasked, self.clock.now = self._step(outgoing, self.transport.exchange(outgoing), 4, self.clock.now)
            cohort.exchanges.send((unmasked, {}))
            raise RoundError("the secure round did not end after unmasking")
        except StopIteration as stop:
            outcome = stop.value
        result = self._result(cohort, outcome, *self.server.receive_sum(self.state, cohort.version, outcome))
        self._launch()
        return result

    def _result(self, cohort: _Cohort, outcome: SecureSum, factor: float, measurements: dict[str, float],
                problem: str, state: AsyncState) -> tuple[RoundResult, ServerState]:
        self.state = state
        metrics = outcome.metrics
        loss, examples = mean_loss(metrics)
        refused = {**self.late, **{u: why for u, why in outcome.rejected.items()
                                   if problem or u not in outcome.survivors}}
        self.late = {}
        result = RoundResult(self.state.version, [r.client_id for r in cohort.requests],
                             [] if problem else list(outcome.survivors), refused, loss, float(examples),
                             {**outcome.measurements, **measurements, "staleness_factor": factor}, problem,
                             {} if problem else metrics)
        return result, ServerState(self.state.version, self.state.params, self.state.opt_state,
                                   aggregation=self.state.aggregation)


@dataclass
class _Cohort:
    """One secure buffer in flight: its protocol (paused at the training), the version it was sent, its members."""

    exchanges: Any
    version: int
    requests: list[TrainRequest]
    training: list[TrainRequest] = field(default_factory=list)  # the members still in when training began
    arrived: dict[int, TrainReply] = field(default_factory=dict)

    def full(self, buffer_size: int) -> bool:
        """Its buffer closes: ``buffer_size`` valid updates arrived, or every member that trains has reported."""
        valid = sum(r.error is None for r in self.arrived.values())
        return valid >= buffer_size or len(self.arrived) == len(self.training)


DROPPED = "dropped"


@dataclass(frozen=True)
class AsyncSnapshot:
    """The pending events of an :class:`AsyncRun` (arrival time, order, task, reply, model version), as arrays."""

    events: list[tuple[float, int, TrainRequest | None, TrainReply | None, int]]
    dispatched: int
    seq: int

    @property
    def first_task(self) -> int:
        """The earliest dispatch still in flight (client state older than its predecessor is never read again)."""
        return min((r.round for _, _, r, _, _ in self.events if r is not None), default=self.dispatched + 1)

    def arrays(self) -> tuple[list[str], Params]:
        """``async/...`` arrays: the counters, one row per event (time, order, client, dispatch, version, dropped),
        and the parameters of each model version a task in flight was sent."""
        rows, models = [], {}
        for at, seq, request, reply, version in self.events:
            if request is None:
                rows.append((at, seq, -1, -1, -1, 0))
                continue
            dropped = reply is not None and reply.error is not None and reply.error.code == DROPPED
            rows.append((at, seq, request.client_id, request.round, version, int(dropped)))
            models.setdefault(version, request.params)
        names = ["async/dispatched", "async/seq", "async/events"]
        arrays = [np.asarray(self.dispatched), np.asarray(self.seq), np.asarray(rows, np.float64).reshape(-1, 6)]
        for v, params in sorted(models.items()):
            names += [f"async/model/{v}/{i}" for i in range(len(params))]
            arrays += list(params)
        return names, arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], server: AsyncServer, params_like: Params) -> AsyncSnapshot:
        """The snapshot :meth:`arrays` wrote; tasks are rebuilt by ``server`` (their replies are computed again)."""
        try:
            rows = arrays["async/events"]
            models = {}
            for v in {int(r[4]) for r in rows if r[2] >= 0}:
                models[v] = [arrays[f"async/model/{v}/{i}"] for i in range(len(params_like))]
            events: list[tuple[float, int, TrainRequest | None, TrainReply | None, int]] = []
            for at, seq, cid, dispatch, version, dropped in rows.tolist():
                if cid < 0:
                    events.append((at, int(seq), None, None, -1))
                    continue
                sent = AsyncState(int(version), models[int(version)], {})
                request = server.request(sent, int(cid), int(dispatch))
                reply = (TrainReply(int(cid), int(dispatch), error=ErrorReply(DROPPED, "the device left mid-task"))
                         if dropped else None)
                events.append((at, int(seq), request, reply, int(version)))
            return cls(events, int(arrays["async/dispatched"]), int(arrays["async/seq"]))
        except (KeyError, ValueError, IndexError) as exc:
            raise ConfigError("resume", f"the checkpoint's asynchronous tasks cannot be read back: {exc}") from None
