"""The wire format over a real gRPC channel: a 200 MB envelope streams through default 4 MB message limits.

A tiny echo server (loopback only) implements ``Push`` (reassemble the chunks, keep the envelope)
and ``Pull`` (stream the kept envelope back as chunks) from the generated stubs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest

from fedloom.messages import ErrorReply, TrainConfig, TrainReply, TrainRequest
from fedloom.transport import wire
from fedloom.transport.proto import fedloom_pb2 as pb
from fedloom.transport.proto import fedloom_pb2_grpc as pb_grpc


class EchoFederation(pb_grpc.FederationServicer):
    """Push stores one envelope per session; Pull streams it back."""

    def __init__(self) -> None:
        self.envelopes: dict[str, pb.Envelope] = {}
        self.lock = threading.Lock()

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        return pb.JoinReply(session=f"s-{request.client_name}", client_id=1, heartbeat_s=30)

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        with self.lock:
            return pb.HeartbeatReply(known=request.session in self.envelopes)

    def Push(self, request_iterator: Iterator[pb.Chunk], context: grpc.ServicerContext) -> pb.PushReply:
        session = dict(context.invocation_metadata()).get("session", "")
        try:
            env = wire.from_chunks(request_iterator)
        except wire.WireError as e:
            return pb.PushReply(accepted=False, error=pb.ErrorMsg(code=e.code, reason=e.message))
        with self.lock:
            self.envelopes[session] = env
        return pb.PushReply(accepted=True)

    def Pull(self, request: pb.PullRequest, context: grpc.ServicerContext) -> Iterator[pb.Chunk]:
        with self.lock:
            env = self.envelopes.pop(request.session, None)
        if env is not None:
            yield from wire.to_chunks(env)


@pytest.fixture(scope="module")
def stub() -> Iterator[pb_grpc.FederationStub]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))  # default 4 MB message limits
    pb_grpc.add_FederationServicer_to_server(EchoFederation(), server)
    port = server.add_insecure_port("127.0.0.1:0")  # loopback only
    assert port > 0
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield pb_grpc.FederationStub(channel)
    finally:
        channel.close()
        server.stop(grace=None)


def echo(stub: pb_grpc.FederationStub, env: pb.Envelope, session: str) -> pb.Envelope:
    meta = (("session", session),)
    reply = stub.Push(wire.to_chunks(env), metadata=meta, timeout=60)
    assert reply.accepted, reply.error
    return wire.from_chunks(stub.Pull(pb.PullRequest(session=session, wait_s=1), metadata=meta, timeout=60))


def test_200mb_envelope_streams_through_default_message_limits(stub: pb_grpc.FederationStub) -> None:
    a = np.random.default_rng(0).standard_normal(50_000_000, dtype=np.float32)
    t0 = time.perf_counter()
    env = wire.to_envelope(TrainRequest(3, 7, [a], TrainConfig(max_steps=4)), task_id="big")
    back = echo(stub, env, "big")
    assert back == env
    del env
    msg = wire.from_envelope(back)
    seconds = time.perf_counter() - t0
    print(f"\n200 MB echo over gRPC: {seconds:.2f} s")
    np.testing.assert_array_equal(msg.params[0], a)
    assert (msg.client_id, msg.round, msg.config.max_steps) == (3, 7, 4)


def test_small_reply_and_unary_calls(stub: pb_grpc.FederationStub) -> None:
    join = stub.Join(pb.JoinRequest(client_name="c1", token="t"), timeout=10)
    assert join.session == "s-c1" and join.heartbeat_s == 30
    reply = TrainReply(1, 2, error=ErrorReply("client_failed", "boom"))
    back = wire.from_envelope(echo(stub, wire.to_envelope(reply, encoding="zlib+proto"), join.session))
    assert back == reply
    assert not stub.Heartbeat(pb.HeartbeatRequest(session=join.session), timeout=10).known


def test_bad_chunks_are_answered_with_an_error_not_an_exception(stub: pb_grpc.FederationStub) -> None:
    chunks = list(wire.to_chunks(wire.to_envelope(TrainReply(1, 2, error=ErrorReply("x", "y"))), 4))
    reply = stub.Push(iter(chunks[:-1]), metadata=(("session", "bad"),), timeout=10)
    assert not reply.accepted
    assert reply.error.code == "bad_message" and "without a last chunk" in reply.error.reason


def test_one_unchunked_message_over_4mb_is_rejected_by_grpc(stub: pb_grpc.FederationStub) -> None:
    """Why chunks: the same envelope in one 5 MB chunk exceeds gRPC's default receive limit."""
    env = wire.to_envelope(TrainRequest(0, 1, [np.zeros(5 << 18, np.float32)], TrainConfig()))
    with pytest.raises(grpc.RpcError) as info:
        stub.Push(wire.to_chunks(env, 8 << 20), metadata=(("session", "huge"),), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
