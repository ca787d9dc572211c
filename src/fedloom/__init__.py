"""fedloom: federated learning that simulates fast and deploys for real.

Clients train on their own data (:class:`fedloom.client.ClientWork`); the server selects
clients, aggregates their updates and applies a server optimizer
(:class:`fedloom.server.SyncServer` with a :class:`fedloom.server.Strategy`).
"""

from fedloom.messages import EvaluateConfig, Evaluation, TrainConfig, Update
from fedloom.params import Params, ParamSpec, flatten, unflatten

__version__ = "0.1.0"

__all__ = ["EvaluateConfig", "Evaluation", "ParamSpec", "Params", "TrainConfig", "Update", "flatten", "unflatten"]
