"""Transports move typed messages between server and clients and know nothing of learning."""

from fedloom.transport.inprocess import InProcessTransport

__all__ = ["InProcessTransport"]
