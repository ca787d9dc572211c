"""A strategy: the pieces a server combines, each replaceable on its own."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedloom.aggregation.aggregator import Aggregator, chain
from fedloom.aggregation.reducers import weighted_mean
from fedloom.compression.updates import NO_COMPRESSION, Compression
from fedloom.messages import EvaluateConfig, TrainConfig
from fedloom.secagg.protocol import SecureAggregation
from fedloom.server.optimizers import ServerOptimizer, sgd
from fedloom.server.selection import ClientSelector, UniformSelector
from fedloom.stages.weighting import Weighting


@dataclass(frozen=True)
class Strategy:
    """Who to ask (``selector``, ``clients_per_round``), what they do (``train``), how their
    updates are combined (``aggregator``: stages and one reducer) and applied (``optimizer``).

    FedAvg is the default: uniform selection, weighted mean, server SGD with lr 1. FedProx is
    ``train.mu > 0``; FedAvgM/FedAdam/FedYogi/FedAdagrad swap ``optimizer``.
    ``min_updates`` is the number of valid updates a round needs to be applied;
    ``evaluate_clients`` clients (0 = none) run federated evaluation after each evaluated round.
    ``compression`` holds the codecs: updates are decoded at the door, the broadcast model encoded
    once per version (its rounding seeded by ``seed``). ``secure``: secure aggregation's settings
    (``secagg/``): the server then sees only the sum of a round's updates.
    """

    clients_per_round: int
    train: TrainConfig = field(default_factory=TrainConfig)
    selector: ClientSelector = field(default_factory=UniformSelector)
    aggregator: Aggregator = field(default_factory=lambda: chain(Weighting("examples"), weighted_mean))
    optimizer: ServerOptimizer = field(default_factory=sgd)
    min_updates: int = 1
    evaluate_clients: int = 0
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    compression: Compression = NO_COMPRESSION
    seed: int = 0
    secure: SecureAggregation | None = None
