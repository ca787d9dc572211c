"""Tests of the wire format: tensors, envelopes, encodings and chunks, and every limit they enforce."""

from __future__ import annotations

import ast
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloom.messages import (
    ErrorReply,
    EvaluateConfig,
    EvaluateReply,
    EvaluateRequest,
    Evaluation,
    TrainConfig,
    TrainReply,
    TrainRequest,
    Update,
)
from fedloom.transport import wire
from fedloom.transport.proto import fedloom_pb2 as pb
from fedloom.transport.wire import Limits, WireError

SRC = Path(__file__).resolve().parents[2] / "src"
WIRE_PY = SRC / "fedloom" / "transport" / "wire.py"
MiB = 1 << 20
DEFAULT_LIMITS = Limits()


# ------------------------------------------------------------------------------------------ helpers


def assert_same(a: Any, b: Any) -> None:
    """Deep equality that compares numpy arrays by dtype, shape and values."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray)
        assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    elif is_dataclass(a):
        assert type(a) is type(b)
        for f in fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name))
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def all_dtype_params() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.standard_normal((3, 4)).astype(np.float16),
        rng.standard_normal((5,)).astype(np.float32),
        rng.standard_normal((2, 2, 2)),
        np.array([-128, 0, 127], dtype=np.int8),
        np.array([[-3, 4]], dtype=np.int16),
        np.arange(6, dtype=np.int32).reshape(2, 3),
        np.array([-(2**62), 2**62], dtype=np.int64),
        np.array([0, 255], dtype=np.uint8),
        np.array([True, False, True]),
        np.array(3.5, dtype=np.float32),  # 0-d
        np.zeros((0, 3), dtype=np.float32),  # empty
        np.zeros((0,), dtype=np.int64),
        np.array([np.nan, np.inf, -np.inf], dtype=np.float32),
    ]


MESSAGES = {
    "train_request": TrainRequest(7, 3, all_dtype_params(), TrainConfig()),
    "train_request_capped": TrainRequest(
        0, 1, [np.ones(2, np.float32)], TrainConfig(lr=0.01, batch_size=32, local_epochs=2, max_steps=5, mu=0.1,
                                                    seed=42, round=9)),
    "train_request_no_params": TrainRequest(1, 2, [], TrainConfig()),
    "train_reply_update": TrainReply(
        7, 3, update=Update(all_dtype_params(), 12.0, "delta", {"loss": 0.25, "acc": 0.5, "steps": 10.0})),
    "train_reply_params": TrainReply(2, 4, update=Update([np.ones((2, 3), np.float32)], 1.5, "params")),
    "train_reply_error": TrainReply(7, 3, error=ErrorReply("client_failed", "CUDA out of memory: ü ✓")),
    "evaluate_request": EvaluateRequest(5, 11, all_dtype_params(), EvaluateConfig(batch_size=64)),
    "evaluate_request_default": EvaluateRequest(5, 11, [np.ones(3, np.float32)]),
    "evaluate_reply": EvaluateReply(9, 2, evaluation=Evaluation(0.5, 0.875, 1234)),
    "evaluate_reply_error": EvaluateReply(9, 2, error=ErrorReply("bad_data", "no test split")),
}


def roundtrip(message: Any, encoding: str = "proto", chunk_bytes: int = MiB, limits: Limits = DEFAULT_LIMITS) -> Any:
    env = wire.to_envelope(message, task_id="task-1", encoding=encoding)
    back = wire.from_chunks(wire.to_chunks(env, chunk_bytes), limits)
    assert back == env
    return wire.from_envelope(back, limits)


def chunks_of(message: Any, chunk_bytes: int = 16) -> list[pb.Chunk]:
    chunks = list(wire.to_chunks(wire.to_envelope(message), chunk_bytes))
    assert len(chunks) >= 4
    return chunks


def envelope(kind: str, body: bytes, encoding: str = "proto") -> pb.Envelope:
    return pb.Envelope(kind=kind, client_id=1, round=1, encoding=encoding, payload=body)


def tensor_body(t: pb.Tensor) -> bytes:
    return pb.TrainRequestBody(params=[t], config=pb.TrainConfigMsg(batch_size=1)).SerializeToString()


def zlib_bomb(gib: int = 1) -> bytes:
    """A valid zlib stream (~1 MB) that inflates to ``gib`` GiB of zeros, built without compressing them.

    Each 1 MiB of zeros is deflated and fully flushed, so its bytes do not depend on earlier data
    and can be repeated; an empty final block and the Adler-32 of all the zeros end the stream.
    """
    mib = bytes(MiB)
    c = zlib.compressobj(9)
    head = c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH)
    segment = c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(1024 * gib):
        adler = zlib.adler32(mib, adler)
    return head + segment * (1024 * gib - 1) + b"\x03\x00" + struct.pack(">I", adler)


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("encoding", ["proto", "zlib+proto"])
@pytest.mark.parametrize("chunk_bytes", [7, MiB])
@pytest.mark.parametrize("name", list(MESSAGES))
def test_every_message_round_trips_through_envelope_and_chunks(name: str, encoding: str, chunk_bytes: int) -> None:
    message = MESSAGES[name]
    assert_same(roundtrip(message, encoding, chunk_bytes), message)


def test_envelope_carries_kind_address_and_encoding() -> None:
    env = wire.to_envelope(MESSAGES["train_request"], task_id="abc", encoding="zlib+proto")
    assert (env.kind, env.task_id, env.client_id, env.round, env.encoding) == ("train_request", "abc", 7, 3,
                                                                               "zlib+proto")
    assert {"train_request", "train_reply", "evaluate_request", "evaluate_reply"} <= set(wire.kinds())
    assert {"proto", "zlib+proto"} <= set(wire.encodings())


def test_client_id_and_round_come_from_the_envelope() -> None:
    env = wire.to_envelope(MESSAGES["train_reply_error"])
    env.client_id, env.round = 99, 1000
    reply = wire.from_envelope(env)
    assert (reply.client_id, reply.round) == (99, 1000)


def test_empty_encoding_means_proto() -> None:
    env = wire.to_envelope(MESSAGES["evaluate_reply"])
    env.encoding = ""
    assert_same(wire.from_envelope(env), MESSAGES["evaluate_reply"])


def test_max_steps_none_and_zero_on_the_wire() -> None:
    assert roundtrip(MESSAGES["train_request"]).config.max_steps is None
    assert roundtrip(MESSAGES["train_request_capped"]).config.max_steps == 5
    with pytest.raises(WireError, match="max_steps must be None or >= 1"):
        wire.to_envelope(TrainRequest(0, 1, [], TrainConfig(max_steps=0)))


def test_decoded_arrays_are_new_writable_native_arrays() -> None:
    params = all_dtype_params()
    out = roundtrip(TrainRequest(0, 1, params, TrainConfig())).params
    for a, b in zip(params, out):
        assert b.flags.writeable and b.flags.c_contiguous and b.dtype.isnative
        assert not np.shares_memory(a, b)
    out[1][...] = 0  # writable for real


def test_big_endian_and_non_contiguous_arrays_round_trip() -> None:
    big = np.arange(12, dtype=">f8").reshape(3, 4)
    strided = np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2].T
    t = wire.encode_tensor(big)
    assert t.dtype == "float64" and list(t.shape) == [3, 4] and t.data == big.astype("<f8").tobytes()
    out = roundtrip(TrainRequest(0, 1, [big, strided], TrainConfig())).params
    np.testing.assert_array_equal(out[0], big)
    np.testing.assert_array_equal(out[1], strided)
    assert out[0].dtype == np.float64


def test_bool_tensor_normalises_nonzero_bytes() -> None:
    t = pb.Tensor(dtype="bool", shape=[3], data=b"\x00\x01\x07")
    out = wire.decode_tensor(t, 100)
    assert out.dtype == np.bool_ and out.tolist() == [False, True, True]


def test_empty_envelope_travels_as_one_last_chunk() -> None:
    chunks = list(wire.to_chunks(pb.Envelope()))
    assert len(chunks) == 1 and chunks[0].last and chunks[0].total_size == 0
    assert wire.from_chunks(chunks) == pb.Envelope()


def test_chunks_are_sized_indexed_and_share_a_transfer_id() -> None:
    env = wire.to_envelope(TrainRequest(0, 1, [np.zeros(1000, np.float32)], TrainConfig()))
    chunks = list(wire.to_chunks(env, 1024))
    total = env.ByteSize()
    assert len(chunks) == -(-total // 1024)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert {c.transfer_id for c in chunks} == {chunks[0].transfer_id} and len(chunks[0].transfer_id) == 32
    assert all(len(c.data) == 1024 and not c.last for c in chunks[:-1]) and chunks[-1].last
    assert {c.total_size for c in chunks} == {total}
    assert next(wire.to_chunks(env)).transfer_id != chunks[0].transfer_id
    assert [wire.chunk_size(c) for c in chunks] == [c.ByteSize() for c in chunks]  # what the server counts as sent
    assert [wire.chunk_size(c) for c in wire.to_chunks(pb.Envelope())] == [c.ByteSize() for c in
                                                                           wire.to_chunks(pb.Envelope())]


def test_one_model_sent_to_many_clients_is_encoded_once_and_each_task_reads_back_its_own() -> None:
    model = [np.arange(12, dtype=np.float32).reshape(3, 4), np.ones(2, np.float32)]
    for cid, rnd, lr in ((3, 5, 0.1), (4, 6, 0.3)):  # the second reuses the first's encoded tensors
        request = TrainRequest(cid, rnd, model, TrainConfig(lr=lr, round=rnd))
        env = wire.to_envelope(request)
        back = wire.from_envelope(env)
        assert (back.client_id, back.round, back.config) == (cid, rnd, request.config)
        assert all(np.array_equal(a, b) for a, b in zip(back.params, model))
        assert wire.message_size(request) == env.ByteSize()
    other = [np.zeros((3, 4), np.float32), np.ones(2, np.float32)]  # another model (another version) is encoded anew
    assert np.array_equal(wire.from_envelope(wire.to_envelope(TrainRequest(0, 1, other, TrainConfig()))).params[0],
                          other[0])


def test_200mb_model_round_trips_in_few_seconds_and_bounded_memory() -> None:
    """One float32 array of 50M elements through envelope + 1 MiB chunks, in a fresh process to measure peak RSS."""
    script = textwrap.dedent("""
        import json, resource, time
        import numpy as np
        from fedloom.messages import TrainConfig, TrainRequest
        from fedloom.transport import wire

        def rss_mib():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        a = np.random.default_rng(0).standard_normal(50_000_000, dtype=np.float32)
        base = rss_mib()
        t0, c0 = time.perf_counter(), time.process_time()
        env = wire.to_envelope(TrainRequest(3, 7, [a], TrainConfig()), task_id="big")
        chunks = wire.to_chunks(env, 1 << 20)
        del env
        back = wire.from_chunks(chunks)
        del chunks
        msg = wire.from_envelope(back)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        equal = bool(np.array_equal(msg.params[0], a)) and (msg.client_id, msg.round) == (3, 7)
        print(json.dumps({"base": base, "peak": rss_mib(), "seconds": seconds, "cpu": cpu, "equal": equal,
                          "bytes": back.ByteSize()}))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\n200 MB round trip: {result}")
    assert result["equal"]
    assert result["bytes"] > 200_000_000
    assert result["peak"] < 1500, result  # MiB, including the interpreter, numpy, torch and the 200 MB array
    assert result["peak"] - result["base"] < 1100, result  # what the wire path itself costs
    assert result["cpu"] < 20, result  # CPU seconds (~2.5 on an idle 2-core machine): robust to a loaded host


# ------------------------------------------------------------------------------------------ tensors and limits


@pytest.mark.parametrize(
    ("tensor", "match"),
    [
        (pb.Tensor(dtype="float32", shape=[10], data=bytes(36)), "needs 40 bytes but carries 36"),
        (pb.Tensor(dtype="float32", shape=[2, 3], data=bytes(28)), "needs 24 bytes but carries 28"),
        (pb.Tensor(dtype="float32", shape=[], data=b""), "needs 4 bytes but carries 0"),
        (pb.Tensor(dtype="float32", shape=[-1], data=bytes(4)), "negative dimension"),
        (pb.Tensor(dtype="float32", shape=[2, -2], data=bytes(0)), "negative dimension"),
        (pb.Tensor(dtype="float32", shape=[1] * 9, data=bytes(4)), "9 dimensions, over the limit of 8"),
        (pb.Tensor(dtype="float64", shape=[2**40, 2**40], data=b""), "over the limit"),
        (pb.Tensor(dtype="uint8", shape=[2**62, 2**62, 2**62], data=b""), "over the limit"),
        (pb.Tensor(dtype="complex64", shape=[1], data=bytes(8)), "unknown tensor dtype 'complex64'"),
        (pb.Tensor(dtype="object", shape=[1], data=bytes(8)), "unknown tensor dtype 'object'"),
        (pb.Tensor(dtype="<f4", shape=[1], data=bytes(4)), "unknown tensor dtype"),
        (pb.Tensor(dtype="", shape=[1], data=bytes(4)), "unknown tensor dtype ''"),
    ],
)
def test_bad_tensors_are_refused(tensor: pb.Tensor, match: str) -> None:
    with pytest.raises(WireError, match=match) as info:
        wire.decode_tensor(tensor, 1 << 30)
    assert info.value.code == "bad_message"
    with pytest.raises(WireError, match="tensor 0: .*" + match):  # the same, inside a message
        wire.from_envelope(envelope("train_request", tensor_body(tensor)))


def test_tensor_byte_and_count_limits() -> None:
    msg = TrainRequest(0, 1, [np.zeros(26, np.float32)] * 3, TrainConfig())
    with pytest.raises(WireError, match="104 bytes, over the limit of 100"):
        roundtrip(msg, limits=Limits(max_tensor_bytes=100))
    with pytest.raises(WireError, match="3 tensors, over the limit of 2"):
        roundtrip(msg, limits=Limits(max_tensors=2))
    with pytest.raises(WireError, match="3 dimensions, over the limit of 2"):
        roundtrip(TrainRequest(0, 1, [np.zeros((1, 1, 1))], TrainConfig()), limits=Limits(max_dims=2))


@pytest.mark.parametrize("array", [np.array([1 + 2j]), np.array(["a"]), np.array([object()]),
                                   np.zeros(2, dtype="u4"), np.array(["2020-01-01"], dtype="datetime64[D]"),
                                   np.zeros(1, dtype=[("x", "f4")])])
def test_unsupported_dtypes_are_refused_on_encode(array: np.ndarray) -> None:
    with pytest.raises(WireError, match="cannot send an array of dtype"):
        wire.encode_tensor(array)
    with pytest.raises(WireError, match="array 1: cannot send"):
        wire.to_envelope(TrainRequest(0, 1, [np.zeros(1), array], TrainConfig()))


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_message_bytes"):
        Limits(max_message_bytes=0)
    with pytest.raises(ValueError, match="max_dims"):
        Limits(max_dims=-1)


# ------------------------------------------------------------------------------------------ envelopes


def test_unknown_kind_encoding_and_class() -> None:
    body = wire.to_envelope(MESSAGES["evaluate_reply"]).payload
    with pytest.raises(WireError, match="unknown message kind 'secagg.nope'; known: evaluate_reply"):
        wire.from_envelope(envelope("secagg.nope", body))
    with pytest.raises(WireError, match="unknown message kind ''"):
        wire.from_envelope(pb.Envelope())
    with pytest.raises(WireError, match="unknown encoding 'brotli\\+proto'"):
        wire.from_envelope(envelope("evaluate_reply", body, encoding="brotli+proto"))
    with pytest.raises(WireError, match="unknown encoding 'lz4'"):
        wire.to_envelope(MESSAGES["evaluate_reply"], encoding="lz4")
    with pytest.raises(WireError, match="no message kind is registered for Evaluation"):
        wire.to_envelope(Evaluation(0.0, 0.0, 1))


@pytest.mark.parametrize("kind", ["train_request", "train_reply", "evaluate_request", "evaluate_reply"])
@pytest.mark.parametrize("garbage", [b"\xff" * 16, b"garbage!", bytes(range(256)), b"\x0a\xff\xff\xff\xff\x0f"])
def test_garbage_payload_is_refused(kind: str, garbage: bytes) -> None:
    with pytest.raises(WireError, match=f"{kind} body is not a valid"):
        wire.from_envelope(envelope(kind, garbage))


@pytest.mark.parametrize(
    ("kind", "body", "match"),
    [
        ("train_reply", pb.TrainReplyBody(), "neither update nor error"),
        ("train_reply", pb.TrainReplyBody(update=pb.UpdateMsg(kind="gradient")), "update kind must be"),
        ("train_reply", pb.TrainReplyBody(error=pb.ErrorMsg(reason="x")), "empty code"),
        ("evaluate_reply", pb.EvaluateReplyBody(), "neither evaluation nor error"),
        ("evaluate_reply", pb.EvaluateReplyBody(evaluation=pb.EvaluationMsg(num_examples=-1)), "num_examples"),
        ("train_request", pb.TrainRequestBody(), "has no config"),
        ("train_request", pb.TrainRequestBody(config=pb.TrainConfigMsg()), "batch_size must be >= 1"),
        ("train_request", pb.TrainRequestBody(config=pb.TrainConfigMsg(batch_size=1, local_epochs=-1)),
         "local_epochs"),
        ("train_request", pb.TrainRequestBody(config=pb.TrainConfigMsg(batch_size=1, max_steps=-3)), "max_steps"),
        ("train_request", pb.TrainRequestBody(config=pb.TrainConfigMsg(batch_size=1, lr=float("nan"))),
         "must be finite"),
        ("evaluate_request", pb.EvaluateRequestBody(batch_size=0), "batch_size must be >= 1"),
    ],
)
def test_wrong_field_values_are_refused(kind: str, body: Any, match: str) -> None:
    with pytest.raises(WireError, match=match):
        wire.from_envelope(envelope(kind, body.SerializeToString()))


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (TrainReply(0, 1), "neither update nor error"),
        (TrainReply(0, 1, update=Update([], 1.0), error=ErrorReply("x", "y")), "both update and error"),
        (TrainReply(0, 1, update=Update([], 1.0, kind="grad")), "update kind must be"),  # type: ignore[arg-type]
        (EvaluateReply(0, 1), "neither evaluation nor error"),
        (TrainReply(0, -1, error=ErrorReply("x", "y")), "cannot encode train_reply"),
        (EvaluateRequest(0, 1, [], EvaluateConfig(batch_size=2**40)), "cannot encode evaluate_request"),
        (TrainRequest(0, 1, [], TrainConfig(lr="fast")), "cannot encode train_request"),  # type: ignore[arg-type]
    ],
)
def test_unencodable_messages_are_refused(message: Any, match: str) -> None:
    with pytest.raises(WireError, match=match):
        wire.to_envelope(message)


def test_many_tiny_submessages_are_refused_before_parsing() -> None:
    """4 MB of empty Tensor entries would cost a protobuf parser ~130 MB (and 256 MiB of them ~8 GB)."""
    attack = b"\x0a\x00" * 2_000_000
    with pytest.raises(WireError, match="train_request body holds more than max_elements=200000"):
        wire.from_envelope(envelope("train_request", attack))
    with pytest.raises(WireError, match="train_reply body holds more than max_elements=200000"):
        wire.from_envelope(envelope("train_reply", b"\x0a\x04\x22\x02\x0a\x00" * 200_001))  # metrics map
    with pytest.raises(WireError, match="more than max_elements=10"):  # packed shape entries count too
        wire.from_envelope(envelope("train_request", tensor_body(pb.Tensor(dtype="uint8", shape=[1] * 11))),
                           Limits(max_elements=10))
    msg = TrainRequest(0, 1, [np.zeros((1, 1), np.float32)] * 3, TrainConfig())  # 3 tensors + 6 dims + config
    assert_same(roundtrip(msg, limits=Limits(max_elements=10)), msg)
    with pytest.raises(WireError, match="more than max_elements=9"):
        roundtrip(msg, limits=Limits(max_elements=9))


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"\x0a\x10\x0a\x01", "a field runs past its end"),
        (b"\x0a\x02\x12\x05", "a field runs past its end"),  # inside a submessage
        (b"\x10\xff\xff", "a truncated or overlong varint"),
        (b"\x10" + b"\xff" * 11 + b"\x01", "a truncated or overlong varint"),
        (b"\x0b\x0c", "unsupported wire type 3"),
    ],
)
def test_bad_framing_is_refused_before_parsing(body: bytes, match: str) -> None:
    with pytest.raises(WireError, match="train_request body is not a valid TrainRequestBody: " + match):
        wire.from_envelope(envelope("train_request", body))


def test_parse_message_is_there_for_new_codecs() -> None:
    body = pb.UpdateMsg(values=[wire.encode_tensor(np.ones(2))], kind="keys").SerializeToString()
    assert wire.parse_message(pb.UpdateMsg, body, Limits()).kind == "keys"
    with pytest.raises(WireError, match="UpdateMsg body is not a valid UpdateMsg"):
        wire.parse_message(pb.UpdateMsg, b"\xff" * 4, Limits())


def test_empty_tensor_with_overflowing_dims_is_refused() -> None:
    t = pb.Tensor(dtype="float32", shape=[0, 2**63 - 1, 2**63 - 1], data=b"")
    with pytest.raises(WireError, match="cannot be built"):
        wire.decode_tensor(t)


def test_payload_over_the_message_limit_is_refused() -> None:
    env = wire.to_envelope(TrainRequest(0, 1, [np.zeros(1000, np.float32)], TrainConfig()))
    with pytest.raises(WireError, match="payload is 40.. bytes, over max_message_bytes=1000"):
        wire.from_envelope(env, Limits(max_message_bytes=1000))


# ------------------------------------------------------------------------------------------ zlib


def test_zlib_bomb_is_refused_without_inflating_it_all() -> None:
    bomb = zlib_bomb(1)  # ~1 MB that inflates to 1 GiB
    assert len(bomb) < 2 * MiB
    with pytest.raises(WireError, match="inflates to more than max_message_bytes=268435456"):
        wire.from_envelope(envelope("train_request", bomb, encoding="zlib+proto"))
    with pytest.raises(WireError, match="inflates to more than max_message_bytes=4194304"):
        wire.from_envelope(envelope("train_request", bomb, encoding="zlib+proto"), Limits(max_message_bytes=4 * MiB))


def test_corrupt_truncated_and_padded_zlib_payloads() -> None:
    good = zlib.compress(tensor_body(wire.encode_tensor(np.arange(100))))
    with pytest.raises(WireError, match="zlib payload is corrupt"):
        wire.from_envelope(envelope("train_request", b"not zlib at all", encoding="zlib+proto"))
    with pytest.raises(WireError, match="zlib payload is truncated"):
        wire.from_envelope(envelope("train_request", good[:-10], encoding="zlib+proto"))
    with pytest.raises(WireError, match="3 stray bytes"):
        wire.from_envelope(envelope("train_request", good + b"abc", encoding="zlib+proto"))
    assert wire.from_envelope(envelope("train_request", good, encoding="zlib+proto")).params[0].sum() == 4950


def test_zlib_shrinks_compressible_updates() -> None:
    msg = TrainReply(0, 1, update=Update([np.zeros(100_000, np.float32)], 1.0))
    assert len(wire.to_envelope(msg, encoding="zlib+proto").payload) < len(wire.to_envelope(msg).payload) / 50


# ------------------------------------------------------------------------------------------ chunks


def test_declared_total_over_the_limit_is_refused_on_the_first_chunk() -> None:
    def stream() -> Iterator[pb.Chunk]:
        yield pb.Chunk(transfer_id="t", total_size=10**15, index=0, data=b"x")
        raise AssertionError("from_chunks read past the first chunk")

    with pytest.raises(WireError, match="declares 1000000000000000 bytes, over max_message_bytes=268435456"):
        wire.from_chunks(stream())  # a bytearray(10**15) would raise MemoryError, not WireError
    with pytest.raises(WireError, match="declares 101 bytes, over max_message_bytes=100"):
        wire.from_chunks([pb.Chunk(total_size=101, data=b"x", last=True)], Limits(max_message_bytes=100))


def test_out_of_order_chunks_are_refused() -> None:
    chunks = chunks_of(MESSAGES["train_reply_update"])
    chunks[1], chunks[2] = chunks[2], chunks[1]
    with pytest.raises(WireError, match="chunk 2 of transfer '[0-9a-f]+' arrived where chunk 1 was expected"):
        wire.from_chunks(chunks)


def test_a_missing_chunk_is_refused() -> None:
    chunks = chunks_of(MESSAGES["train_reply_update"])
    del chunks[3]
    with pytest.raises(WireError, match="chunk 4 .* arrived where chunk 3 was expected"):
        wire.from_chunks(chunks)


def test_a_missing_last_chunk_is_refused() -> None:
    chunks = chunks_of(MESSAGES["train_reply_update"])[:-1]
    with pytest.raises(WireError, match="ended without a last chunk"):
        wire.from_chunks(chunks)


def test_an_early_last_chunk_is_refused() -> None:
    chunks = chunks_of(MESSAGES["train_reply_update"])
    chunks[1].last = True
    with pytest.raises(WireError, match="carried 32 bytes but declared"):
        wire.from_chunks(chunks)


def test_an_empty_stream_is_refused() -> None:
    with pytest.raises(WireError, match="empty chunk stream"):
        wire.from_chunks([])


def test_mixed_transfers_are_refused() -> None:
    a = chunks_of(MESSAGES["train_reply_update"])
    b = chunks_of(MESSAGES["train_reply_update"])
    with pytest.raises(WireError, match="belongs to transfer"):
        wire.from_chunks([a[0], b[1], *a[2:]])


def test_inconsistent_sizes_are_refused() -> None:
    chunks = chunks_of(MESSAGES["train_reply_update"])
    chunks[2].total_size += 1
    with pytest.raises(WireError, match="declares total_size"):
        wire.from_chunks(chunks)
    chunks = chunks_of(MESSAGES["train_reply_update"])
    chunks[2].data += b"extra" * 10_000
    with pytest.raises(WireError, match="carry more than the declared"):
        wire.from_chunks(chunks)


def test_endless_empty_chunks_are_refused() -> None:
    def stream() -> Iterator[pb.Chunk]:
        for i in range(10**9):
            yield pb.Chunk(transfer_id="t", total_size=10, index=i)

    with pytest.raises(WireError, match="chunk 0 of transfer 't' carries 0 bytes; every chunk but the last"):
        wire.from_chunks(stream())


def test_garbage_chunk_data_is_refused() -> None:
    with pytest.raises(WireError, match="is not a valid Envelope"):
        wire.from_chunks([pb.Chunk(transfer_id="t", total_size=8, data=b"\xff" * 8, last=True)])


def test_reading_stops_at_the_last_chunk() -> None:
    first = list(wire.to_chunks(wire.to_envelope(MESSAGES["evaluate_reply"]), 8))
    second = list(wire.to_chunks(wire.to_envelope(MESSAGES["train_reply_error"]), 8))
    it = iter(first + second)
    assert_same(wire.from_envelope(wire.from_chunks(it)), MESSAGES["evaluate_reply"])
    assert_same(wire.from_envelope(wire.from_chunks(it)), MESSAGES["train_reply_error"])


def test_chunk_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="chunk_bytes"):
        next(wire.to_chunks(pb.Envelope(), 0))


# ------------------------------------------------------------------------------------------ extension


@dataclass(frozen=True)
class ShareKeys:
    """A stand-in for a later protocol's message (secure aggregation's key shares)."""

    client_id: int
    round: int
    keys: list[np.ndarray]


def _encode_share_keys(m: ShareKeys) -> bytes:
    return pb.UpdateMsg(values=[wire.encode_tensor(k) for k in m.keys], kind="keys").SerializeToString()


def _decode_share_keys(data: bytes, limits: Limits) -> ShareKeys:
    body = pb.UpdateMsg.FromString(data)
    return ShareKeys(0, 0, [wire.decode_tensor(t, limits.max_tensor_bytes, limits.max_dims) for t in body.values])


def _reverse(b: bytes) -> bytes:
    return b[::-1]


if "test.share_keys" not in wire.kinds():
    wire.register("test.share_keys", ShareKeys, _encode_share_keys, _decode_share_keys)
if "test.reversed+proto" not in wire.encodings():
    wire.register_encoding("test.reversed+proto", _reverse, lambda b, limits: _reverse(b))


def test_new_kinds_and_encodings_need_no_schema_change() -> None:
    msg = ShareKeys(4, 8, [np.arange(5, dtype=np.uint8)])
    out = roundtrip(msg, encoding="test.reversed+proto")
    assert_same(out, msg)
    env = wire.to_envelope(msg, encoding="test.reversed+proto")
    assert (env.kind, env.encoding, env.client_id, env.round) == ("test.share_keys", "test.reversed+proto", 4, 8)
    with pytest.raises(WireError, match="test.share_keys body is malformed"):  # a codec's DecodeError is wrapped
        wire.from_envelope(envelope("test.share_keys", b"\xff" * 8))


def test_a_kind_or_class_registers_once() -> None:
    with pytest.raises(ValueError, match="already registered"):
        wire.register("train_request", ShareKeys, _encode_share_keys, _decode_share_keys)
    with pytest.raises(ValueError, match="already registered as kind 'test.share_keys'"):
        wire.register("test.other", ShareKeys, _encode_share_keys, _decode_share_keys)
    with pytest.raises(ValueError, match="already registered"):
        wire.register_encoding("proto", _reverse, lambda b, limits: b)


# ------------------------------------------------------------------------------------------ no pickle


def test_no_pickle_in_the_wire_code() -> None:
    proto_dir = WIRE_PY.parent / "proto"
    for path in [WIRE_PY, *sorted(proto_dir.glob("*.py"))]:
        source = path.read_text()
        imported: set[str] = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        names = {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
        forbidden = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve"}
        assert not (imported | names) & forbidden, path
        assert "import pickle" not in source and "allow_pickle" not in source and "__import__" not in source, path


def test_tiny_chunks_are_refused_at_the_first_one_under_the_minimum() -> None:
    env = wire.to_envelope(TrainReply(0, 1, update=Update([np.zeros(100_000, np.float32)], 1.0)))
    limits = wire.Limits(min_chunk_bytes=64 * 1024)
    sent = []

    def counted(chunks):
        for c in chunks:
            sent.append(c.index)
            yield c

    with pytest.raises(WireError, match="chunk 0 of transfer .* carries 1 bytes; every chunk but the last must carry "
                                        "at least 65536"):
        wire.from_chunks(counted(wire.to_chunks(env, chunk_bytes=1)), limits)
    assert sent == [0]  # the flood is refused at its first chunk, not after 400,000 of them
    # chunks of the minimum size, and a short last one, are fine
    assert wire.from_chunks(wire.to_chunks(env, chunk_bytes=64 * 1024), limits) == env


def test_the_buffer_grows_with_the_data_not_with_the_declared_size() -> None:
    first = pb.Chunk(transfer_id="t", total_size=200 << 20, index=0, data=b"x" * 1000)
    assembler = wire.Assembler(first, wire.Limits())
    assert not assembler.add(first)
    assert len(assembler.buf) == 1000  # a stranger's declared 200 MiB is not allocated on its word


def test_message_size_is_the_encoded_envelopes_size_without_encoding_the_arrays():
    from fedloom.messages import TrainConfig, TrainReply, TrainRequest, Update

    updates = [Update([np.ones((60, 10), np.float32), np.ones(10, np.float32)], 30.0, "delta",
                      {"loss": 1.0, "loss_sq": 2.0, "examples": 30.0}),
               Update([np.zeros((0, 3), np.float32), np.ones((), np.float64), np.ones(70000, np.float16)], 0.0,
                      "params"),
               Update([], -0.0, "encoded", {"a": 0.0, "": -0.0, "é": 1}, b"x" * 300),
               Update([np.ones(3, np.int64)], 1e300, "delta", {"k" * 200: -1.0, 1: 2.0}),
               Update([np.ones((2, 3), bool)], 1.0)]
    params = [np.ones((5, 4), np.float32)]
    for cid, rnd in [(0, 0), (5, 3), (10**9, 2**40), (-3, 7)]:
        for u in updates:
            reply = TrainReply(cid, rnd, update=u)
            assert wire.message_size(reply) == wire.to_envelope(reply).ByteSize(), u
        for request in (TrainRequest(cid, rnd, params, TrainConfig(round=rnd)),
                        TrainRequest(cid, rnd, params, TrainConfig(round=rnd, stage=(("clip.bound", 0.5),)), b"z" * 9)):
            assert wire.message_size(request) == wire.to_envelope(request).ByteSize()
    with pytest.raises(WireError, match="update kind"):
        wire.message_size(TrainReply(1, 1, update=Update([], 1.0, "sparse")))  # type: ignore[arg-type]
