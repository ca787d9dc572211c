"""Aggregation: reducers (many updates to one)."""

from fedloom.aggregation.reducers import Reducer, weighted_mean

__all__ = ["Reducer", "weighted_mean"]
