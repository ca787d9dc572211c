"""Data keyed by client id: one client's train and test arrays, and the federation of them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedloom.errors import DataError


@dataclass(frozen=True)
class ClientDataset:
    """One client's local data. Arrays stay on the client; only their sizes are reported.

    ``x_*`` hold features (any shape, leading axis = samples); ``y_*`` hold integer labels,
    either one per sample or one per position for sequence targets.
    """

    client_id: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str = ""

    def __post_init__(self) -> None:
        if len(self.x_train) != len(self.y_train):
            raise DataError(f"{len(self.x_train)} train inputs but {len(self.y_train)} labels",
                            client_id=self.client_id)
        if len(self.x_test) != len(self.y_test):
            raise DataError(f"{len(self.x_test)} test inputs but {len(self.y_test)} labels",
                            client_id=self.client_id)

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    @property
    def num_test(self) -> int:
        return len(self.y_test)


@dataclass(frozen=True)
class FederatedDataset:
    """All clients of a federation, indexed by client id (0..n-1, the position in ``clients``).

    ``num_classes`` is the number of label values; ``vocab`` is set for character data.
    """

    name: str
    clients: list[ClientDataset]
    num_classes: int
    vocab: str | None = None
    info: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i, c in enumerate(self.clients):
            if c.client_id != i:
                raise DataError(f"client at position {i} has id {c.client_id}; ids must be 0..n-1")

    def __len__(self) -> int:
        return len(self.clients)

    def __getitem__(self, client_id: int) -> ClientDataset:
        return self.clients[client_id]

    @property
    def num_train(self) -> int:
        return sum(c.num_train for c in self.clients)

    @property
    def num_test(self) -> int:
        return sum(c.num_test for c in self.clients)

    def test_union(self) -> tuple[np.ndarray, np.ndarray]:
        """All clients' test splits concatenated in client order (for centralised evaluation)."""
        xs = [c.x_test for c in self.clients if c.num_test]
        ys = [c.y_test for c in self.clients if c.num_test]
        if not xs:
            raise DataError(f"dataset {self.name!r} has no test samples")
        return np.concatenate(xs), np.concatenate(ys)
