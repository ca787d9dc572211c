# ruff: noqa
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TrainConfigMsg(_message.Message):
    __slots__ = ("lr", "batch_size", "local_epochs", "max_steps", "mu", "seed", "round", "stage")
    class StageEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LR_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MU_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    lr: float
    batch_size: int
    local_epochs: int
    max_steps: int
    mu: float
    seed: int
    round: int
    stage: _containers.ScalarMap[str, float]
    def __init__(self, lr: _Optional[float] = ..., batch_size: _Optional[int] = ..., local_epochs: _Optional[int] = ..., max_steps: _Optional[int] = ..., mu: _Optional[float] = ..., seed: _Optional[int] = ..., round: _Optional[int] = ..., stage: _Optional[_Mapping[str, float]] = ...) -> None: ...

class TrainRequestBody(_message.Message):
    __slots__ = ("params", "config", "payload")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    params: _containers.RepeatedCompositeFieldContainer[Tensor]
    config: TrainConfigMsg
    payload: bytes
    def __init__(self, params: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., config: _Optional[_Union[TrainConfigMsg, _Mapping]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class ErrorMsg(_message.Message):
    __slots__ = ("code", "reason")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    code: str
    reason: str
    def __init__(self, code: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class UpdateMsg(_message.Message):
    __slots__ = ("values", "weight", "kind", "metrics", "payload")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VALUES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[Tensor]
    weight: float
    kind: str
    metrics: _containers.ScalarMap[str, float]
    payload: bytes
    def __init__(self, values: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., weight: _Optional[float] = ..., kind: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class TrainReplyBody(_message.Message):
    __slots__ = ("update", "error")
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    update: UpdateMsg
    error: ErrorMsg
    def __init__(self, update: _Optional[_Union[UpdateMsg, _Mapping]] = ..., error: _Optional[_Union[ErrorMsg, _Mapping]] = ...) -> None: ...

class EvaluateRequestBody(_message.Message):
    __slots__ = ("params", "batch_size")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    params: _containers.RepeatedCompositeFieldContainer[Tensor]
    batch_size: int
    def __init__(self, params: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., batch_size: _Optional[int] = ...) -> None: ...

class EvaluationMsg(_message.Message):
    __slots__ = ("loss", "accuracy", "num_examples")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    loss: float
    accuracy: float
    num_examples: int
    def __init__(self, loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., num_examples: _Optional[int] = ...) -> None: ...

class EvaluateReplyBody(_message.Message):
    __slots__ = ("evaluation", "error")
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    evaluation: EvaluationMsg
    error: ErrorMsg
    def __init__(self, evaluation: _Optional[_Union[EvaluationMsg, _Mapping]] = ..., error: _Optional[_Union[ErrorMsg, _Mapping]] = ...) -> None: ...

class StepBody(_message.Message):
    __slots__ = ("step", "values", "error")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    step: str
    values: _containers.ScalarMap[str, bytes]
    error: ErrorMsg
    def __init__(self, step: _Optional[str] = ..., values: _Optional[_Mapping[str, bytes]] = ..., error: _Optional[_Union[ErrorMsg, _Mapping]] = ...) -> None: ...

class Envelope(_message.Message):
    __slots__ = ("kind", "task_id", "client_id", "round", "encoding", "payload")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    kind: str
    task_id: str
    client_id: int
    round: int
    encoding: str
    payload: bytes
    def __init__(self, kind: _Optional[str] = ..., task_id: _Optional[str] = ..., client_id: _Optional[int] = ..., round: _Optional[int] = ..., encoding: _Optional[str] = ..., payload: _Optional[bytes] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("transfer_id", "total_size", "index", "data", "last")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    total_size: int
    index: int
    data: bytes
    last: bool
    def __init__(self, transfer_id: _Optional[str] = ..., total_size: _Optional[int] = ..., index: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("client_name", "token")
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    client_name: str
    token: str
    def __init__(self, client_name: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("session", "client_id", "error", "heartbeat_s")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    session: str
    client_id: int
    error: ErrorMsg
    heartbeat_s: int
    def __init__(self, session: _Optional[str] = ..., client_id: _Optional[int] = ..., error: _Optional[_Union[ErrorMsg, _Mapping]] = ..., heartbeat_s: _Optional[int] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("session", "wait_s")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    session: str
    wait_s: int
    def __init__(self, session: _Optional[str] = ..., wait_s: _Optional[int] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("accepted", "error")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    error: ErrorMsg
    def __init__(self, accepted: _Optional[bool] = ..., error: _Optional[_Union[ErrorMsg, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: str
    def __init__(self, session: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("known", "error")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    known: bool
    error: ErrorMsg
    def __init__(self, known: _Optional[bool] = ..., error: _Optional[_Union[ErrorMsg, _Mapping]] = ...) -> None: ...
