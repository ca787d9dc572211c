"""Server side: round logic (no I/O), client selection and server optimizers."""

from fedloom.server.adaptive import OortSelector, PowerOfChoiceSelector
from fedloom.server.optimizers import OPTIMIZERS, ServerOptimizer, adagrad, adam, momentum, sgd, yogi
from fedloom.server.selection import ClientFeedback, ClientSelector, PoissonSelector, UniformSelector
from fedloom.server.strategy import Strategy
from fedloom.server.sync import FederatedEvaluation, RoundResult, ServerState, SyncServer

__all__ = [
    "OPTIMIZERS", "ClientFeedback", "ClientSelector", "FederatedEvaluation", "OortSelector", "PowerOfChoiceSelector",
    "PoissonSelector", "RoundResult", "ServerOptimizer", "ServerState", "Strategy", "SyncServer", "UniformSelector",
    "adagrad", "adam", "momentum", "sgd", "yogi",
]
