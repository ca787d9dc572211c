"""Compressed updates and models: a run's codecs, error feedback, and the checks on what arrives.

:class:`Compression` is what the ``[compression]`` section builds. On the client, the last step of
the pipeline (after clipping, local noise or an attack) encodes the update's delta with the
uplink codec; with error feedback (Seide et al. 2014, "1-Bit Stochastic Gradient Descent and its
Application to Data-Parallel Distributed Training of Speech DNNs"; Karimireddy et al. 2019,
"Error Feedback Fixes SignSGD and other Gradient Compression Schemes") it first adds the
residual the client kept from its last round, and keeps ``sent + residual - decoded`` for the next
one, in the client's state. On the server, the first step (the door, before any stage sees the
update) decodes it, so clipping, the robust reducers and DP noise work on what the client sent.
The downlink codec, when set, encodes the broadcast model once per round; clients train from its
decoding and send their change from that.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from fedloom.compression.codecs import Codec, CodecError, parse
from fedloom.errors import InvalidUpdateError
from fedloom.messages import ClientState
from fedloom.params import Params, ParamSpec, flatten, unflatten

RESIDUAL = "error_feedback/residual"


def codec(spec: str, chunk: int = 1024) -> Codec | None:
    """The codec a config names (``"none"``: None), its scales per ``chunk`` values; ValueError saying the forms
    (or why ``chunk`` does not fit, e.g. rotation needs a power of two)."""
    if spec == "none":
        return None
    c = parse(spec)
    names = {f.name for f in fields(c)}  # type: ignore[arg-type]
    if "values" in names and c.values is not None:  # type: ignore[attr-defined]
        c = replace(c, values=replace(c.values, chunk=chunk))  # type: ignore[attr-defined, arg-type]
    if "chunk" in names:
        c = replace(c, chunk=chunk)  # type: ignore[arg-type]
    return c


@dataclass(frozen=True)
class Compression:
    """The uplink codec (updates), the downlink codec (the broadcast model), and error feedback on the uplink."""

    uplink: Codec | None = None
    downlink: Codec | None = None
    error_feedback: bool = False

    def encode_update(self, delta: Params, state: ClientState,
                      rng: np.random.Generator) -> tuple[bytes, ClientState, dict[str, float]]:
        """The payload of ``delta`` (plus the kept residual, with error feedback), the new state, measurements."""
        assert self.uplink is not None
        x = flatten(delta)
        residual = state.get(RESIDUAL)
        if self.error_feedback and residual is not None and residual.shape == x.shape:
            x += residual
        payload = self.uplink.encode(x, rng)
        metrics = {"payload_bytes": float(len(payload))}
        if self.error_feedback:
            left = x - self.uplink.decode(payload, x.size)
            state = {**state, RESIDUAL: left}
            metrics["residual_norm"] = float(np.linalg.norm(left))
        return payload, state, metrics

    def decode_update(self, payload: bytes, spec: ParamSpec, client_id: int) -> Params:
        """The delta a client's payload holds; a malformed payload is refused, saying what is wrong."""
        assert self.uplink is not None
        try:
            return unflatten(self.uplink.decode(payload, spec.num_elements), spec)
        except CodecError as exc:
            raise InvalidUpdateError(f"{self.uplink.name} payload: {exc.message}", client_id=client_id,
                                     stage="decode") from None

    def encode_model(self, params: Params, seed: int, version: int) -> bytes:
        """The broadcast model for the downlink: encoded once per model version, its rounding seeded by both."""
        assert self.downlink is not None
        return self.downlink.encode(flatten(params), np.random.default_rng([seed, version, 8]))

    def decode_model(self, payload: bytes, spec: ParamSpec) -> Params:
        """The model a compressed broadcast holds (a client raises on a malformed one; its reply says why)."""
        assert self.downlink is not None
        return unflatten(self.downlink.decode(payload, spec.num_elements), spec)


NO_COMPRESSION = Compression()


def compression(uplink: str = "none", downlink: str = "none", error_feedback: bool = False,
                chunk: int = 1024) -> Compression:
    """The ``[compression]`` section's codecs."""
    return Compression(codec(uplink, chunk), codec(downlink, chunk), error_feedback)
