"""Simulated attackers: a fraction of the clients tamper with what they send (or train on flipped labels).

The attack is the last client half of every attacker (after any honest client stage, which an
attacker would skip anyway). Attackers are drawn once per run from the seed: ``RandomState([seed,
ATTACKER_STREAM]).choice(num_clients, round(fraction * num_clients))``. Kinds:

* ``sign_flip``: the update, negated and multiplied by ``strength``;
* ``scale``: model replacement through the values (Bagdasaryan et al. 2020, "How To Backdoor
  Federated Learning"): the attacker trains on flipped labels (its poisoned model; the paper's
  backdoor) and multiplies its update by ``strength`` (the paper's boost ``n / eta``), so that
  the mean becomes its model;
* ``weight``: model replacement through the weight: the same poisoned training, sent unscaled with
  a claim of ``10^12`` examples, so that an examples-weighted mean becomes its model;
* ``gaussian``: Gaussian noise of std ``strength`` instead of the update;
* ``label_flip``: honest training on labels ``C - 1 - y``, no change to the update.

The attackers of the poisoned kinds (:data:`POISONED`) train on labels ``C - 1 - y``
(``build.py`` flips their training data).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedloom.errors import ConfigError
from fedloom.messages import Update
from fedloom.params import subtract
from fedloom.seeding import keyed_rng
from fedloom.stages.base import ClientContext, Stage, scaled

ATTACKS = ("sign_flip", "scale", "gaussian", "weight", "label_flip")
POISONED = ("label_flip", "scale", "weight")  # the attackers train on flipped labels
# The attackers' own random stream. Round r's uniform selection draws from (seed, r): a small tag here
# would make that round select exactly the attackers.
ATTACKER_STREAM = 0x41545441
HUGE_CLAIM = 1e12


def attackers(fraction: float, num_clients: int, seed: int) -> frozenset[int]:
    """The attacking clients of a run."""
    count = int(round(fraction * num_clients))
    return frozenset(int(c) for c in keyed_rng(seed, ATTACKER_STREAM).choice(num_clients, count, replace=False))


@dataclass(frozen=True, repr=False)
class Attack(Stage):
    """A client half that only attackers run (see the module docstring)."""

    kind: str = "sign_flip"
    clients: frozenset[int] = frozenset()
    strength: float = 10.0
    name = "attack"

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ConfigError("attack.kind", f"must be one of {', '.join(ATTACKS)}; got {self.kind!r}")

    def client(self, update: Update, ctx: ClientContext) -> Update:
        if ctx.client_id not in self.clients or self.kind == "label_flip":
            return update
        delta = update.values if update.kind == "delta" else subtract(update.values, ctx.sent)
        weight = update.weight
        if self.kind == "sign_flip":
            delta = scaled(delta, -self.strength)
        elif self.kind == "scale":
            delta = scaled(delta, self.strength)
        elif self.kind == "gaussian":
            delta = [ctx.noise.normal(a.shape, self.strength, (ctx.round, ctx.client_id, 13, i)).astype(a.dtype)
                     for i, a in enumerate(delta)]
        else:
            weight = HUGE_CLAIM
        return Update([np.asarray(a) for a in delta], weight, "delta", dict(update.metrics))
