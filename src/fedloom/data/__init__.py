"""Federated data: per-client datasets, partitioners, and the bundled and LEAF datasets.

* :mod:`~fedloom.data.dataset` - :class:`ClientDataset` and :class:`FederatedDataset`.
* :mod:`~fedloom.data.partition` - IID, Dirichlet label skew, label shards, natural keys.
* :mod:`~fedloom.data.text` - character vocabulary, encoding and next-character windows.
* :mod:`~fedloom.data.shakespeare` - keyboard prediction, one client per speaking role.
* :mod:`~fedloom.data.synthetic` - FedProx's Synthetic(alpha, beta).
* :mod:`~fedloom.data.tabular` - digits and breast cancer (shipped with the package).
* :mod:`~fedloom.data.leaf` - LEAF JSON files.
"""

from fedloom.data.dataset import ClientDataset, FederatedDataset
from fedloom.data.leaf import load_leaf
from fedloom.data.partition import dirichlet, iid, natural, shards, split_client, to_federated
from fedloom.data.shakespeare import load_shakespeare, parse_roles
from fedloom.data.synthetic import synthetic, synthetic_arrays
from fedloom.data.tabular import load_breast_cancer, load_digits, tabular
from fedloom.data.text import decode, encode, vocabulary, windows

__all__ = [
    "ClientDataset",
    "FederatedDataset",
    "decode",
    "dirichlet",
    "encode",
    "iid",
    "load_breast_cancer",
    "load_digits",
    "load_leaf",
    "load_shakespeare",
    "natural",
    "parse_roles",
    "shards",
    "split_client",
    "synthetic",
    "synthetic_arrays",
    "tabular",
    "to_federated",
    "vocabulary",
    "windows",
]
