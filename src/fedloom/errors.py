"""The one exception hierarchy of fedloom.

Local errors raise a subclass of :class:`FedloomError`. Each carries the client id and the
stage it happened in, where known, so a failure in a run of thousands of clients says where
it came from. Errors that cross a transport become :class:`fedloom.messages.ErrorReply`
values (a code and a reason), never exceptions leaking through it.
"""

from __future__ import annotations


def reason_code(reason: str) -> str:
    """The code a refusal's reason starts with (``client_failed: ValueError: ...``), or ``other``."""
    head = reason.split(":", 1)[0]
    return head if head.isidentifier() and head.islower() else "other"


class FedloomError(Exception):
    """Base class of every error fedloom raises on purpose."""

    code = "error"

    def __init__(self, message: str, *, client_id: int | None = None, stage: str | None = None):
        self.message = message
        self.client_id = client_id
        self.stage = stage
        where = []
        if client_id is not None:
            where.append(f"client {client_id}")
        if stage is not None:
            where.append(f"stage {stage}")
        prefix = f"[{', '.join(where)}] " if where else ""
        super().__init__(prefix + message)


class ConfigError(FedloomError):
    """A configuration value is missing, of the wrong type or out of range.

    ``key`` names the offending setting in dotted form (``client.lr``).
    """

    code = "bad_config"

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")
        self.stage = "config"


class DataError(FedloomError):
    """A data file or array cannot be read or has the wrong form."""

    code = "bad_data"


class ShapeError(FedloomError):
    """Model parameters do not match the expected shapes or dtypes."""

    code = "bad_shape"


class InvalidUpdateError(FedloomError):
    """A client update is unusable (wrong shape or dtype, NaN/Inf, non-positive weight)."""

    code = "invalid_update"


class InvalidReplyError(FedloomError):
    """A reply does not answer its request: the wrong message kind, client or round, or no result."""

    code = "invalid_reply"


class ClientWorkError(FedloomError):
    """The user's client work raised while training or evaluating."""

    code = "client_failed"


class RoundError(FedloomError):
    """A round cannot be completed (for example: no valid update arrived)."""

    code = "round_failed"


class WorkerError(FedloomError):
    """A simulation worker process or actor could not start (its client spec failed, or it died loading)."""

    code = "worker_failed"


class ClientRefused(FedloomError):
    """The server refused this client: unknown or revoked token, or a certificate of another client."""

    code = "refused"


class CertError(FedloomError):
    """Certificates cannot be made or read (an existing CA, a bad name, a malformed PEM)."""

    code = "bad_cert"


class StateError(FedloomError):
    """The server state database or a checkpoint is unusable, or a call does not fit the recorded state."""

    code = "bad_state"


class WireError(FedloomError):
    """A message on the wire is malformed, of an unknown kind or encoding, or over a size limit."""

    code = "bad_message"
