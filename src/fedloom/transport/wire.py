"""The wire format of fedloom's gRPC deployment: typed messages <-> protobuf bytes, safely.

Three layers, each checked against :class:`Limits` before anything large is allocated:

* **Tensors** travel as dtype name + shape + raw little-endian bytes (numeric dtypes only; no
  pickle anywhere). :func:`encode_tensor` / :func:`decode_tensor`.
* **Envelopes** carry any registered message kind: ``kind`` names a codec (``"train_request"``,
  ``"train_reply"``, ``"evaluate_request"``, ``"evaluate_reply"`` are built in; more are added
  with :func:`register`), ``encoding`` names how the payload bytes are encoded (``"proto"`` and
  ``"zlib+proto"`` built in; more with :func:`register_encoding`). ``client_id`` and ``round``
  live in the envelope, not in the body. :func:`to_envelope` / :func:`from_envelope`.
* **Chunks**: a serialized envelope is sliced into :class:`Chunk` messages (1 MiB by default) so
  that no single gRPC message exceeds gRPC's default 4 MB limit. :func:`to_chunks` /
  :func:`from_chunks`.

Every malformed or oversized input raises :class:`WireError` (code ``"bad_message"``) with a
message that says what was wrong; nothing here crashes or allocates more than the limits allow.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import secrets
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from fedloom.errors import WireError
from fedloom.messages import (
    ErrorReply,
    EvaluateConfig,
    EvaluateReply,
    EvaluateRequest,
    Evaluation,
    StepReply,
    StepRequest,
    TrainConfig,
    TrainReply,
    TrainRequest,
    Update,
)
from fedloom.params import Params
from fedloom.transport.proto import fedloom_pb2 as pb

Tensor = pb.Tensor
Envelope = pb.Envelope
Chunk = pb.Chunk

MiB = 1 << 20
DEFAULT_CHUNK_BYTES = 1 * MiB
ZLIB_LEVEL = 1  # fast; model weights rarely compress much, sparse/quantized ones do at any level
UPDATE_KINDS = ("delta", "params", "encoded", "masked")
PAYLOAD_KINDS = ("encoded", "masked")  # updates whose bytes are in the payload, not in tensors
MAX_NAME = 64  # characters of a step's name or of one of its value names



@dataclass(frozen=True)
class Limits:
    """Upper bounds applied while decoding; anything larger is refused before it is allocated."""

    max_message_bytes: int = 256 * MiB  # a serialized envelope, and a payload after decompression
    max_tensor_bytes: int = 256 * MiB  # one tensor's raw data
    max_tensors: int = 10_000  # tensors in one message
    max_dims: int = 8  # dimensions of one tensor
    max_elements: int = 200_000  # submessages and repeated entries in one body, counted before parsing
    min_chunk_bytes: int = 1  # every chunk but the last carries at least this (or the rest): bounds the chunk count

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{f.name} must be a positive int, got {value!r}")


# ---------------------------------------------------------------------------------------- tensors

_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
}
ALLOWED_DTYPES = tuple(_DTYPES)


def _fill_tensor(t: pb.Tensor, a: np.ndarray) -> None:
    """Write array ``a`` into the (empty) Tensor message ``t``."""
    arr = np.asarray(a)
    name = arr.dtype.name
    if name not in _DTYPES:
        raise WireError(f"cannot send an array of dtype {arr.dtype}; allowed: {', '.join(ALLOWED_DTYPES)}")
    t.dtype = name
    t.shape.extend(arr.shape)
    t.data = arr.astype(_DTYPES[name], copy=False).tobytes(order="C")


def encode_tensor(a: np.ndarray) -> pb.Tensor:
    """A :class:`Tensor` holding ``a``'s dtype name, shape and C-order little-endian bytes."""
    t = pb.Tensor()
    _fill_tensor(t, a)
    return t


def _checked_nbytes(dtype_name: str, shape: tuple[int, ...], max_bytes: int, max_dims: int) -> int:
    """The byte size a tensor declares, after checking dtype, dims and the size limit."""
    dtype = _DTYPES.get(dtype_name)
    if dtype is None:
        raise WireError(f"unknown tensor dtype {dtype_name!r}; allowed: {', '.join(ALLOWED_DTYPES)}")
    if len(shape) > max_dims:
        raise WireError(f"tensor has {len(shape)} dimensions, over the limit of {max_dims}")
    if any(d < 0 for d in shape):
        raise WireError(f"tensor shape {list(shape)} has a negative dimension")
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if nbytes > max_bytes:
        raise WireError(f"tensor {dtype_name}{list(shape)} is {nbytes} bytes, over the limit of {max_bytes}")
    return nbytes


def decode_tensor(t: pb.Tensor, max_bytes: int = 256 * MiB, max_dims: int = 8) -> np.ndarray:
    """A new writable, native-order array from ``t``; its declared size is checked before allocating."""
    if len(t.shape) > max_dims:  # before the shape becomes a Python tuple
        raise WireError(f"tensor has {len(t.shape)} dimensions, over the limit of {max_dims}")
    shape = tuple(t.shape)
    nbytes = _checked_nbytes(t.dtype, shape, max_bytes, max_dims)
    data = t.data
    if len(data) != nbytes:
        raise WireError(f"tensor {t.dtype}{list(shape)} needs {nbytes} bytes but carries {len(data)}")
    try:
        if t.dtype == "bool":  # any nonzero byte is True; never expose non-0/1 bool bytes
            return np.frombuffer(data, dtype=np.uint8).astype(np.bool_).reshape(shape)
        dtype = _DTYPES[t.dtype]
        return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=True)
    except ValueError as e:  # e.g. an empty shape whose dimensions overflow numpy's index type
        raise WireError(f"tensor {t.dtype}{list(shape)} cannot be built: {e}") from None


def _add_tensors(field: Any, params: Params) -> None:
    """Append each array of ``params`` to a repeated Tensor field."""
    for i, a in enumerate(params):
        try:
            _fill_tensor(field.add(), a)
        except WireError as e:
            raise WireError(f"array {i}: {e.message}") from None


def _decode_tensors(field: Any, limits: Limits) -> Params:
    """The arrays of a repeated Tensor field, checked against ``limits``."""
    if len(field) > limits.max_tensors:
        raise WireError(f"message holds {len(field)} tensors, over the limit of {limits.max_tensors}")
    out = []
    for i, t in enumerate(field):
        try:
            out.append(decode_tensor(t, limits.max_tensor_bytes, limits.max_dims))
        except WireError as e:
            raise WireError(f"tensor {i}: {e.message}") from None
    return out


# ---------------------------------------------------------------------------------------- codecs


@dataclass(frozen=True)
class Codec:
    """How one message kind becomes body bytes and back."""

    kind: str
    cls: type
    encode: Callable[[Any], bytes]
    decode: Callable[[bytes, Limits], Any]


_CODECS: dict[str, Codec] = {}
_KIND_OF: dict[type, str] = {}


def register(kind: str, cls: type, encode: Callable[[Any], bytes], decode: Callable[[bytes, Limits], Any]) -> None:
    """Make messages of class ``cls`` travel as envelopes of ``kind``.

    ``encode(message) -> bytes`` makes the body; ``decode(body, limits) -> message`` reads it back
    and must raise :class:`WireError` (or protobuf's ``DecodeError``) on bad input. If ``cls`` has
    ``client_id`` and ``round`` fields, they travel in the envelope: :func:`from_envelope` sets
    them on the decoded message, so ``decode`` may leave them 0. A kind or class registers once.
    """
    if not kind:
        raise ValueError("a message kind needs a non-empty name")
    if kind in _CODECS:
        raise ValueError(f"message kind {kind!r} is already registered")
    if cls in _KIND_OF:
        raise ValueError(f"{cls.__name__} is already registered as kind {_KIND_OF[cls]!r}")
    _CODECS[kind] = Codec(kind, cls, encode, decode)
    _KIND_OF[cls] = kind


def kinds() -> list[str]:
    """The registered message kinds."""
    return sorted(_CODECS)


def parse_message(cls: type[Message], data: bytes, limits: Limits, kind: str = "") -> Any:
    """Parse protobuf class ``cls`` from ``data`` safely: for codecs' ``decode`` functions.

    The wire bytes are first walked, without parsing, to count repeated elements and submessages
    against ``limits.max_elements``: a parser allocates tens of bytes for each (a 2-byte empty
    submessage costs upb ~60), so a small message could otherwise expand to gigabytes.
    A malformed message raises :class:`WireError`.
    """
    invalid = f"{kind or cls.__name__} body is not a valid {cls.__name__}"
    count = _count_elements(memoryview(data), cls.DESCRIPTOR, limits.max_elements, invalid)
    if count > limits.max_elements:
        raise WireError(f"{kind or cls.__name__} body holds more than max_elements={limits.max_elements} "
                        "repeated elements or submessages")
    msg = cls()
    try:
        msg.ParseFromString(data)
    except DecodeError as e:
        raise WireError(f"{invalid}: {e}") from None
    return msg


_MAX_DEPTH = 64  # upb refuses deeper nesting (its limit is 100) anyway
_UNPACKABLE = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE)
_FIXED_WIDTH = {FieldDescriptor.TYPE_DOUBLE: 8, FieldDescriptor.TYPE_FIXED64: 8, FieldDescriptor.TYPE_SFIXED64: 8,
                FieldDescriptor.TYPE_FLOAT: 4, FieldDescriptor.TYPE_FIXED32: 4, FieldDescriptor.TYPE_SFIXED32: 4}


def _read_varint(buf: memoryview, pos: int, end: int, invalid: str) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it."""
    value = shift = 0
    while pos < end and shift < 64:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise WireError(f"{invalid}: a truncated or overlong varint")


def _count_elements(buf: memoryview, descriptor: Descriptor, budget: int, invalid: str, depth: int = 0) -> int:
    """Walk protobuf wire bytes and count elements, stopping once the count passes ``budget``.

    An element is a submessage or one entry of a repeated field (packed entries counted by width,
    varints at one per byte: an upper bound). Unknown fields are skipped: a parser keeps them as bytes.
    Malformed framing, or nesting deeper than the parser allows, raises :class:`WireError`.
    """
    if depth > _MAX_DEPTH:
        raise WireError(f"{invalid}: messages nested more than {_MAX_DEPTH} deep")
    count, pos, end = 0, 0, len(buf)
    while pos < end and count <= budget:
        key, pos = _read_varint(buf, pos, end, invalid)
        wire_type, start = key & 7, pos
        if wire_type == 0:
            _, pos = _read_varint(buf, pos, end, invalid)
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        elif wire_type == 2:
            size, start = _read_varint(buf, pos, end, invalid)
            pos = start + size
        else:
            raise WireError(f"{invalid}: unsupported wire type {wire_type}")
        if pos > end:
            raise WireError(f"{invalid}: a field runs past its end")
        field = descriptor.fields_by_number.get(key >> 3)
        if field is None:
            continue
        if field.message_type is not None and wire_type == 2:
            count += 1 + _count_elements(buf[start:pos], field.message_type, budget - count, invalid, depth + 1)
        elif field.is_repeated:
            packed = wire_type == 2 and field.type not in _UNPACKABLE
            count += (pos - start) // _FIXED_WIDTH.get(field.type, 1) if packed else 1
    return count


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise WireError(message)


def _error_msg(e: ErrorReply) -> pb.ErrorMsg:
    return pb.ErrorMsg(code=e.code, reason=e.reason)


def _error_reply(e: pb.ErrorMsg) -> ErrorReply:
    _require(bool(e.code), "error reply has an empty code")
    return ErrorReply(e.code, e.reason)


def _reply_result(kind: str, result: Any, error: ErrorReply | None, name: str) -> str:
    """Which oneof branch a reply encodes ("error" or ``name``); exactly one must be set."""
    _require(result is None or error is None, f"{kind} has both {name} and error set")
    _require(result is not None or error is not None, f"{kind} has neither {name} nor error set")
    return name if result is not None else "error"


def _train_config_msg(c: TrainConfig) -> pb.TrainConfigMsg:
    _require(c.max_steps is None or c.max_steps >= 1,
             f"max_steps must be None or >= 1, got {c.max_steps} (0 means no cap on the wire)")
    return pb.TrainConfigMsg(lr=c.lr, batch_size=c.batch_size, local_epochs=c.local_epochs,
                             max_steps=c.max_steps or 0, mu=c.mu, seed=c.seed, round=c.round, stage=dict(c.stage))


def _train_config(m: pb.TrainConfigMsg) -> TrainConfig:
    _require(m.batch_size >= 1, f"train config batch_size must be >= 1, got {m.batch_size}")
    _require(m.local_epochs >= 0, f"train config local_epochs must be >= 0, got {m.local_epochs}")
    _require(m.max_steps >= 0, f"train config max_steps must be >= 0, got {m.max_steps}")
    _require(math.isfinite(m.lr) and math.isfinite(m.mu), f"train config lr={m.lr}, mu={m.mu} must be finite")
    _require(all(math.isfinite(v) for v in m.stage.values()), "train config stage values must be finite")
    return TrainConfig(lr=m.lr, batch_size=m.batch_size, local_epochs=m.local_epochs,
                       max_steps=m.max_steps or None, mu=m.mu, seed=m.seed, round=m.round,
                       stage=tuple(sorted(m.stage.items())))


_MODEL_BYTES: tuple[Any, bytes] = (None, b"")  # the model last encoded for a train request, and its tensors' bytes


def _encode_train_request(m: TrainRequest) -> bytes:
    """The model as tensors, or, compressed for the downlink, only its payload (the client decodes it).

    The tensors of a model are encoded once for all the tasks that send it (an asynchronous server sends
    one version to many clients): protobuf reads a message's serialized fields appended to another's as one.
    """
    global _MODEL_BYTES
    head = pb.TrainRequestBody(config=_train_config_msg(m.config), payload=m.payload).SerializeToString()
    if m.payload:
        return head
    params, model = _MODEL_BYTES  # one read: another thread may replace it meanwhile
    if params is not m.params:
        body = pb.TrainRequestBody()
        _add_tensors(body.params, m.params)
        params, model = m.params, body.SerializeToString()
        _MODEL_BYTES = (params, model)
    return head + model


def _decode_train_request(data: bytes, limits: Limits) -> TrainRequest:
    body = parse_message(pb.TrainRequestBody, data, limits, "train_request")
    del data  # free the body bytes before the tensors are copied out
    _require(body.HasField("config"), "train_request has no config")
    _require(not (body.payload and len(body.params)), "train_request carries both a compressed model and tensors")
    return TrainRequest(0, 0, _decode_tensors(body.params, limits), _train_config(body.config), body.payload)


def _encode_train_reply(m: TrainReply) -> bytes:
    body = pb.TrainReplyBody()
    if _reply_result("train_reply", m.update, m.error, "update") == "error":
        body.error.CopyFrom(_error_msg(m.error))
        return body.SerializeToString()
    u = m.update
    _require(u.kind in UPDATE_KINDS, f"update kind must be one of {', '.join(UPDATE_KINDS)}, got {u.kind!r}")
    body.update.weight = u.weight
    body.update.kind = u.kind
    body.update.metrics.update({str(k): float(v) for k, v in u.metrics.items()})
    _add_tensors(body.update.values, u.values)
    body.update.payload = u.payload
    return body.SerializeToString()


def _decode_train_reply(data: bytes, limits: Limits) -> TrainReply:
    body = parse_message(pb.TrainReplyBody, data, limits, "train_reply")
    del data  # free the body bytes before the tensors are copied out
    which = body.WhichOneof("result")
    _require(which is not None, "train_reply has neither update nor error")
    if which == "error":
        return TrainReply(0, 0, error=_error_reply(body.error))
    u = body.update
    _require(u.kind in UPDATE_KINDS, f"update kind must be one of {', '.join(UPDATE_KINDS)}, got {u.kind!r}")
    _require((u.kind in PAYLOAD_KINDS) == bool(u.payload) and not (u.payload and len(u.values)),
             "an update carries either tensors (delta, params) or a payload (encoded, masked)")
    update = Update(_decode_tensors(u.values, limits), u.weight, u.kind, dict(u.metrics), u.payload)
    return TrainReply(0, 0, update=update)


def _encode_evaluate_request(m: EvaluateRequest) -> bytes:
    body = pb.EvaluateRequestBody(batch_size=m.config.batch_size)
    _add_tensors(body.params, m.params)
    return body.SerializeToString()


def _decode_evaluate_request(data: bytes, limits: Limits) -> EvaluateRequest:
    body = parse_message(pb.EvaluateRequestBody, data, limits, "evaluate_request")
    del data  # free the body bytes before the tensors are copied out
    _require(body.batch_size >= 1, f"evaluate_request batch_size must be >= 1, got {body.batch_size}")
    return EvaluateRequest(0, 0, _decode_tensors(body.params, limits), EvaluateConfig(batch_size=body.batch_size))


def _encode_evaluate_reply(m: EvaluateReply) -> bytes:
    body = pb.EvaluateReplyBody()
    if _reply_result("evaluate_reply", m.evaluation, m.error, "evaluation") == "error":
        body.error.CopyFrom(_error_msg(m.error))
    else:
        e = m.evaluation
        body.evaluation.CopyFrom(pb.EvaluationMsg(loss=e.loss, accuracy=e.accuracy, num_examples=e.num_examples))
    return body.SerializeToString()


def _decode_evaluate_reply(data: bytes, limits: Limits) -> EvaluateReply:
    body = parse_message(pb.EvaluateReplyBody, data, limits, "evaluate_reply")
    which = body.WhichOneof("result")
    _require(which is not None, "evaluate_reply has neither evaluation nor error")
    if which == "error":
        return EvaluateReply(0, 0, error=_error_reply(body.error))
    e = body.evaluation
    _require(e.num_examples >= 0, f"evaluation num_examples must be >= 0, got {e.num_examples}")
    return EvaluateReply(0, 0, evaluation=Evaluation(e.loss, e.accuracy, e.num_examples))


def _check_step(kind: str, body: Any) -> dict[str, bytes]:
    _require(0 < len(body.step) <= MAX_NAME, f"{kind} step name must have 1 to {MAX_NAME} characters")
    _require(all(0 < len(k) <= MAX_NAME for k in body.values),
             f"{kind} value names must have 1 to {MAX_NAME} characters")
    return dict(body.values)


def _encode_step_request(m: StepRequest) -> bytes:
    return pb.StepBody(step=m.step, values=m.values).SerializeToString()


def _decode_step_request(data: bytes, limits: Limits) -> StepRequest:
    body = parse_message(pb.StepBody, data, limits, "step_request")
    _require(not body.HasField("error"), "step_request carries an error")
    return StepRequest(0, 0, body.step, _check_step("step_request", body))


def _encode_step_reply(m: StepReply) -> bytes:
    body = pb.StepBody(step=m.step)
    if m.error is not None:
        _require(not m.values, "step_reply has both values and an error")
        body.error.CopyFrom(_error_msg(m.error))
    else:
        body.values.update(m.values)
    return body.SerializeToString()


def _decode_step_reply(data: bytes, limits: Limits) -> StepReply:
    body = parse_message(pb.StepBody, data, limits, "step_reply")
    values = _check_step("step_reply", body)
    if body.HasField("error"):
        _require(not values, "step_reply has both values and an error")
        return StepReply(0, 0, body.step, error=_error_reply(body.error))
    return StepReply(0, 0, body.step, values)


register("train_request", TrainRequest, _encode_train_request, _decode_train_request)
register("train_reply", TrainReply, _encode_train_reply, _decode_train_reply)
register("evaluate_request", EvaluateRequest, _encode_evaluate_request, _decode_evaluate_request)
register("evaluate_reply", EvaluateReply, _encode_evaluate_reply, _decode_evaluate_reply)
register("step_request", StepRequest, _encode_step_request, _decode_step_request)
register("step_reply", StepReply, _encode_step_reply, _decode_step_reply)


# ---------------------------------------------------------------------------------------- encodings


@dataclass(frozen=True)
class Encoding:
    """How a body's bytes become an envelope's payload and back (``decode`` honours the limits)."""

    name: str
    encode: Callable[[bytes], bytes]
    decode: Callable[[bytes, Limits], bytes]


_ENCODINGS: dict[str, Encoding] = {}


def register_encoding(name: str, encode: Callable[[bytes], bytes], decode: Callable[[bytes, Limits], bytes]) -> None:
    """Add a payload encoding. ``decode(payload, limits)`` must refuse output over ``max_message_bytes``."""
    if not name:
        raise ValueError("an encoding needs a non-empty name")
    if name in _ENCODINGS:
        raise ValueError(f"encoding {name!r} is already registered")
    _ENCODINGS[name] = Encoding(name, encode, decode)


def encodings() -> list[str]:
    """The registered payload encodings."""
    return sorted(_ENCODINGS)


def _proto_decode(payload: bytes, limits: Limits) -> bytes:
    return payload  # from_envelope has already checked its size


def _zlib_encode(body: bytes) -> bytes:
    return zlib.compress(body, ZLIB_LEVEL)


def _zlib_decode(payload: bytes, limits: Limits) -> bytes:
    """Inflate at most ``max_message_bytes`` (+1 to detect overflow), so a zip bomb is refused."""
    limit = limits.max_message_bytes
    d = zlib.decompressobj()
    try:
        out = d.decompress(payload, limit + 1)
    except zlib.error as e:
        raise WireError(f"zlib payload is corrupt: {e}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise WireError(f"zlib payload inflates to more than max_message_bytes={limit}; refused")
    _require(d.eof, "zlib payload is truncated")
    _require(not d.unused_data, f"zlib payload has {len(d.unused_data)} stray bytes after its end")
    return out


register_encoding("proto", lambda body: body, _proto_decode)
register_encoding("zlib+proto", _zlib_encode, _zlib_decode)


# ---------------------------------------------------------------------------------------- envelopes


def to_envelope(message: Any, task_id: str = "", encoding: str = "proto") -> pb.Envelope:
    """Wrap a registered message in an :class:`Envelope` (client_id and round taken from it, if it has them)."""
    kind = _KIND_OF.get(type(message))
    if kind is None:
        raise WireError(f"no message kind is registered for {type(message).__name__}; known: {', '.join(kinds())}")
    enc = _ENCODINGS.get(encoding)
    if enc is None:
        raise WireError(f"unknown encoding {encoding!r}; known: {', '.join(encodings())}")
    try:
        payload = enc.encode(_CODECS[kind].encode(message))
        return pb.Envelope(kind=kind, task_id=task_id, client_id=getattr(message, "client_id", 0),
                           round=getattr(message, "round", 0), encoding=encoding, payload=payload)
    except (TypeError, ValueError, OverflowError) as e:  # e.g. a negative round, a str where a number goes
        raise WireError(f"cannot encode {kind}: {e}") from None


def from_envelope(env: pb.Envelope, limits: Limits = Limits()) -> Any:
    """The typed message inside ``env`` (an empty ``encoding`` means ``"proto"``)."""
    codec = _CODECS.get(env.kind)
    if codec is None:
        raise WireError(f"unknown message kind {env.kind!r}; known: {', '.join(kinds())}")
    enc = _ENCODINGS.get(env.encoding or "proto")
    if enc is None:
        raise WireError(f"unknown encoding {env.encoding!r} of {env.kind}; known: {', '.join(encodings())}")
    try:
        # Nested calls, no local names: the body's only reference moves into codec.decode, which
        # can drop it (``del data``) once parsed, so a large payload is not held twice.
        message = codec.decode(enc.decode(_checked_payload(env, limits), limits), limits)
    except DecodeError as e:
        raise WireError(f"{env.kind} body is malformed: {e}") from None
    except (TypeError, ValueError, OverflowError) as e:
        raise WireError(f"{env.kind} body has a bad value: {e}") from None
    return _with_address(message, env)


def _checked_payload(env: pb.Envelope, limits: Limits) -> bytes:
    payload = env.payload
    _require(len(payload) <= limits.max_message_bytes,
             f"{env.kind} payload is {len(payload)} bytes, over max_message_bytes={limits.max_message_bytes}")
    return payload


_BODY_SIZE: list[Any] = [None, None, None, 0]  # the last train request sized: params, payload, config, body bytes


def _varint_size(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _field_size(n: int) -> int:
    """Bytes of a length-delimited field (tag below 16) holding ``n`` bytes."""
    return 1 + _varint_size(n) + n


@functools.cache
def _tensor_head_size(dtype: np.dtype, shape: tuple[int, ...]) -> int:
    return pb.Tensor(dtype=dtype.name, shape=shape).ByteSize()


def _update_size(u: Update) -> int:
    """Bytes of an ``UpdateMsg``: its small fields encoded for real, each array's data added as protobuf adds it."""
    size = 9 if struct.pack("<d", u.weight) != bytes(8) else 0  # a double is left out when it is +0.0
    size += (_field_size(len(u.kind.encode())) if u.kind else 0) + (_field_size(len(u.payload)) if u.payload else 0)
    for key in {str(k) for k in u.metrics}:  # a map entry always holds its key and its double
        size += _field_size(_field_size(len(key.encode())) + 9)
    for a in u.values:
        t = _tensor_head_size(a.dtype, a.shape) + (_field_size(a.nbytes) if a.nbytes else 0)
        size += _field_size(t)
    return size


def message_size(message: Any) -> int:
    """Bytes of ``message``'s envelope as the gRPC deployment encodes it (before chunking): what it costs on the wire.

    Computed without copying the arrays: a round's train requests share their model, so its body is
    serialized once per round; an update's arrays add their bytes as protobuf adds them. The other
    fields are encoded for real (tests compare it with the encoded envelope).
    """
    if isinstance(message, TrainRequest):
        memo = _BODY_SIZE
        if not (memo[0] is message.params and memo[1] is message.payload and memo[2] == message.config):
            memo[:] = [message.params, message.payload, message.config, len(_encode_train_request(message))]
        kind, n = "train_request", memo[3]
    elif (isinstance(message, TrainReply) and message.update is not None and message.error is None
          and message.update.kind in UPDATE_KINDS):
        kind, n = "train_reply", _field_size(_update_size(message.update))
    else:
        return to_envelope(message).ByteSize()
    cid, rnd = message.client_id, message.round  # an int64 and a uint64, left out when 0
    size = _field_size(len(kind)) + _field_size(len("proto")) + (_field_size(n) if n else 0)
    size += (1 + (10 if cid < 0 else _varint_size(cid)) if cid else 0) + (1 + _varint_size(rnd) if rnd else 0)
    return size


def _with_address(message: Any, env: pb.Envelope) -> Any:
    """Set ``client_id``/``round`` from the envelope on a dataclass message that has them."""
    if not dataclasses.is_dataclass(message):
        return message
    names = {f.name for f in dataclasses.fields(message)}
    if {"client_id", "round"} <= names:
        return dataclasses.replace(message, client_id=env.client_id, round=env.round)
    return message


# ---------------------------------------------------------------------------------------- chunks


def chunk_size(chunk: pb.Chunk) -> int:
    """Bytes of ``chunk`` serialized, without serializing its data (``ByteSize`` would)."""
    n = len(chunk.data)
    return pb.Chunk(transfer_id=chunk.transfer_id, total_size=chunk.total_size, index=chunk.index,
                    last=chunk.last).ByteSize() + (_field_size(n) if n else 0)


def to_chunks(env: pb.Envelope, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[pb.Chunk]:
    """Serialize ``env`` once and yield it as consecutive :class:`Chunk` slices (the final one ``last``)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    data = env.SerializeToString()
    del env  # the generator outlives this line: hold only the serialized bytes
    return slices(data, chunk_bytes)


def slices(data: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[pb.Chunk]:
    """A serialized envelope as consecutive :class:`Chunk` slices, each made when it is asked for."""
    total = len(data)
    transfer_id = secrets.token_hex(16)
    count = max(1, -(-total // chunk_bytes))
    for i in range(count):
        chunk = pb.Chunk(transfer_id=transfer_id, total_size=total, index=i,
                         data=data[i * chunk_bytes : (i + 1) * chunk_bytes], last=i == count - 1)
        if i == count - 1:
            del data  # a reader may stop at the last chunk and leave this generator alive: free the copy now
        yield chunk


class Assembler:
    """Reassembles the chunks of one transfer, its buffer growing only as data arrives.

    The first chunk's ``total_size`` is checked against ``limits.max_message_bytes``; then every
    chunk must have the same transfer_id and total_size and the next index, and carry at least
    ``limits.min_chunk_bytes`` (or the rest of the transfer) unless it is the last, so a transfer
    has at most ``total_size / min_chunk_bytes + 1`` chunks. :meth:`add` returns True at the chunk
    marked ``last``, which must complete exactly ``total_size`` bytes.
    """

    def __init__(self, first: pb.Chunk, limits: Limits = Limits()):
        self.transfer_id, self.total = first.transfer_id, first.total_size
        _require(self.total <= limits.max_message_bytes,
                 f"transfer {self.transfer_id!r} declares {self.total} bytes, over max_message_bytes="
                 f"{limits.max_message_bytes}")
        self.min_chunk = limits.min_chunk_bytes
        self.buf = bytearray()
        self.index = 0

    def add(self, chunk: pb.Chunk) -> bool:
        """Check ``chunk`` and append its data; True when it was the last one."""
        tid, got = self.transfer_id, len(self.buf)
        _require(chunk.transfer_id == tid,
                 f"chunk {chunk.index} belongs to transfer {chunk.transfer_id!r}, not {tid!r}")
        _require(chunk.index == self.index, f"chunk {chunk.index} of transfer {tid!r} arrived where chunk {self.index} "
                                            "was expected (out of order or missing)")
        _require(chunk.total_size == self.total,
                 f"chunk {self.index} of transfer {tid!r} declares total_size {chunk.total_size}, not {self.total}")
        data = chunk.data
        _require(got + len(data) <= self.total, f"chunks of transfer {tid!r} carry more than the declared {self.total} "
                                                "bytes")
        if not chunk.last:
            least = max(1, min(self.min_chunk, self.total - got))
            _require(len(data) >= least, f"chunk {self.index} of transfer {tid!r} carries {len(data)} bytes; every "
                                         f"chunk but the last must carry at least {least}")
        self.buf += data
        self.index += 1
        if chunk.last:
            _require(len(self.buf) == self.total, f"transfer {tid!r} carried {len(self.buf)} bytes but declared "
                                                  f"{self.total}")
        return chunk.last

    def envelope(self) -> pb.Envelope:
        """The :class:`Envelope` the completed transfer holds (its buffer is released)."""
        env = pb.Envelope()
        try:
            env.ParseFromString(self.buf)
        except DecodeError as e:
            raise WireError(f"transfer {self.transfer_id!r} is not a valid Envelope: {e}") from None
        finally:
            self.buf = bytearray()
        return env


def from_chunks(chunks: Iterable[pb.Chunk], limits: Limits = Limits()) -> pb.Envelope:
    """Reassemble the :class:`Envelope` sent by :func:`to_chunks` (the rules are :class:`Assembler`'s).

    Reading stops at the chunk marked ``last``, so one stream may carry transfers back to back.
    """
    it = iter(chunks)
    chunk = next(it, None)
    _require(chunk is not None, "empty chunk stream: no envelope was sent")
    assembler = Assembler(chunk, limits)
    while not assembler.add(chunk):
        chunk = next(it, None)
        _require(chunk is not None, f"chunk stream of transfer {assembler.transfer_id!r} ended without a last chunk "
                                    f"({len(assembler.buf)} of {assembler.total} bytes)")
    return assembler.envelope()
