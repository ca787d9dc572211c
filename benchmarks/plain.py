"""A reference workload as a plain PyTorch script, start to finish, with no framework.

    python -m benchmarks.plain wa      # or wb, wa-scaled: one JSON line (accuracy, examples, train_s)

What this command costs from the shell, cold, is the reference for ``fedloom simulate``'s whole
command (``python -m benchmarks.run wa`` times both, interleaved). It imports torch, numpy and
fedloom's data generators and model classes only (the same data and model, by the same code), and
trains with :func:`fedavg`, FedAvg as a researcher writes it: one model, ``torch.optim.SGD``, a loop.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.specs import SPECS
from fedloom.data.dataset import FederatedDataset


@dataclass(frozen=True)
class PlainResult:
    train_s: float
    accuracy: float
    examples: int


def fedavg(model_fn: Callable[[], nn.Module], dataset: FederatedDataset, *, rounds: int, clients_per_round: int,
           lr: float, batch_size: int, max_steps: int, seed: int) -> PlainResult:
    """FedAvg by BENCHMARKS.md's common rules (sampling, shuffles, weights), then one centralised evaluation."""
    torch.manual_seed(seed)
    model = model_fn()
    params = list(model.parameters())
    n_clients = len(dataset)
    global_w = [p.detach().clone() for p in params]
    examples = 0
    start = time.perf_counter()
    for r in range(1, rounds + 1):
        chosen = np.random.RandomState([seed, r]).choice(n_clients, clients_per_round, replace=False)
        total = sum(dataset[int(cid)].num_train for cid in chosen)
        new_w = [torch.zeros_like(w) for w in global_w]
        for cid in chosen:
            data = dataset[int(cid)]
            with torch.no_grad():
                for p, w in zip(params, global_w):
                    p.copy_(w)
            opt = torch.optim.SGD(params, lr=lr)
            x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
            order = torch.from_numpy(np.random.RandomState([seed, r, int(cid)]).permutation(data.num_train))
            steps = 0
            for s in range(0, data.num_train, batch_size):
                if max_steps and steps >= max_steps:
                    break
                idx = order[s : s + batch_size]
                opt.zero_grad()
                out = model(x[idx])
                loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y[idx].reshape(-1))
                loss.backward()
                opt.step()
                steps += 1
                examples += len(idx)
            with torch.no_grad():
                for acc, p in zip(new_w, params):
                    acc += (data.num_train / total) * p
        global_w = new_w
    train_s = time.perf_counter() - start
    with torch.no_grad():
        for p, w in zip(params, global_w):
            p.copy_(w)
        x_test, y_test = dataset.test_union()
        correct = positions = 0
        for s in range(0, len(y_test), 256):
            out = model(torch.from_numpy(x_test[s : s + 256]))
            yb = torch.from_numpy(y_test[s : s + 256])
            correct += int((out.argmax(-1) == yb).sum())
            positions += yb.numel()
    return PlainResult(train_s, correct / positions, examples)


def load(spec: dict) -> tuple[FederatedDataset, Callable[[], nn.Module]]:
    """The workload's data, and a function building its model."""
    from fedloom.models import build_model

    d, m = spec["data"], spec["model"]
    if d["dataset"] == "synthetic":
        from fedloom.data.synthetic import synthetic

        data = synthetic(d["synthetic_alpha"], d["synthetic_beta"], num_clients=d["num_clients"],
                         seed=spec["run"]["seed"])
    else:
        from fedloom.data.shakespeare import load_shakespeare

        data = load_shakespeare()
    shape = tuple(data.clients[0].x_train.shape[1:])
    settings = {k: v for k, v in m.items() if k != "name"}
    return data, lambda: build_model(m["name"], shape, data.num_classes, **settings)


def main(name: str) -> None:
    spec = SPECS[name]
    data, model_fn = load(spec)
    c, s = spec["client"], spec["server"]
    result = fedavg(model_fn, data, rounds=spec["run"]["rounds"], clients_per_round=s["clients_per_round"],
                    lr=c["lr"], batch_size=c["batch_size"], max_steps=c["max_steps"], seed=spec["run"]["seed"])
    print(json.dumps({"workload": name, "implementation": "plain-script", "accuracy": round(result.accuracy, 4),
                      "examples": result.examples, "train_s": round(result.train_s, 3)}))


if __name__ == "__main__":
    main(sys.argv[1])
