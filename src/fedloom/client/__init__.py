"""Client side: the :class:`ClientWork` interface and the PyTorch helper that implements it."""

from fedloom.client.torch_work import TorchClientWork, evaluate_arrays
from fedloom.client.work import ClientWork, handle

__all__ = ["ClientWork", "TorchClientWork", "evaluate_arrays", "handle"]
