"""Compressed updates in runs: error feedback kept in the client state, the pipeline's order, real bytes in
metrics.csv and on the simulated clock, every engine giving the same model, resume, FedBuff, FedBN."""

import csv
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from fedloom.build import build_clients, build_strategy, client_pipeline
from fedloom.client.pipeline import ClientPipeline
from fedloom.client.torch_work import get_params
from fedloom.compression.updates import RESIDUAL, compression
from fedloom.config import load_config
from fedloom.errors import ConfigError, InvalidUpdateError
from fedloom.messages import TrainConfig, TrainReply, TrainRequest, Update
from fedloom.paramfiles import load_params
from fedloom.params import ParamSpec, flatten, unflatten
from fedloom.server import SyncServer
from fedloom.server.validation import check_reply
from fedloom.simulation.runner import simulate
from fedloom.stages.base import SeededNoise, clip
from fedloom.stages.clipping import Clip
from fedloom.transport import wire

SETTINGS = ["data.dataset=\"digits\"", "data.partition=\"dirichlet\"", "data.num_clients=20", "model.name=\"mlp\"",
            "client.lr=0.05", "server.clients_per_round=5", "run.rounds=4", "eval.every=2"]
COMPRESSED = ["compression.uplink=\"topk0.1+uniform8\"", "compression.error_feedback=true",
              "compression.downlink=\"uniform8\""]


def config(tmp_path: Path, *extra: str):
    return load_config(None, [*SETTINGS, f"run.out_dir=\"{tmp_path}\"", *extra])


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def delta(seed: int, n: int = 300) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(n // 3, 3)).astype(np.float32)]


def request(round_: int, state=None) -> TrainRequest:
    return TrainRequest(4, round_, [np.zeros((100, 3), np.float32)], TrainConfig(round=round_), state=state)


def test_error_feedback_conserves_what_was_sent_plus_the_residual():
    comp = compression("topk0.05", error_feedback=True)
    pipeline = ClientPipeline(compression=comp, spec=ParamSpec.of(delta(0)))
    u1, s1 = pipeline.apply(request(1), Update(delta(1), 10.0))
    sent1 = comp.uplink.decode(u1.payload, 300)
    assert u1.kind == "encoded" and np.count_nonzero(sent1) == 15
    np.testing.assert_allclose(sent1 + s1[RESIDUAL], flatten(delta(1)), atol=1e-6)
    u2, s2 = pipeline.apply(request(2, s1), Update(delta(2), 10.0))
    sent2 = comp.uplink.decode(u2.payload, 300)
    np.testing.assert_allclose(sent2 + s2[RESIDUAL], flatten(delta(2)) + s1[RESIDUAL], atol=1e-6)
    assert u2.metrics["payload_bytes"] == len(u2.payload)


def test_a_chain_equals_its_stages_applied_by_hand_and_the_server_decodes_at_its_door():
    comp = compression("uniform8")
    stage = Clip(0.5)
    spec = ParamSpec.of(delta(0))
    pipeline = ClientPipeline((stage,), SeededNoise(3), comp, spec=spec)
    req = replace(request(6), config=TrainConfig(round=6, stage=(("clip.bound", 0.5),)))
    update, state = pipeline.apply(req, Update(delta(1), 10.0))
    clipped, _ = clip(delta(1), 0.5)
    by_hand = comp.uplink.encode(flatten(clipped), np.random.default_rng([3, 6, 4, 7]))
    assert update.payload == by_hand and state is None
    reply = check_reply(req, TrainReply(4, 6, update=update), compression=comp)
    assert reply.update.kind == "delta"
    np.testing.assert_array_equal(reply.update.values[0], unflatten(comp.uplink.decode(by_hand, 300), spec)[0])


def test_malformed_or_unexpected_payloads_are_refused_saying_what_is_wrong():
    comp = compression("topk0.1+uniform8")
    good = ClientPipeline(compression=comp).apply(request(1), Update(delta(1), 10.0))[0]
    for payload, words in [(good.payload[:-3], "payload"), (b"\x00" * 5, "payload"),
                           (good.payload + b"\x01", "payload")]:
        with pytest.raises(InvalidUpdateError, match=words):
            check_reply(request(1), TrainReply(4, 1, update=replace(good, payload=payload)), compression=comp)
    with pytest.raises(InvalidUpdateError, match="compresses updates with topk0.1\\+uniform8"):
        check_reply(request(1), TrainReply(4, 1, update=Update(delta(1), 10.0)), compression=comp)
    with pytest.raises(InvalidUpdateError, match="no uplink codec"):
        check_reply(request(1), TrainReply(4, 1, update=good))
    server = SyncServer(build_strategy(load_config(None, [*SETTINGS, *COMPRESSED[:1]]), 20), 20)
    state = server.init(delta(0))
    bad = TrainReply(4, 1, update=replace(good, payload=good.payload[:10]))
    fine = TrainReply(5, 1, update=good)
    result, _ = server.apply(state, [request(1), replace(request(1), client_id=5)], [bad, fine])
    assert result.accepted == [5] and "payload" in result.rejected[4]


def test_encoded_updates_and_compressed_models_travel_as_their_bytes_on_the_wire():
    comp = compression("uniform4", "uniform8")
    params = delta(0)
    payload = comp.encode_model(params, 0, 3)
    req = TrainRequest(2, 4, params, TrainConfig(round=4), payload)
    back = wire.from_envelope(wire.to_envelope(req))
    assert back.params == [] and back.payload == payload
    assert wire.message_size(req) == wire.to_envelope(req).ByteSize() < params[0].nbytes / 3
    update = ClientPipeline(compression=comp).apply(request(1), Update(delta(1), 10.0))[0]
    reply = wire.from_envelope(wire.to_envelope(TrainReply(2, 4, update=update)))
    assert reply.update.kind == "encoded" and reply.update.payload == update.payload and reply.update.values == []
    body = wire.pb.TrainReplyBody()
    body.update.kind, body.update.weight = "encoded", 1.0
    env = wire.pb.Envelope(kind="train_reply", payload=body.SerializeToString())
    with pytest.raises(wire.WireError, match="either tensors"):
        wire.from_envelope(env)


def test_metrics_count_the_encoded_bytes_per_round_and_in_total(tmp_path):
    plain = simulate(config(tmp_path, "run.name=\"plain\""), progress=False)
    small = simulate(config(tmp_path, "run.name=\"small\"", "compression.uplink=\"uniform8\""), progress=False)
    p, s = rows(plain.run_dir), rows(small.run_dir)
    for r in (p, s):
        assert np.cumsum([int(x["bytes_up"]) for x in r]).tolist() == [int(x["total_bytes_up"]) for x in r]
    assert [x["bytes_down"] for x in p] == [x["bytes_down"] for x in s]
    ratio = int(p[-1]["total_bytes_up"]) / int(s[-1]["total_bytes_up"])
    assert 3.5 < ratio < 4.0, ratio  # 8 bits of 32, plus a scale pair per 1,024 values and the message
    # the count is the encoded size: one round's replies, encoded here, weigh what the row says
    cfg = config(tmp_path, "compression.uplink=\"uniform8\"")
    work, data = build_clients(cfg)
    server = SyncServer(build_strategy(cfg, len(data)), len(data))
    state = server.init(work.initial_params(cfg.run.seed))
    from fedloom.transport import InProcessTransport

    engine = InProcessTransport(work, data, client_pipeline(cfg, work, len(data)))
    requests, state = server.train_requests(state)
    replies = engine.exchange(requests)
    assert sum(wire.to_envelope(r).ByteSize() for r in replies) == int(s[0]["bytes_up"])
    assert sum(wire.to_envelope(r).ByteSize() for r in requests) == int(s[0]["bytes_down"])


def test_compressed_messages_move_the_simulated_clock_faster(tmp_path):
    mobile = ["hetero.population=\"mobile\"", "data.num_clients=40", "server.clients_per_round=8"]
    plain = simulate(config(tmp_path, *mobile, "run.name=\"p\""), progress=False)
    small = simulate(config(tmp_path, *mobile, "run.name=\"s\"", "compression.uplink=\"topk0.01\"",
                            "compression.error_feedback=true"), progress=False)
    assert small.history[-1]["sim_time_s"] < plain.history[-1]["sim_time_s"]
    assert small.history[-1]["total_bytes_up"] * 20 < plain.history[-1]["total_bytes_up"]


def test_fedbuff_takes_compressed_updates_with_error_feedback(tmp_path):
    fedbuff = ["hetero.population=\"mobile\"", "server.aggregation=\"fedbuff\"", "run.rounds=20"]
    plain = simulate(config(tmp_path, *fedbuff, "run.name=\"p\""), progress=False)
    result = simulate(config(tmp_path, *fedbuff, *COMPRESSED, "run.name=\"c\""), progress=False)
    assert result.final_accuracy > 0.2  # ten digits: chance is 0.1 (plain FedBuff: about 0.5)
    assert result.history[-1]["total_bytes_up"] * 10 < plain.history[-1]["total_bytes_up"]
    assert len(list((result.run_dir / "client_state").glob("*.npz"))) >= 5


def fedloom(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedloom.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def cli_run(tmp_path: Path, name: str, rounds: int, *settings: str) -> list[str]:
    (tmp_path / "run.toml").write_text("[run]\nname = \"x\"\n")
    sets = [*SETTINGS, *COMPRESSED, "run.checkpoint_every=2", f"run.name=\"{name}\"", *settings]
    return ["simulate", "run.toml", "--quiet", "--rounds", str(rounds), *[a for s in sets for a in ("--set", s)]]


def model(tmp_path: Path, name: str) -> list[np.ndarray]:
    return load_params(next((tmp_path / "runs").glob(f"{name}-*")) / "model.npz")[1]


def test_every_engine_gives_the_same_model_with_client_state(tmp_path):
    models, states = {}, {}
    for engine, vectorize in [("sequential", True), ("vectorized", True), ("process", False), ("ray", True)]:
        out = fedloom(tmp_path, *cli_run(tmp_path, engine, 4, f"engine.executor=\"{engine}\"", "engine.workers=2",
                                         f"engine.vectorize={str(vectorize).lower()}"))
        assert out.returncode == 0, out.stderr
        models[engine] = model(tmp_path, engine)
        run = next((tmp_path / "runs").glob(f"{engine}-*"))
        states[engine] = {p.name: np.load(p)["error_feedback/residual"] for p in (run / "client_state").glob("*.npz")}
    assert len(states["sequential"]) >= 10
    for engine in models:  # two workers run torch single-threaded: float32 rounding apart, through the codecs
        for a, b in zip(models["sequential"], models[engine]):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3, err_msg=engine)
        assert states[engine].keys() == states["sequential"].keys(), engine  # every residual came back
        for name, residual in states["sequential"].items():
            np.testing.assert_allclose(states[engine][name], residual, atol=2e-3, err_msg=f"{engine} {name}")


def test_a_resumed_run_with_error_feedback_ends_bit_for_bit(tmp_path):
    assert fedloom(tmp_path, *cli_run(tmp_path, "whole", 6, "engine.executor=\"sequential\"")).returncode == 0
    assert fedloom(tmp_path, *cli_run(tmp_path, "half", 3, "engine.executor=\"sequential\"")).returncode == 0
    half = next((tmp_path / "runs").glob("half-*"))
    assert {p.stem.split("-")[1] for p in (half / "client_state").glob("*.npz")} <= {"1", "2", "3"}
    out = fedloom(tmp_path, "simulate", "--resume", str(half), "--rounds", "6", "--quiet")
    assert out.returncode == 0, out.stderr
    for a, b in zip(model(tmp_path, "whole"), model(tmp_path, "half")):
        np.testing.assert_array_equal(a, b)


def batchnorm_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))


def test_fedbn_keeps_batchnorm_layers_on_the_clients(tmp_path):
    cfg = config(tmp_path, "model.batchnorm=\"local\"", "eval.federated_clients=20")
    result = simulate(cfg, progress=False, model_fn=batchnorm_mlp)
    initial = get_params(batchnorm_mlp())
    bn = [i for i, n in enumerate(result.param_names) if n.startswith("2.")]
    assert [result.param_names[i] for i in bn] == ["2.weight", "2.bias", "2.running_mean", "2.running_var"]
    for i in bn:  # the server's copy never moves: every client sends a zero change for its own layers
        np.testing.assert_array_equal(result.params[i], initial[i])
    assert result.final_accuracy == result.history[-1]["fed_accuracy"] > 0.3  # ten digits: chance is 0.1
    states = sorted((result.run_dir / "client_state").glob("*.npz"))
    kept = [dict(np.load(p)) for p in states[:2]]
    assert set(kept[0]) == {f"local/{i}" for i in bn}
    mean = f"local/{bn[2]}"
    assert not np.array_equal(kept[0][mean], kept[1][mean])  # each client's own running mean


def test_settings_that_cannot_work_are_refused_when_the_run_is_built(tmp_path):
    with pytest.raises(ConfigError, match="compression.error_feedback"):
        config(tmp_path, "compression.error_feedback=true")
    with pytest.raises(ConfigError, match="eval.federated_clients"):
        config(tmp_path, "model.batchnorm=\"local\"")
    with pytest.raises(ConfigError, match="compression.uplink"):
        config(tmp_path, "compression.uplink=\"zip9\"")
    with pytest.raises(ConfigError, match="aggregation.reducer: median works coordinate by coordinate"):
        config(tmp_path, "compression.uplink=\"topk0.1\"", "aggregation.reducer=\"median\"")
    config(tmp_path, "compression.uplink=\"uniform4\"", "aggregation.reducer=\"median\"")  # quantized: fine
    with pytest.raises(ConfigError, match="model.batchnorm.*has none"):
        simulate(config(tmp_path, "model.batchnorm=\"local\"", "eval.federated_clients=2"), progress=False)


def test_a_client_trains_from_the_decoded_broadcast_and_sends_its_change_from_it():
    comp = compression(downlink="uniform4")
    server_params = delta(0)
    spec = ParamSpec.of(server_params)
    payload = comp.encode_model(server_params, 0, 1)
    pipeline = ClientPipeline(compression=comp, spec=spec)
    prepared = pipeline.prepare(TrainRequest(1, 2, server_params, TrainConfig(round=2), payload))
    decoded = comp.decode_model(payload, spec)
    np.testing.assert_array_equal(prepared.params[0], decoded[0])
    assert prepared.payload == b"" and not np.array_equal(decoded[0], server_params[0])  # 4 bits are lossy
    trained = [decoded[0] + 1.0]
    update, state = pipeline.apply(prepared, Update(trained, 5.0, kind="params"))
    assert update.kind == "delta" and state is None
    np.testing.assert_allclose(update.values[0], np.ones_like(trained[0]), atol=1e-6)  # not trained - server's copy
