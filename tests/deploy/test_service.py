"""The gRPC service in this process against bad input: every malformed or unexpected message gets an error."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from fedloom.config import load_config
from fedloom.deploy.service import SESSION_KEY, TOKEN_KEY, FederationService
from fedloom.deploy.state import ServerState as StateStore
from fedloom.messages import EvaluateReply, Evaluation, TrainConfig, TrainReply, TrainRequest, Update
from fedloom.transport import wire
from fedloom.transport.dispatch import DeployedTransport, LoopThread
from fedloom.transport.proto import fedloom_pb2 as pb
from fedloom.transport.proto import fedloom_pb2_grpc as pb_grpc

MODEL = [np.zeros(3, np.float32)]


class Running:
    """A service on 127.0.0.1 in its own event loop, a channel to it, and a way to ask its clients."""

    def __init__(self, tmp_path, *settings):
        self.store = StateStore(tmp_path / "server.db")
        self.tokens = [self.store.enroll(f"c{i}")[1] for i in range(2)]
        cfg = load_config(None, ["deploy.max_message_mb=1", "deploy.tls=false", "deploy.recv_timeout_s=1",
                                 *settings])
        self.loop = LoopThread()
        self.service = FederationService(self.store, cfg)
        port = self.loop.call(self.service.start("127.0.0.1:0", None))
        self.address = f"127.0.0.1:{port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.FederationStub(self.channel)
        self.transport = DeployedTransport(self.loop, self.service.dispatcher, 20.0, 20.0, 1 << 20)
        self.pool = ThreadPoolExecutor(2)

    def join(self, i=0):
        session = self.stub.Join(pb.JoinRequest(client_name=f"c{i}", token=self.tokens[i])).session
        return session, ((SESSION_KEY, session),)

    def ask(self, *requests):
        """The round's side, in a thread: a future of the replies."""
        return self.pool.submit(self.transport.exchange, list(requests))

    def pull(self, session, meta):
        env = wire.from_chunks(self.stub.Pull(pb.PullRequest(session=session, wait_s=5), metadata=meta))
        return env.task_id, wire.from_envelope(env)

    def push(self, message, task_id, meta, **kw):
        return self.stub.Push(wire.to_chunks(wire.to_envelope(message, task_id=task_id), **kw), metadata=meta)

    def close(self):
        self.channel.close()
        self.loop.call(self.service.stop(False, 0.0))
        self.loop.close()
        self.pool.shutdown()
        self.store.close()


@pytest.fixture
def running(tmp_path):
    r = Running(tmp_path)
    yield r
    r.close()


def test_bad_messages_get_error_replies_and_the_server_carries_on(running):
    stub = running.stub
    with pytest.raises(grpc.RpcError) as err:
        stub.Join(pb.JoinRequest(client_name="c0", token="forged"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.value.details() == "unknown or revoked client token"
    session, meta = running.join()

    with pytest.raises(grpc.RpcError) as err:  # no session
        stub.Push(iter([pb.Chunk(transfer_id="t", total_size=1, index=0, data=b"x", last=True)]))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    reply = TrainReply(0, 1, update=Update([np.ones(3, np.float32)], 1.0))
    stray = running.push(reply, "never-asked", meta)  # nothing is awaited from this client: refused at once
    assert not stray.accepted and stray.error.code == "not_awaited"

    replies = running.ask(TrainRequest(0, 1, MODEL, TrainConfig(round=1)))
    task_id, request = running.pull(session, meta)
    assert isinstance(request, TrainRequest)
    garbage = stub.Push(iter([pb.Chunk(transfer_id="t", total_size=9, index=0, data=b"\x00garbage", last=True)]),
                        metadata=meta)
    assert not garbage.accepted and garbage.error.code == "bad_message"
    huge = stub.Push(iter([pb.Chunk(transfer_id="t", total_size=10**12, index=0, data=b"x")]), metadata=meta)
    assert not huge.accepted and "declares 1000000000000 bytes" in huge.error.reason
    big = TrainReply(0, 1, update=Update([np.zeros(400_000, np.float32)], 1.0))  # 1.6 MB: far over the task's reply
    over = running.push(big, task_id, meta)
    assert not over.accepted and over.error.code == "bad_message"
    other = running.push(reply, "not-this-one", meta)
    assert not other.accepted and other.error.code == "not_awaited"

    ok = running.push(reply, task_id, meta)
    assert ok.accepted
    (got,) = replies.result(timeout=10)
    assert got.update is not None and got.update.weight == 1.0
    again = running.push(reply, task_id, meta)  # a replay: the task is answered
    assert not again.accepted and again.error.code == "not_awaited"
    assert stub.Heartbeat(pb.HeartbeatRequest(session=session), metadata=meta).known
    raw = running.channel.unary_unary("/fedloom.v1.Federation/Heartbeat", request_serializer=bytes,
                                      response_deserializer=pb.HeartbeatReply.FromString)
    with pytest.raises(grpc.RpcError):  # a body that is no HeartbeatRequest: the call fails, the server does not
        raw(b"\xff\xff\xff", metadata=meta, timeout=5)
    assert stub.Heartbeat(pb.HeartbeatRequest(session=session), metadata=meta).known


@pytest.mark.parametrize("answer, code, words", [
    (EvaluateReply(0, 1, Evaluation(0.1, 1.0, 10**15)), "invalid_reply", "answered by a TrainReply, got an Eval"),
    (TrainRequest(0, 1, MODEL, TrainConfig()), "invalid_reply", "got a TrainRequest"),
    (TrainReply(0, 2, update=Update([np.ones(3, np.float32)], 1.0)), "invalid_reply", "round 2"),
    (TrainReply(0, 1, update=Update([np.ones(4, np.float32)], 1.0)), "invalid_update", "expected <f4[3]"),
    (TrainReply(0, 1, update=Update([np.full(3, np.nan, np.float32)], 1.0)), "invalid_update", "NaN"),
    (TrainReply(0, 1, update=Update([np.ones(3, np.float32)], 0.0)), "invalid_update", "weight"),
    (TrainReply(0, 1, update=Update([np.ones(3, np.float32)], 1e12)), "invalid_update", "over the limit of 1e+06"),
])
def test_replies_are_checked_at_the_door_and_the_round_hears_why(running, answer, code, words):
    session, meta = running.join()
    replies = running.ask(TrainRequest(0, 1, MODEL, TrainConfig(round=1)))
    task_id, _ = running.pull(session, meta)
    refused = running.push(answer, task_id, meta)
    assert not refused.accepted and refused.error.code == code and words in refused.error.reason
    (got,) = replies.result(timeout=5)  # the round does not wait for a reply that will not come
    assert got.error.code == code and got.error.reason.startswith("refused by the server")


def test_a_revoked_client_gets_no_task_and_its_pushes_are_refused_without_a_heartbeat(running):
    session, meta = running.join()
    replies = running.ask(TrainRequest(0, 1, MODEL, TrainConfig(round=1)))
    task_id, _ = running.pull(session, meta)
    running.store.revoke("c0")
    time.sleep(1.5)  # the registry is read every second
    reply = TrainReply(0, 1, update=Update([np.ones(3, np.float32)], 1.0))
    with pytest.raises(grpc.RpcError) as err:
        running.push(reply, task_id, meta)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in err.value.details()
    (got,) = replies.result(timeout=5)
    assert got.error.code == "revoked"
    running.ask(TrainRequest(0, 2, MODEL, TrainConfig(round=2)))
    with pytest.raises(grpc.RpcError) as err:
        running.pull(session, meta)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        running.join()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_poll_waiting_when_the_client_is_revoked_ends(running):
    session, meta = running.join()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        threading.Timer(0.5, running.store.revoke, ("c0",)).start()
        running.stub.Pull(pb.PullRequest(session=session, wait_s=30), metadata=meta).next()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and time.monotonic() - started < 5


def test_one_session_per_client_bounded_calls_and_slow_bodies_cut_off(tmp_path):
    r = Running(tmp_path, "deploy.client_calls=2", "deploy.join_calls=2")
    try:
        first, old = r.join()
        second, meta = r.join()  # joining again replaces the old session
        with pytest.raises(grpc.RpcError) as err:
            r.stub.Heartbeat(pb.HeartbeatRequest(session=first), metadata=old)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "join again" in err.value.details()
        polls = [r.stub.Pull(pb.PullRequest(session=second, wait_s=5), metadata=meta) for _ in range(2)]
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as err:  # a third open call of this client
            r.stub.Heartbeat(pb.HeartbeatRequest(session=second), metadata=meta)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "client_calls" in err.value.details()
        for p in polls:
            p.cancel()

        join = r.channel.stream_unary("/fedloom.v1.Federation/Join",
                                      request_serializer=pb.JoinRequest.SerializeToString,
                                      response_deserializer=pb.JoinReply.FromString)
        hold = threading.Event()

        def body_never_comes():
            hold.wait(10)
            yield pb.JoinRequest()

        slow = [join.future(body_never_comes()) for _ in range(2)]
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as err:  # both Join slots are taken by calls with no body
            r.join(1)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "join_calls" in err.value.details()
        token_first = r.stub.Join(pb.JoinRequest(token=r.tokens[1]), metadata=((TOKEN_KEY, r.tokens[1]),))
        assert token_first.client_id == 1  # a client whose token is in its metadata needs no slot
        with pytest.raises(grpc.RpcError) as err:
            r.stub.Join(pb.JoinRequest(), metadata=((TOKEN_KEY, "forged"),))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for f in slow:  # cut off after recv_timeout_s = 1
            with pytest.raises(grpc.RpcError) as err:
                f.result(timeout=5)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        hold.set()
        assert r.join(1)[0]  # the slots are free again
    finally:
        r.close()


def test_a_session_expires_and_the_client_joins_again(tmp_path):
    r = Running(tmp_path, "deploy.session_s=1")
    try:
        session, meta = r.join()
        assert r.stub.Heartbeat(pb.HeartbeatRequest(session=session), metadata=meta).known
        time.sleep(1.3)
        with pytest.raises(grpc.RpcError) as err:
            r.stub.Heartbeat(pb.HeartbeatRequest(session=session), metadata=meta)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert err.value.details() == "session expired: join again"
        session, meta = r.join()
        assert r.stub.Heartbeat(pb.HeartbeatRequest(session=session), metadata=meta).known
    finally:
        r.close()


@pytest.mark.parametrize("setting,key", [
    (["server.aggregation=\"fedbuff\"", "secagg.mode=\"secagg\"", "server.clients_per_round=6",
      "server.buffer_size=3", "aggregation.weighting=\"uniform\""], "secagg.mode"),
    (["deploy.clients=[\"../../x\"]"], "deploy.clients"),
    (["hetero.population=\"mobile\""], "hetero.population"),
])
def test_settings_the_server_cannot_take_are_refused_before_anything_starts(tmp_path, setting, key):
    from fedloom.deploy.server import serve
    from fedloom.errors import ConfigError

    cfg = load_config(None, ["data.dataset=\"breast_cancer\"", "data.partition=\"iid\"", "data.num_clients=3",
                             "model.name=\"logreg\"", f"deploy.state_dir=\"{tmp_path / 'state'}\"", *setting])
    with pytest.raises(ConfigError) as e:
        serve(cfg)
    assert e.value.key == key
    assert not (tmp_path / "state").exists() and not (tmp_path / "x.token").exists()


def test_a_task_a_client_cannot_read_gets_an_error_reply_and_the_client_carries_on(running, monkeypatch, tmp_path):
    """A real client (``serve_client``) sent a message kind it does not know, and a step it does not know, answers
    each with an error reply at once; it neither crashes nor leaves the round waiting, and its next task is done."""
    from fedloom.client.pipeline import ClientPipeline
    from fedloom.client.state import StateFiles
    from fedloom.data.dataset import ClientDataset
    from fedloom.deploy import service as svc
    from fedloom.deploy.client import serve_client
    from fedloom.messages import StepRequest

    def encode(task):  # a server from the future: a kind of message this client's version has never heard of
        env = wire.to_envelope(task.request, task_id=task.task_id)
        if getattr(task.request, "step", "") == "future":
            env.kind = "secagg.consistency_check"
        return env.SerializeToString()

    monkeypatch.setattr(svc, "_encode", encode)
    cfg = load_config(None, ["deploy.tls=false", 'deploy.name="c0"'])
    data = ClientDataset(0, np.zeros((2, 3), np.float32), np.zeros(2, np.int64), np.zeros((1, 3), np.float32),
                         np.zeros(1, np.int64))
    stop = threading.Event()
    client = threading.Thread(target=serve_client, daemon=True, args=(None, data, cfg, running.address,
                                                                      running.tokens[0]),
                              kwargs={"stop": stop, "pipeline": ClientPipeline(secure=True),
                                      "states": StateFiles(tmp_path / "c0")})
    client.start()
    try:
        end = time.monotonic() + 20
        while 0 not in running.transport.connected():
            assert time.monotonic() < end, "the client never joined"
            time.sleep(0.05)
        t = time.monotonic()
        (unknown,) = running.ask(StepRequest(0, 1, "future")).result(timeout=15)
        (unstep,) = running.ask(StepRequest(0, 1, "secagg.gossip")).result(timeout=15)
        assert time.monotonic() - t < 10  # answered, not timed out
        assert unknown.error.code == "bad_message" and "secagg.consistency_check" in unknown.error.reason
        assert unstep.error.code == "unknown_step" and "secagg.gossip" in unstep.error.reason
        (out_of_order,) = running.ask(StepRequest(0, 1, "secagg.unmask")).result(timeout=15)
        assert out_of_order.error.code == "secagg" and "holds no secure-aggregation keys" in out_of_order.error.reason
        assert client.is_alive()
    finally:
        stop.set()


def test_over_selection_keeps_the_first_updates_and_a_late_reply_is_measured_then_refused(running):
    """Over real gRPC: asked two, keep one. The first update is kept, the other task is answered ``not_kept``; its
    reply, pushed afterwards, is received and measured as late, refused to its client, and its client counts as
    busy until it polls again."""
    (s0, m0), (s1, m1) = running.join(0), running.join(1)
    running.transport.keep = 1
    replies = running.ask(*(TrainRequest(c, 1, MODEL, TrainConfig(round=1)) for c in (0, 1)))
    (t0, _), (t1, _) = running.pull(s0, m0), running.pull(s1, m1)
    update = Update([np.ones(3, np.float32)], 1.0, metrics={"examples": 8.0})
    assert running.push(TrainReply(0, 1, update=update), t0, m0).accepted
    first, second = replies.result(timeout=10)
    assert first.update is not None
    assert second.error.code == "not_kept" and second.error.reason == "over-selected: not among the first 1 updates"
    assert running.transport.ready() == [0]  # client 1 is still on its task
    trips = running.transport.round_trips()  # for the selector: the kept trip, and how long client 1 was waited for
    assert sorted(trips) == [0, 1] and all(0 < t < 10 for t in trips.values())
    kept, withdrawn = running.transport.take_measured()
    assert (kept.client_id, kept.outcome, kept.examples, withdrawn.outcome) == (0, "ok", 8.0, "not_kept")
    assert kept.down_bytes > 0 and kept.up_bytes > 0 and 0 <= kept.work_s < kept.round_trip_s
    late = running.push(TrainReply(1, 1, update=update), t1, m1)
    assert not late.accepted and late.error.code == "not_awaited"
    assert running.push(TrainReply(1, 1, update=update), t1, m1).error.code == "not_awaited"  # measured once
    running.transport.keep = 0
    polled = running.pool.submit(running.pull, s1, m1)  # client 1 asks for work again: it is ready
    time.sleep(0.5)
    assert running.transport.ready() == [0, 1]
    (measured,) = running.transport.take_measured()
    assert (measured.client_id, measured.round, measured.outcome, measured.examples) == (1, 1, "late", 8.0)
    replies = running.ask(TrainRequest(1, 2, MODEL, TrainConfig(round=2)))
    task, _ = polled.result(timeout=10)
    assert running.push(TrainReply(1, 2, update=update), task, m1).accepted
    assert replies.result(timeout=10)[0].update is not None


def test_a_late_reply_is_checked_before_it_is_measured(running):
    """A late reply claiming an impossible example count is refused for what it is and measures nothing (it would
    otherwise set its client's speed, which sizes partial work)."""
    (s0, m0), (s1, m1) = running.join(0), running.join(1)
    running.transport.keep = 1
    replies = running.ask(*(TrainRequest(c, 1, MODEL, TrainConfig(round=1)) for c in (0, 1)))
    (t0, _), (t1, _) = running.pull(s0, m0), running.pull(s1, m1)
    assert running.push(TrainReply(0, 1, update=Update([np.ones(3, np.float32)], 1.0)), t0, m0).accepted
    replies.result(timeout=10)
    claim = Update([np.ones(3, np.float32)], 1.0, metrics={"examples": 1e12})
    refused = running.push(TrainReply(1, 1, update=claim), t1, m1)
    assert not refused.accepted and refused.error.code == "invalid_update"
    running.transport.keep = 0
    running.transport.take_measured()
    running.transport.ready()
    assert running.transport.take_measured() == [] and 1 not in running.transport.speed
