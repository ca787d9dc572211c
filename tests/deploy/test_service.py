"""The gRPC service against bad input: every malformed or unexpected message gets an error reply."""

from concurrent import futures

import grpc
import numpy as np
import pytest

from fedloom.deploy.dispatch import Dispatcher, Task
from fedloom.deploy.server import SESSION_KEY, FederationService
from fedloom.deploy.state import ServerState as StateStore
from fedloom.messages import TrainConfig, TrainReply, TrainRequest, Update
from fedloom.simulation.config import load_config
from fedloom.transport import wire
from fedloom.transport.proto import fedloom_pb2 as pb
from fedloom.transport.proto import fedloom_pb2_grpc as pb_grpc


@pytest.fixture
def service(tmp_path):
    store = StateStore(tmp_path / "server.db")
    _, token = store.enroll("c0")
    dispatcher = Dispatcher()
    cfg = load_config(None, ["deploy.max_message_mb=1", "deploy.tls=false"])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_FederationServicer_to_server(FederationService(store, dispatcher, cfg), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield pb_grpc.FederationStub(channel), token, store, dispatcher
    channel.close()
    server.stop(grace=None)
    store.close()


def test_bad_messages_get_error_replies_and_the_server_carries_on(service):
    stub, token, store, dispatcher = service
    with pytest.raises(grpc.RpcError) as err:
        stub.Join(pb.JoinRequest(client_name="c0", token="forged"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.value.details() == "unknown or revoked client token"
    session = stub.Join(pb.JoinRequest(client_name="c0", token=token)).session
    meta = ((SESSION_KEY, session),)

    with pytest.raises(grpc.RpcError) as err:  # no session
        stub.Push(iter([pb.Chunk(transfer_id="t", total_size=1, index=0, data=b"x", last=True)]))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    garbage = stub.Push(iter([pb.Chunk(transfer_id="t", total_size=9, index=0, data=b"\x00garbage", last=True)]),
                        metadata=meta)
    assert not garbage.accepted and garbage.error.code == "bad_message"

    huge = stub.Push(iter([pb.Chunk(transfer_id="t", total_size=10**12, index=0, data=b"x")]), metadata=meta)
    assert not huge.accepted and huge.error.code == "bad_message" and "max_message_bytes" in huge.error.reason

    big = TrainReply(0, 1, update=Update([np.zeros(400_000, np.float32)], 1.0))  # 1.6 MB > the 1 MB limit
    over = stub.Push(wire.to_chunks(wire.to_envelope(big, task_id="x")), metadata=meta)
    assert not over.accepted and over.error.code == "bad_message"

    reply = TrainReply(0, 1, update=Update([np.ones(3, np.float32)], 1.0))
    stray = stub.Push(wire.to_chunks(wire.to_envelope(reply, task_id="never-asked")), metadata=meta)
    assert not stray.accepted and stray.error.code == "not_awaited"

    dispatcher.submit([Task("t1", TrainRequest(0, 1, [np.zeros(3, np.float32)], TrainConfig()))])
    call = stub.Pull(pb.PullRequest(session=session, wait_s=5), metadata=meta)
    env = wire.from_chunks(call, wire.Limits())
    assert env.task_id == "t1" and isinstance(wire.from_envelope(env), TrainRequest)
    ok = stub.Push(wire.to_chunks(wire.to_envelope(reply, task_id="t1")), metadata=meta)
    assert ok.accepted
    assert stub.Heartbeat(pb.HeartbeatRequest(session=session), metadata=meta).known


def test_a_revoked_client_is_refused_and_its_session_ends(service):
    stub, token, store, _ = service
    session = stub.Join(pb.JoinRequest(client_name="c0", token=token)).session
    meta = ((SESSION_KEY, session),)
    assert stub.Heartbeat(pb.HeartbeatRequest(session=session), metadata=meta).known
    store.revoke("c0")
    with pytest.raises(grpc.RpcError) as err:  # the next heartbeat ends the open session
        stub.Heartbeat(pb.HeartbeatRequest(session=session), metadata=meta)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Pull(pb.PullRequest(session=session, wait_s=1), metadata=meta).next()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "join again" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Join(pb.JoinRequest(client_name="c0", token=token))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("setting,key", [
    (["server.selection=\"oort\""], "server.selection"),
    (["server.aggregation=\"fedbuff\"", "hetero.population=\"silo\""], "server.aggregation"),
])
def test_simulation_only_settings_are_refused_before_anything_starts(tmp_path, setting, key):
    from fedloom.deploy.server import serve
    from fedloom.errors import ConfigError

    cfg = load_config(None, ["data.dataset=\"breast_cancer\"", "data.partition=\"iid\"", "data.num_clients=3",
                             "model.name=\"logreg\"", f"deploy.state_dir=\"{tmp_path / 'state'}\"", *setting])
    with pytest.raises(ConfigError) as e:
        serve(cfg)
    assert e.value.key == key and "simulated only" in str(e.value)
    assert not (tmp_path / "state").exists()
