"""An independent client of a fedloom server, built from ``fedloom.proto`` alone: it imports no fedloom code.

    python benchmarks/attacker.py MODE --address HOST:PORT --ca CA.pem [--cert C --key K] [--token-file F] ...

Its Python stubs are generated from the ``.proto`` with ``grpc_tools.protoc`` into a temporary
folder, and every message (envelopes, chunks, tensors) is built by hand, so it does what any
program speaking the wire format could do. Each mode prints one JSON line of what happened.

Modes that answer tasks:

* ``wrong-kind``: answers every task with the wrong kind of message (an evaluate reply to a train
  task, a train reply to an evaluate task, the request itself sent back as a reply).
* ``lying``: answers train tasks with invalid updates (wrong shape, dtype or round, NaN, Inf,
  weight 0 or negative, 10^12 examples) and evaluate tasks with impossible reports (10^15 examples
  and accuracy 1.0, a loss of 1e300 with accuracy 1.5).
* ``bad-payloads``: answers train tasks with compressed updates (kind ``encoded``) whose payloads are
  garbage, cut short, empty or beside tensors, for a server that compresses updates.
* ``revoked``: polls without ever sending a heartbeat and answers each task with a well-formed
  update; records when each task arrived and whether its push was accepted.

Modes that press on resources for ``--seconds`` (in the enrolled modes the attacker also answers
each task it gets with an error reply, so that rounds never wait for it: what is measured is the
server's resources, not a straggler):

* ``slow-joins``: ``--count`` Join calls whose request never arrives, over ``--conns`` connections,
  each re-opened a second after the server ends it; no token needed.
* ``long-polls``: one enrolled client holding ``--count`` polls.
* ``big-declare``: ``--count`` push streams each declaring ``--size`` bytes and sending 1 byte.
* ``zlib-bomb``: ``--count`` concurrent pushes of a zlib payload that inflates to ``--size`` bytes.
* ``tiny-chunks``: pushes of ``--count`` one-byte chunks each, one after another.
* ``join-flood``: ``--count`` Joins with the attacker's token as fast as it can, then checks which
  of its sessions still work.
* ``rebind``: joins with its own certificate, then presents that session over a connection with
  another certificate (``--other-cert``/``--other-key``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import grpc

PROTO = Path(__file__).resolve().parents[1] / "src" / "fedloom" / "transport" / "proto" / "fedloom.proto"
SESSION_KEY = "fedloom-session"
TOKEN_KEY = "fedloom-token"  # the documented metadata a Join may carry its token in
MiB = 1 << 20


def stubs() -> tuple[Any, Any]:
    """``fedloom_pb2`` and ``fedloom_pb2_grpc`` generated from the .proto (cached by its digest)."""
    from grpc_tools import protoc

    digest = hashlib.sha256(PROTO.read_bytes()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"fedloom-attacker-stubs-{digest}"
    if not (out / "fedloom_pb2_grpc.py").exists():
        tmp = Path(tempfile.mkdtemp(prefix="fedloom-attacker-"))
        if protoc.main(["protoc", f"-I{PROTO.parent}", f"--python_out={tmp}", f"--grpc_python_out={tmp}",
                        str(PROTO)]) != 0:
            raise RuntimeError(f"protoc failed on {PROTO}")
        try:
            os.rename(tmp, out)
        except OSError:  # another attacker generated them first
            pass
    sys.path.insert(0, str(out))
    import fedloom_pb2  # noqa: PLC0415 - generated just above
    import fedloom_pb2_grpc  # noqa: PLC0415

    return fedloom_pb2, fedloom_pb2_grpc


pb, rpc = stubs()


class Peer:
    """One identity (token and certificate) that can open connections to the server."""

    def __init__(self, args: argparse.Namespace, cert: str | None = None, key: str | None = None):
        self.address = args.address
        self.token = Path(args.token_file).read_text().strip() if args.token_file else ""
        self.ca = Path(args.ca).read_bytes() if args.ca else None
        cert, key = cert or args.cert, key or args.key
        self.pair = (Path(key).read_bytes(), Path(cert).read_bytes()) if cert else None
        self.channel = self.connect()
        self.stub = rpc.FederationStub(self.channel)
        self.session = ""
        self.client_id = -1

    def connect(self) -> grpc.Channel:
        if self.ca is None:
            return grpc.insecure_channel(self.address)
        key, cert = self.pair if self.pair else (None, None)
        return grpc.secure_channel(self.address, grpc.ssl_channel_credentials(self.ca, key, cert))

    @property
    def meta(self) -> tuple[tuple[str, str], ...]:
        return ((SESSION_KEY, self.session),)

    def join(self, tries: int = 3) -> str:
        for attempt in range(tries):
            try:
                reply = self.stub.Join(pb.JoinRequest(client_name="mallory", token=self.token), timeout=20,
                                       metadata=((TOKEN_KEY, self.token),))
                break
            except grpc.RpcError as exc:
                if attempt == tries - 1 or exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
        self.session, self.client_id = reply.session, reply.client_id
        return reply.session

    def poll(self, wait_s: int = 5) -> Any:
        """The next task's Envelope, or None (no task, or the run is finished)."""
        call = self.stub.Pull(pb.PullRequest(session=self.session, wait_s=wait_s), metadata=self.meta,
                              timeout=wait_s + 15)
        data = b"".join(c.data for c in call)
        return pb.Envelope.FromString(data) if data else None

    def push(self, envelope: bytes, chunk_bytes: int = MiB) -> Any:
        return self.stub.Push(chunks(envelope, chunk_bytes), metadata=self.meta, timeout=60)


def chunks(data: bytes, chunk_bytes: int = MiB):
    transfer = secrets.token_hex(8)
    count = max(1, -(-len(data) // chunk_bytes))
    for i in range(count):
        yield pb.Chunk(transfer_id=transfer, total_size=len(data), index=i,
                       data=data[i * chunk_bytes:(i + 1) * chunk_bytes], last=i == count - 1)


def envelope(kind: str, task: Any, body: bytes, round_: int | None = None, encoding: str = "proto") -> bytes:
    return pb.Envelope(kind=kind, task_id=task.task_id, client_id=task.client_id,
                       round=task.round if round_ is None else round_, encoding=encoding,
                       payload=body).SerializeToString()


def tensor(dtype: str, shape: list[int], fill: float = 0.0) -> Any:
    import numpy as np

    return pb.Tensor(dtype=dtype, shape=shape, data=np.full(shape, fill, dtype=np.dtype(dtype).newbyteorder("<"))
                     .tobytes())


def model_of(task: Any) -> list[tuple[str, list[int]]]:
    """(dtype, shape) of each array a train task sent."""
    return [(t.dtype, list(t.shape)) for t in pb.TrainRequestBody.FromString(task.payload).params]


def update_body(arrays: list[Any], weight: float = 10.0, metrics: dict[str, float] | None = None) -> bytes:
    body = pb.TrainReplyBody()
    body.update.weight, body.update.kind = weight, "delta"
    body.update.values.extend(arrays)
    body.update.metrics.update(metrics or {"loss": 1.0})
    return body.SerializeToString()


def error_reply(task: Any) -> bytes:
    kind = "train_reply" if task.kind == "train_request" else "evaluate_reply"
    body = (pb.TrainReplyBody if kind == "train_reply" else pb.EvaluateReplyBody)(
        error=pb.ErrorMsg(code="declined", reason="mallory declines"))
    return envelope(kind, task, body.SerializeToString())


def verdict(reply: Any) -> dict[str, Any]:
    return {"accepted": reply.accepted, "code": reply.error.code, "reason": reply.error.reason[:200]}


def rpc_error(exc: grpc.RpcError) -> dict[str, Any]:
    return {"status": exc.code().name, "details": (exc.details() or "")[:200]}


def _until(seconds: float):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        yield end - time.monotonic()


# ------------------------------------------------------------------------------ modes that answer tasks


def wrong_answers(task: Any) -> list[bytes]:
    good_kind = "train_reply" if task.kind == "train_request" else "evaluate_reply"
    wrong = "evaluate_reply" if good_kind == "train_reply" else "train_reply"
    wrong_body = (pb.EvaluateReplyBody(evaluation=pb.EvaluationMsg(loss=0.1, accuracy=1.0, num_examples=10))
                  if wrong == "evaluate_reply" else pb.TrainReplyBody(update=pb.UpdateMsg(weight=1.0, kind="delta")))
    return [envelope(wrong, task, wrong_body.SerializeToString()),
            envelope(task.kind, task, task.payload)]  # the request sent back as a reply


def lies(task: Any) -> list[bytes]:
    if task.kind == "evaluate_request":
        return [envelope("evaluate_reply", task, pb.EvaluateReplyBody(evaluation=pb.EvaluationMsg(
                    loss=0.0, accuracy=1.0, num_examples=10**15)).SerializeToString()),
                envelope("evaluate_reply", task, pb.EvaluateReplyBody(evaluation=pb.EvaluationMsg(
                    loss=1e300, accuracy=1.5, num_examples=100)).SerializeToString())]
    model = model_of(task)
    good = [tensor(d, s) for d, s in model]
    shapes = [tensor(d, [*s, 2]) for d, s in model]
    wide = [tensor("float64", s) for _, s in model]
    nan = [tensor(d, s, float("nan")) for d, s in model]
    inf = [tensor(d, s, float("inf")) for d, s in model]
    return [envelope("train_reply", task, update_body(shapes)), envelope("train_reply", task, update_body(wide)),
            envelope("train_reply", task, update_body(nan)), envelope("train_reply", task, update_body(inf)),
            envelope("train_reply", task, update_body(good, weight=0.0)),
            envelope("train_reply", task, update_body(good, weight=-5.0)),
            envelope("train_reply", task, update_body(good, weight=1e12)),
            envelope("train_reply", task, update_body(good), round_=task.round + 7)]


def encoded_body(payload: bytes, arrays: list[Any] | None = None) -> bytes:
    body = pb.TrainReplyBody()
    body.update.weight, body.update.kind, body.update.payload = 10.0, "encoded", payload
    body.update.values.extend(arrays or [])
    body.update.metrics.update({"loss": 1.0})
    return body.SerializeToString()


def bad_payloads(task: Any) -> list[bytes]:
    if task.kind == "evaluate_request":
        return [error_reply(task)]
    junk = secrets.token_bytes(64)
    return [envelope("train_reply", task, encoded_body(b"\xff" * 40)),  # no codec's header
            envelope("train_reply", task, encoded_body(junk[:3])),  # shorter than any header
            envelope("train_reply", task, encoded_body(b"")),  # encoded, without a payload
            envelope("train_reply", task, encoded_body(b"\x01" * 16, [tensor("float32", [2])]))]


def answer_tasks(args: argparse.Namespace, answers) -> dict[str, Any]:
    """Poll for ``--seconds`` (or until the server is gone); answer the n-th task of each kind with the n-th
    of the answers ``answers(task)`` offers, in turn."""
    me = Peer(args)
    me.join()
    pushes: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for _ in _until(args.seconds):
        try:
            task = me.poll()
        except grpc.RpcError as exc:
            return {"tasks": sum(seen.values()), "pushes": pushes, "ended": rpc_error(exc)}
        if task is None:
            continue
        n = seen[task.kind] = seen.get(task.kind, 0) + 1
        offered = answers(task)
        try:
            pushes.append({"task_kind": task.kind, **verdict(me.push(offered[(n - 1) % len(offered)]))})
        except grpc.RpcError as exc:
            pushes.append({"task_kind": task.kind, **rpc_error(exc)})
    return {"tasks": sum(seen.values()), "pushes": pushes}


def revoked(args: argparse.Namespace) -> dict[str, Any]:
    """Polls and answers with well-formed updates, never a heartbeat; when each task came and how its push went."""
    me = Peer(args)
    me.join()
    events: list[dict[str, Any]] = []
    for _ in _until(args.seconds):
        try:
            task = me.poll(wait_s=2)
        except grpc.RpcError as exc:
            events.append({"t": time.time(), **rpc_error(exc)})
            time.sleep(0.5)
            continue
        if task is None or task.kind != "train_request":
            if task is not None:
                me.push(error_reply(task))
            continue
        event = {"t": time.time(), "task": task.task_id}
        try:
            event.update(verdict(me.push(envelope("train_reply", task,
                                                  update_body([tensor(d, s) for d, s in model_of(task)])))))
        except grpc.RpcError as exc:
            event.update(rpc_error(exc))
        events.append(event)
    return {"events": events}


# ------------------------------------------------------------------------------ modes that press on resources


class Counts:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by: dict[str, int] = {}

    def add(self, what: str) -> None:
        with self._lock:
            self.by[what] = self.by.get(what, 0) + 1


def decline(me: Peer, task: Any, counts: Counts) -> None:
    """Answer ``task`` with an error reply at once, so that no round waits for this client."""
    for _ in range(100):  # its own attack may hold every call slot it has: try again
        try:
            me.push(error_reply(task))
            counts.add("declined_task")
            return
        except grpc.RpcError:
            time.sleep(0.02)
    counts.add("task_left_unanswered")


def decline_tasks(me: Peer, stop: threading.Event, counts: Counts) -> None:
    """Poll, and :func:`decline` every task."""
    while not stop.is_set():
        try:
            task = me.poll(wait_s=2)
            if task is not None:
                decline(me, task, counts)
        except grpc.RpcError as exc:
            counts.add(f"poll_{exc.code().name}")
            stop.wait(0.1)


def run_threads(count: int, seconds: float, body) -> None:
    stop = threading.Event()
    threads = [threading.Thread(target=body, args=(i, stop), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    end = time.monotonic() + 10
    for t in threads:
        t.join(timeout=max(0.0, end - time.monotonic()))


def held_call(multi_callable: Any, make, stop: threading.Event, counts: Counts, **kw: Any) -> None:
    """Start a request-streaming call with ``make(release)`` and wait until the server ends it or ``stop``.

    The stream's generator may block on ``release`` (a request that never finishes arriving); it is
    set once the call is over, so no thread outlives its call.
    """
    release = threading.Event()
    call = multi_callable.future(make(release), **kw)
    try:
        while True:
            try:
                reply = call.result(timeout=0.2)
            except grpc.FutureTimeoutError:
                if stop.is_set():
                    call.cancel()
                    counts.add("held_to_the_end")
                    return
                continue
            except grpc.RpcError as exc:
                counts.add(exc.code().name)
                return
            accepted = getattr(reply, "accepted", True)
            counts.add("accepted" if accepted else f"refused_{reply.error.code}")
            return
    finally:
        release.set()


def slow_joins(args: argparse.Namespace) -> dict[str, Any]:
    peers = [Peer(args) for _ in range(args.conns)]
    counts = Counts()

    def never(release: threading.Event):
        release.wait()
        yield pb.JoinRequest()

    def hold(i: int, stop: threading.Event) -> None:
        join = peers[i % len(peers)].channel.stream_unary(
            "/fedloom.v1.Federation/Join", request_serializer=pb.JoinRequest.SerializeToString,
            response_deserializer=pb.JoinReply.FromString)
        while not stop.is_set():
            held_call(join, never, stop, counts)
            stop.wait(1.0)  # then open another: the point is to hold calls, not to flood

    run_threads(args.count, args.seconds, hold)
    return {"calls": args.count, "connections": args.conns, "outcomes": counts.by}


def long_polls(args: argparse.Namespace) -> dict[str, Any]:
    me = Peer(args)
    me.join()
    counts = Counts()

    def hold(i: int, stop: threading.Event) -> None:
        if i == 0:
            return decline_tasks(me, stop, counts)
        while not stop.is_set():
            try:
                task = me.poll(wait_s=10)
                counts.add("task" if task is not None else "empty")
                if task is not None:
                    decline(me, task, counts)
            except grpc.RpcError as exc:
                counts.add(exc.code().name)
                stop.wait(0.1)

    run_threads(args.count + 1, args.seconds, hold)
    return {"polls": args.count, "outcomes": counts.by}


def pushes(args: argparse.Namespace, make) -> dict[str, Any]:
    """``--count`` threads each pushing ``make(release)`` chunk streams over and over, and one declining tasks."""
    me = Peer(args)
    me.join()
    counts = Counts()

    def push(i: int, stop: threading.Event) -> None:
        if i == 0:
            return decline_tasks(me, stop, counts)
        while not stop.is_set():
            held_call(me.stub.Push, make, stop, counts, metadata=me.meta)
            stop.wait(0.1)

    run_threads(args.count + 1, args.seconds, push)
    return {"streams": args.count, "outcomes": counts.by}


def big_declare(args: argparse.Namespace) -> dict[str, Any]:
    def one_byte_of_many(release: threading.Event):
        yield pb.Chunk(transfer_id=secrets.token_hex(8), total_size=args.size, index=0, data=b"x")
        release.wait()

    return pushes(args, one_byte_of_many)


def zlib_bomb(args: argparse.Namespace) -> dict[str, Any]:
    deflate, zeros = zlib.compressobj(9), bytes(MiB)
    bomb = b"".join(deflate.compress(zeros) for _ in range(args.size // MiB)) + deflate.flush()
    data = pb.Envelope(kind="train_reply", task_id="bomb", encoding="zlib+proto", payload=bomb).SerializeToString()
    return {"compressed_bytes": len(data), **pushes(args, lambda release: chunks(data))}


def tiny_chunks(args: argparse.Namespace) -> dict[str, Any]:
    data = os.urandom(args.count)
    args.count = 1
    return pushes(args, lambda release: chunks(data, chunk_bytes=1))


def join_flood(args: argparse.Namespace) -> dict[str, Any]:
    me = Peer(args)
    sessions, start = [], time.monotonic()
    for _ in range(args.count):
        sessions.append(me.join())
    took = time.monotonic() - start
    alive = []
    for s in (sessions[0], sessions[len(sessions) // 2], sessions[-1]):
        try:
            alive.append(me.stub.Heartbeat(pb.HeartbeatRequest(session=s), metadata=((SESSION_KEY, s),),
                                           timeout=10).known)
        except grpc.RpcError as exc:
            alive.append(rpc_error(exc))
    return {"joins": len(sessions), "seconds": round(took, 2), "first_middle_last": alive}


def rebind(args: argparse.Namespace) -> dict[str, Any]:
    me = Peer(args)
    me.join()
    other = Peer(args, cert=args.other_cert, key=args.other_key)
    own = me.stub.Heartbeat(pb.HeartbeatRequest(session=me.session), metadata=me.meta, timeout=10).known
    try:
        other.stub.Heartbeat(pb.HeartbeatRequest(session=me.session), metadata=me.meta, timeout=10)
        stolen: Any = "accepted"
    except grpc.RpcError as exc:
        stolen = rpc_error(exc)
    return {"own_certificate": own, "other_certificate": stolen}


MODES = {
    "wrong-kind": lambda a: answer_tasks(a, wrong_answers), "lying": lambda a: answer_tasks(a, lies),
    "bad-payloads": lambda a: answer_tasks(a, bad_payloads),
    "revoked": revoked, "slow-joins": slow_joins, "long-polls": long_polls, "big-declare": big_declare,
    "zlib-bomb": zlib_bomb, "tiny-chunks": tiny_chunks, "join-flood": join_flood, "rebind": rebind,
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="attacker.py", description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("--address", required=True)
    parser.add_argument("--ca", help="CA certificate (PEM); without it the channel is plaintext")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--other-cert")
    parser.add_argument("--other-key")
    parser.add_argument("--token-file")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--conns", type=int, default=50)
    parser.add_argument("--size", type=int, default=256 * MiB)
    args = parser.parse_args()
    result = MODES[args.mode](args)
    result.update(mode=args.mode, imports_fedloom=any(m == "fedloom" or m.startswith("fedloom.") for m in sys.modules))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
