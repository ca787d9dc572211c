"""FedProx's Synthetic(alpha, beta) (Li et al. 2020, "Federated Optimization in Heterogeneous Networks").

Each client ``k`` has its own softmax-regression model ``(W_k, b_k)`` centred on ``u_k`` and its own
feature mean ``v_k`` centred on ``B_k``; ``alpha`` controls how much the models differ between
clients and ``beta`` how much the features do.
"""

from __future__ import annotations

import numpy as np

from fedloom.data.dataset import FederatedDataset
from fedloom.data.partition import split_client
from fedloom.errors import DataError


def synthetic_arrays(alpha: float = 1.0, beta: float = 1.0, num_clients: int = 1000, dim: int = 60,
                     num_classes: int = 10, seed: int = 0,
                     max_samples: int = 1000) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every client's ``(x float32 (n_k, dim), y int64 (n_k,))`` for Synthetic(alpha, beta).

    With ``rng = RandomState(seed)``, drawn in this order: sizes
    ``n = minimum(lognormal(4, 2, K).astype(int) + 50, max_samples)``; ``u = normal(0, alpha, K)``;
    ``B = normal(0, beta, K)``; for each k ``v_k = normal(B_k, 1, dim)``; then for each k
    ``W_k = normal(u_k, 1, (C, dim))``, ``b_k = normal(u_k, 1, C)``,
    ``x = normal(v_k, sqrt(Sigma), (n_k, dim))`` with ``Sigma_j = j ** -1.2`` (j = 1..dim), and
    ``y = argmax(x @ W_k.T + b_k)`` computed in float64. As in the FedProx authors' generator,
    ``alpha`` and ``beta`` are used as standard deviations (not variances).
    """
    if num_clients < 1 or dim < 1 or num_classes < 2 or max_samples < 1:
        raise DataError(f"need num_clients >= 1, dim >= 1, num_classes >= 2 and max_samples >= 1; got "
                        f"{num_clients}, {dim}, {num_classes}, {max_samples}")
    if alpha < 0 or beta < 0:
        raise DataError(f"alpha and beta are standard deviations and must be >= 0; got {alpha}, {beta}")
    rng = np.random.RandomState(seed)
    sizes = np.minimum(rng.lognormal(4, 2, num_clients).astype(int) + 50, max_samples)
    u = rng.normal(0, alpha, num_clients)
    b_mean = rng.normal(0, beta, num_clients)
    v = [rng.normal(b_mean[k], 1, dim) for k in range(num_clients)]
    std = np.sqrt(np.arange(1, dim + 1, dtype=np.float64) ** -1.2)
    out = []
    for k in range(num_clients):
        w = rng.normal(u[k], 1, (num_classes, dim))
        b = rng.normal(u[k], 1, num_classes)
        x = rng.normal(v[k], std, (int(sizes[k]), dim))
        y = np.argmax(x @ w.T + b, axis=1).astype(np.int64)
        out.append((x.astype(np.float32), y))
    return out


def synthetic(alpha: float = 1.0, beta: float = 1.0, num_clients: int = 1000, dim: int = 60, num_classes: int = 10,
              seed: int = 0, train_fraction: float = 0.8, max_samples: int = 1000) -> FederatedDataset:
    """Synthetic(alpha, beta) as a federation: client ``k``'s first ``int(train_fraction * n_k)`` samples train.

    See :func:`synthetic_arrays` for the generator; ``alpha`` and ``beta`` are standard deviations,
    as in the FedProx authors' code. ``synthetic(1, 1)`` with the defaults is benchmark W-A's data.
    """
    if not 0.0 < train_fraction <= 1.0:
        raise DataError(f"train_fraction must be in (0, 1], got {train_fraction}")
    arrays = synthetic_arrays(alpha, beta, num_clients, dim, num_classes, seed, max_samples)
    clients = [split_client(k, x, y, train_fraction) for k, (x, y) in enumerate(arrays)]
    info = {"alpha": alpha, "beta": beta, "seed": seed}
    return FederatedDataset("synthetic", clients, num_classes, info=info)
