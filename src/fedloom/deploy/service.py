"""The gRPC service clients connect to: Join, Pull, Push, Heartbeat, with every limit a stranger can push on.

It runs on gRPC's asyncio server, in the event loop of a :class:`~fedloom.transport.dispatch.LoopThread`:
a call waiting for a slow client costs a coroutine, not a worker thread, so no number of slow
calls can stall the honest clients' rounds. Every method is registered as *request-streaming*
(a unary call is the same on the wire), so the handler starts as soon as a call arrives and can
refuse it, count it and time out its body, before any body is read.

What a caller can make the server hold is bounded by the ``[deploy]`` settings:

* ``join_calls``: Join calls in flight without a token in their metadata, over all connections
  (the only calls open to strangers; under mutual TLS only to certificates of enrolled clients);
* ``client_calls``: polls and heartbeats one client has open at once; its pushes are counted
  apart, one per task it owes (so its own polls never keep its replies out);
* ``recv_timeout_s``: the wait for a call's next message (a Join's token, each chunk of a push);
* ``session_s``: a session's lifetime; one session per client, bound to its certificate under
  mutual TLS;
* a push is refused at once unless its client owes a reply (or a late one to a task its round gave
  up on: received to be measured, then refused), and may declare at most the size that reply can
  have (the model's bytes plus 1 MiB for a train reply); its buffer grows with the data, chunks
  carry at least ``min_chunk_kb``;
* ``inflight_mb``: bytes of replies being received or decoded at once (a push reserves its
  declared size plus what decoding it may produce; others wait up to ``recv_timeout_s``).

Revocation is checked on every call and at least once a second for open calls: a revoked client's
polls end, its open tasks are answered with an error and its pushes are refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from fedloom.build import build_compression
from fedloom.config import Config, DeployConfig
from fedloom.deploy.state import ServerState as StateStore
from fedloom.errors import WireError
from fedloom.transport import wire
from fedloom.transport.dispatch import Dispatcher, Task
from fedloom.transport.proto import fedloom_pb2 as pb

log = logging.getLogger("fedloom")

SERVICE = pb.DESCRIPTOR.services_by_name["Federation"].full_name
SESSION_KEY = "fedloom-session"
TOKEN_KEY = "fedloom-token"
STATUS_KEY = "fedloom-status"
TASK_KEY = "fedloom-task"  # a push names its task: one the server journaled already is answered at once
MAX_POLL_S = 30
REVOCATION_CHECK_S = 1.0
TOUCH_EVERY_S = 60.0  # how often a joining client's last_seen is written to the registry
StatusCode = grpc.StatusCode


def limits(cfg: Config) -> wire.Limits:
    """The wire limits of ``[deploy]``: no message or tensor over ``max_message_mb``."""
    size = cfg.deploy.max_message_mb * (1 << 20)
    return wire.Limits(max_message_bytes=size, max_tensor_bytes=size)


@dataclass
class Session:
    """A joined client: its id and name, the digest of its certificate (mutual TLS) and when the session ends."""

    key: str
    client_id: int
    name: str
    cert: str
    expires: float


class Refusal(Exception):
    """A call refused before it started: the gRPC status code and details to end it with."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class Sessions:
    """One session per client: a new Join replaces the client's old session."""

    def __init__(self, lifetime_s: float):
        self.lifetime_s = lifetime_s
        self._by_key: dict[str, Session] = {}
        self._by_client: dict[int, Session] = {}
        self.revoked: frozenset[int] = frozenset()

    def open(self, client_id: int, name: str, cert: str) -> Session:
        self.end(client_id)
        session = Session(secrets.token_hex(16), client_id, name, cert, time.monotonic() + self.lifetime_s)
        self._by_key[session.key] = self._by_client[client_id] = session
        return session

    def end(self, client_id: int) -> None:
        old = self._by_client.pop(client_id, None)
        if old is not None:
            del self._by_key[old.key]

    def find(self, key: str, cert: str) -> Session:
        """The live session ``key`` presented with certificate digest ``cert``; else :class:`Refusal`."""
        session = self._by_key.get(key)
        if session is None:
            raise Refusal(StatusCode.UNAUTHENTICATED, "unknown session: join again")
        if session.client_id in self.revoked:
            self.end(session.client_id)
            raise Refusal(StatusCode.UNAUTHENTICATED, "unknown or revoked client token")
        if time.monotonic() > session.expires:
            self.end(session.client_id)
            raise Refusal(StatusCode.UNAUTHENTICATED, "session expired: join again")
        if session.cert != cert:
            raise Refusal(StatusCode.PERMISSION_DENIED, "this session was opened with another certificate")
        return session

    def valid(self, session: Session) -> bool:
        return (self._by_key.get(session.key) is session and session.client_id not in self.revoked
                and time.monotonic() <= session.expires)


class ByteBudget:
    """Bytes the server may hold for replies at once; :meth:`reserve` waits for room, up to a timeout."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self._room = asyncio.Condition()

    async def reserve(self, n: int, timeout_s: float) -> bool:
        if n > self.capacity:
            return False
        async with self._room:
            try:
                await asyncio.wait_for(self._room.wait_for(lambda: self.used + n <= self.capacity), timeout_s)
            except TimeoutError:
                return False
            self.used += n
            return True

    async def release(self, n: int) -> None:
        async with self._room:
            self.used -= n
            self._room.notify_all()


class _NotAwaited(Exception):
    """A push from a client that owes no reply."""


def _cert_digest(context: grpc.aio.ServicerContext) -> str:
    """SHA-256 of the peer's certificate (PEM) under mutual TLS; empty without one."""
    pems = context.auth_context().get("x509_pem_cert", [])
    return hashlib.sha256(pems[0]).hexdigest() if pems else ""


def _refused(code: str, reason: str) -> pb.PushReply:
    return pb.PushReply(accepted=False, error=pb.ErrorMsg(code=code, reason=reason))


def _encode(task: Task) -> bytes:
    return wire.to_envelope(task.request, task_id=task.task_id).SerializeToString()


class FederationService:
    """Join, Pull, Push, Heartbeat over a :class:`Dispatcher`. Bad input gets an error, never a crash.

    Create it anywhere, then :meth:`start` and :meth:`stop` it in the event loop that owns it.
    """

    def __init__(self, store: StateStore, cfg: Config):
        self.store = store
        self.d: DeployConfig = cfg.deploy
        self.dispatcher = Dispatcher(max_examples=self.d.max_examples, compression=build_compression(cfg),
                                     presence_gap_s=3 * self.d.heartbeat_s)
        self.sessions = Sessions(self.d.session_s)
        self.max_message_bytes = limits(cfg).max_message_bytes
        self.finished = False
        self._told: set[int] = set()  # clients told that the run is finished
        self._joins = 0
        self._enrolled: frozenset[str] = frozenset()  # names of enrolled clients that are not revoked
        self._calls: Counter[int] = Counter()
        self._pushes: Counter[int] = Counter()
        self._touched: dict[int, float] = {}
        self._budget: ByteBudget | None = None
        self._codec = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fedloom-codec")
        self._server: grpc.aio.Server | None = None
        self._watcher: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self, address: str, credentials: grpc.ServerCredentials | None) -> int:
        """Listen on ``address`` (TLS when ``credentials``); returns the port."""
        self._budget = ByteBudget(self.d.inflight_mb << 20)
        await self._read_registry()
        # No server-wide cap on calls (maximum_concurrent_rpcs): strangers would fill it and the clients'
        # polls be refused with them. Each kind of call has its own bound instead: join_calls for strangers,
        # client_calls and owed pushes per client, and a call with no valid session is refused at once.
        self._server = grpc.aio.server(
            options=[("grpc.max_concurrent_streams", 4 * self.d.client_calls + 16),
                     ("grpc.server_handshake_timeout_ms", int(self.d.recv_timeout_s * 1000))])
        self._server.add_generic_rpc_handlers((self._handlers(),))
        if credentials is None:
            port = self._server.add_insecure_port(address)
        else:
            port = self._server.add_secure_port(address, credentials)
        await self._server.start()
        self._watcher = asyncio.create_task(self._watch_revocations())
        return port

    async def stop(self, finished: bool, linger_s: float) -> None:
        """Stop serving. With ``finished`` the clients are told first that the run is over (a client
        hears it on its next poll; this waits up to ``linger_s`` for every connected one); without,
        calls are cut off and the clients keep trying to reconnect, as after a crash."""
        if finished:
            self.finished = True
            self.dispatcher.close()
            end = time.monotonic() + linger_s
            while time.monotonic() < end and set(self.dispatcher.connected(linger_s)) - self._told:
                await asyncio.sleep(0.05)
        if self._watcher is not None:
            self._watcher.cancel()
        if self._server is not None:
            await self._server.stop(grace=1.0 if finished else None)
        self._codec.shutdown(wait=False, cancel_futures=True)

    def _handlers(self) -> grpc.GenericRpcHandler:
        def stream_in(fn: Any, request: Any, reply: Any, streams_out: bool = False) -> grpc.RpcMethodHandler:
            make = grpc.stream_stream_rpc_method_handler if streams_out else grpc.stream_unary_rpc_method_handler
            return make(fn, request_deserializer=request.FromString, response_serializer=reply.SerializeToString)

        return grpc.method_handlers_generic_handler(SERVICE, {
            "Join": stream_in(self.Join, pb.JoinRequest, pb.JoinReply),
            "Pull": stream_in(self.Pull, pb.PullRequest, pb.Chunk, streams_out=True),
            "Push": stream_in(self.Push, pb.Chunk, pb.PushReply),
            "Heartbeat": stream_in(self.Heartbeat, pb.HeartbeatRequest, pb.HeartbeatReply),
        })

    async def _read_registry(self) -> None:
        """Enrolled names and revocations, from the database: revoked clients' sessions, polls and tasks end."""
        clients = await asyncio.to_thread(self.store.clients)
        self._enrolled = frozenset(c["name"] for c in clients if not c["revoked"])
        revoked = frozenset(c["client_id"] for c in clients if c["revoked"])
        self.sessions.revoked, newly = revoked, revoked - self.sessions.revoked
        for cid in newly:  # its session is refused from now on (Sessions.find), its polls end
            log.info("client %d is revoked: its session and tasks end", cid)
            self.dispatcher.drop(cid, "revoked", f"client {cid} was revoked")

    async def _watch_revocations(self) -> None:
        """:meth:`_read_registry` every second."""
        while True:
            await asyncio.sleep(REVOCATION_CHECK_S)
            try:
                await self._read_registry()
            except Exception as exc:  # noqa: BLE001 - a locked or failing database must not end the watcher
                log.warning("cannot read the client registry: %s", exc)

    # -- helpers -----------------------------------------------------------------------------------

    async def _next(self, requests: AsyncIterator[Any], what: str) -> Any:
        """The call's next message (None at its end), or :class:`Refusal` after ``recv_timeout_s``."""
        try:
            return await asyncio.wait_for(anext(requests), self.d.recv_timeout_s)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise Refusal(StatusCode.DEADLINE_EXCEEDED,
                          f"{what} did not arrive within deploy.recv_timeout_s={self.d.recv_timeout_s:g} s") from None

    async def _request(self, requests: AsyncIterator[Any], what: str) -> Any:
        request = await self._next(requests, what)
        if request is None:
            raise Refusal(StatusCode.INVALID_ARGUMENT, f"no {what} was sent")
        return request

    @asynccontextmanager
    async def _session(self, context: grpc.aio.ServicerContext, push: bool = False) -> AsyncIterator[Session]:
        """The caller's session, its call counted while it lasts (:meth:`_counted`)."""
        session = self._find(context)
        async with self._counted(session.client_id, push):
            yield session

    def _find(self, context: grpc.aio.ServicerContext) -> Session:
        key = dict(context.invocation_metadata()).get(SESSION_KEY, "")
        return self.sessions.find(key, _cert_digest(context) if self.d.mutual_tls else "")

    @asynccontextmanager
    async def _counted(self, cid: int, push: bool = False) -> AsyncIterator[None]:
        """Count a call of client ``cid`` while it lasts.

        Joins, polls and heartbeats count against ``client_calls``; pushes apart, one per task the
        client owes, so that a client's own polls can never keep its replies out.
        """
        counter, limit = (self._pushes, len(self.dispatcher.expected(cid))) if push else (self._calls,
                                                                                         self.d.client_calls)
        if push and not limit:
            raise _NotAwaited
        if counter[cid] >= limit:
            what = f"{counter[cid]} pushes open, one per task it owes" if push else \
                f"{counter[cid]} calls open, the limit (deploy.client_calls)"
            raise Refusal(StatusCode.RESOURCE_EXHAUSTED, f"this client has {what}")
        counter[cid] += 1
        try:
            yield
        finally:
            counter[cid] -= 1

    def _certificate_names(self, context: grpc.aio.ServicerContext) -> list[str]:
        """Under mutual TLS, the certificate's common names, which must include an enrolled client's."""
        names = [v.decode() for v in context.auth_context().get("x509_common_name", [])]
        if not set(names) & self._enrolled:
            raise Refusal(StatusCode.PERMISSION_DENIED, f"the certificate ({', '.join(names) or 'no name'}) is no "
                                                        "enrolled client's")
        return names

    async def _authenticate(self, token: str, names: list[str] | None) -> tuple[int, str]:
        found = await asyncio.to_thread(self.store.authenticate, token)
        if found is None:
            raise Refusal(StatusCode.UNAUTHENTICATED, "unknown or revoked client token")
        if names is not None and found[1] not in names:
            raise Refusal(StatusCode.PERMISSION_DENIED, f"the token is {found[1]!r}'s but the certificate is "
                                                        f"{', '.join(names)}'s")
        return found

    # -- the four calls ----------------------------------------------------------------------------

    async def Join(self, requests: AsyncIterator[pb.JoinRequest], context: grpc.aio.ServicerContext) -> pb.JoinReply:
        """A client presents its token (metadata ``fedloom-token``, or the request) and gets a session.

        With the token in the metadata the caller is known before its request is read, and its
        call counts as one of its own; without, the call is a stranger's until its request
        arrives, and waits for it in one of the ``join_calls`` slots. Under mutual TLS a
        certificate of no enrolled client is refused before anything else.
        """
        try:
            names = self._certificate_names(context) if self.d.mutual_tls else None
            token = dict(context.invocation_metadata()).get(TOKEN_KEY, "")
            if token:
                found = await self._authenticate(token, names)
                async with self._counted(found[0]):
                    await self._request(requests, "the join request")
                    return await self._open(found, context)
            if self._joins >= self.d.join_calls:
                raise Refusal(StatusCode.RESOURCE_EXHAUSTED, f"{self._joins} joins without a token in their metadata "
                                                             "are in flight, the limit (deploy.join_calls)")
            self._joins += 1
            try:
                request = await self._request(requests, "the join request")
                return await self._open(await self._authenticate(request.token, names), context)
            finally:
                self._joins -= 1
        except Refusal as r:
            await context.abort(r.code, r.details)

    async def _open(self, found: tuple[int, str], context: grpc.aio.ServicerContext) -> pb.JoinReply:
        cid, name = found
        session = self.sessions.open(cid, name, _cert_digest(context) if self.d.mutual_tls else "")
        self.dispatcher.wake(cid)  # polls of the session it replaces end instead of taking this client's tasks
        if time.monotonic() - self._touched.get(cid, -math.inf) > TOUCH_EVERY_S:  # a disk write: not on every Join
            self._touched[cid] = time.monotonic()
            await asyncio.to_thread(self.store.touch, cid)
        log.info("client %s (%s) joined", cid, name)
        return pb.JoinReply(session=session.key, client_id=cid, heartbeat_s=math.ceil(self.d.heartbeat_s))

    async def Pull(self, requests: AsyncIterator[pb.PullRequest],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Chunk]:
        try:
            async with self._session(context) as session:
                request = await self._request(requests, "the poll request")
                task = None
                if not self.finished:
                    wait = min(float(request.wait_s or MAX_POLL_S), MAX_POLL_S)
                    task = await self.dispatcher.next_task(session.client_id, wait,
                                                           lambda: self.sessions.valid(session))
                if task is None:
                    self.sessions.find(session.key, session.cert)  # a session that ended meanwhile: say why
                    if self.finished:
                        self._told.add(session.client_id)
                    context.set_trailing_metadata(((STATUS_KEY, "finished" if self.finished else "idle"),))
                    return
                try:
                    data = await asyncio.get_running_loop().run_in_executor(self._codec, _encode, task)
                    size = 0
                    for chunk in wire.slices(data):  # each chunk made as it is sent: the model is held once
                        size += wire.chunk_size(chunk)
                        yield chunk
                    del data
                    self.dispatcher.sent(task, size)
                except BaseException:  # the poll broke while the task was handed over: keep it for the next
                    self.dispatcher.requeue(task)
                    raise
        except Refusal as r:
            await context.abort(r.code, r.details)

    async def Push(self, requests: AsyncIterator[pb.Chunk], context: grpc.aio.ServicerContext) -> pb.PushReply:
        """A client's reply. One to a task whose update the server journaled already (the client's first push was
        answered, but the answer was lost: a crash, a broken connection) is accepted again and adds nothing."""
        try:
            task_id = dict(context.invocation_metadata()).get(TASK_KEY, "")
            if task_id and self.dispatcher.received.get(task_id, -1) == self._find(context).client_id:
                return pb.PushReply(accepted=True)
            async with self._session(context, push=True) as session:
                return await self._push(session.client_id, requests)
        except _NotAwaited:
            return _refused("not_awaited", "no task of this client is awaited")
        except Refusal as r:
            await context.abort(r.code, r.details)

    async def _push(self, cid: int, requests: AsyncIterator[pb.Chunk]) -> pb.PushReply:
        owed = max((t.reply_limit for t in self.dispatcher.expected(cid)), default=0)
        first = await self._next(requests, "the first chunk")
        arriving = time.monotonic()
        if first is None:
            return _refused("bad_message", "empty chunk stream: no envelope was sent")
        if first.total_size > owed:
            return _refused("bad_message", f"the reply declares {first.total_size} bytes; the largest reply this "
                                           f"client owes may have {owed}")
        lim = wire.Limits(max_message_bytes=owed, max_tensor_bytes=owed, min_chunk_bytes=self.d.min_chunk_kb << 10)
        need = first.total_size + owed  # its bytes, and what decoding them may produce
        assert self._budget is not None
        if not await self._budget.reserve(need, self.d.recv_timeout_s):
            raise Refusal(StatusCode.RESOURCE_EXHAUSTED, "the server is receiving too much at once "
                                                         "(deploy.inflight_mb): push again shortly")
        try:
            assembler, chunk = wire.Assembler(first, lim), first
            while not assembler.add(chunk):
                chunk = await self._next(requests, f"chunk {assembler.index}")
                if chunk is None:
                    raise WireError(f"the stream ended at chunk {assembler.index} without a last chunk")
                if not self.dispatcher.expected(cid):
                    return _refused("not_awaited", "the task was given up on while its reply was arriving")
            env = assembler.envelope()
            reply = await asyncio.get_running_loop().run_in_executor(self._codec, wire.from_envelope, env, lim)
        except WireError as exc:
            return _refused(exc.code, str(exc))
        finally:
            await self._budget.release(need)
        error = await self.dispatcher.receive(cid, env.task_id, reply, arriving, first.total_size)
        return pb.PushReply(accepted=True) if error is None else _refused(error.code, error.reason)

    async def Heartbeat(self, requests: AsyncIterator[pb.HeartbeatRequest],
                        context: grpc.aio.ServicerContext) -> pb.HeartbeatReply:
        try:
            async with self._session(context) as session:
                await self._request(requests, "the heartbeat")
                self.dispatcher.seen(session.client_id)  # in memory: heartbeats cost no disk write
                return pb.HeartbeatReply(known=True)
        except Refusal as r:
            await context.abort(r.code, r.details)
