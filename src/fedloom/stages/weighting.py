"""How much each update counts in the mean: explicit, because the count a client reports is its own claim."""

from __future__ import annotations

from dataclasses import dataclass, replace

from fedloom.errors import ConfigError
from fedloom.stages.base import Context, Contribution, Stage, State

WEIGHTINGS = ("examples", "uniform", "capped")


@dataclass(frozen=True, repr=False)
class Weighting(Stage):
    """``examples``: the examples the client reports (FedAvg, McMahan et al. 2017); ``uniform``: 1 each;
    ``capped``: the reported examples, at most ``cap`` (a client's claim can outweigh at most ``cap``
    honest examples)."""

    mode: str = "examples"
    cap: float = 0.0
    name = "weighting"

    def __post_init__(self) -> None:
        if self.mode not in WEIGHTINGS:
            raise ConfigError("aggregation.weighting", f"must be one of {', '.join(WEIGHTINGS)}; got {self.mode!r}")
        if self.mode == "capped" and not self.cap > 0:
            raise ConfigError("aggregation.max_weight", "capped weighting needs a cap > 0")

    def update(self, c: Contribution, state: State, ctx: Context) -> Contribution:
        weight = {"examples": c.examples, "uniform": 1.0, "capped": min(c.examples, self.cap)}[self.mode]
        return replace(c, weight=float(weight))


def weighting(mode: str = "examples", cap: float = 0.0) -> Weighting:
    return Weighting(mode, cap)
