"""A PyTorch helper that turns a model factory and a loss into :class:`ClientWork`.

Local training is plain mini-batch SGD (McMahan et al. 2017, "Communication-Efficient Learning
of Deep Networks from Decentralized Data"), optionally with FedProx's proximal term
``mu/2 * ||w - w_global||^2`` (Li et al. 2020, "Federated Optimization in Heterogeneous
Networks"). The local shuffle of client ``c`` in round ``r`` is
``np.random.RandomState([seed, r, c]).permutation(n_train)``, one permutation per local epoch;
batches are consecutive slices of it, the last one possibly short.

A loss function returns either one loss per sample, shape ``(B,)``, or their mean (a scalar);
training descends on the mean. Besides the mean training loss, a client reports ``loss_sq``, the
mean over the samples it trained on of the squared per-sample loss: the statistical utility Oort
selects by (Lai et al. 2021, ``|B| * sqrt(loss_sq)``). With a scalar loss function the per-sample
losses are unknown and ``loss_sq`` is the mean of the squared batch losses (a lower bound).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedloom.data.dataset import ClientDataset
from fedloom.errors import DataError
from fedloom.messages import EvaluateConfig, Evaluation, TrainConfig, Update
from fedloom.params import Params
from fedloom.seeding import keyed_rng

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy, shape ``(B,)``; a sequence sample ``(T, V)`` averages its positions."""
    if logits.dim() > 2:
        per_target = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        return per_target.view(target.shape[0], -1).mean(1)
    return F.cross_entropy(logits, target, reduction="none")


def mean_and_squares(losses: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch-mean loss to descend on, and the summed squared per-sample losses (see the module doc)."""
    mean = losses.mean()
    if losses.dim() == 1 and len(losses) == batch:
        return mean, (losses.detach() ** 2).sum()
    return mean, mean.detach() ** 2 * batch


def _state(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The parameters, then the floating-point buffers (BatchNorm's running statistics): what fedloom moves."""
    return [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if b.is_floating_point())]


def param_names(model: nn.Module) -> list[str]:
    """The names of :func:`get_params`'s arrays (the model's ``state_dict`` keys)."""
    return [n for n, _ in _state(model)]


def batchnorm_indices(model: nn.Module) -> tuple[int, ...]:
    """Where the BatchNorm layers' entries (weight, bias, running statistics) are among :func:`get_params`'s arrays:
    what FedBN keeps on each client."""
    owned = {f"{m}.{n}" if m else n for m, mod in model.named_modules()
             if isinstance(mod, nn.modules.batchnorm._BatchNorm) for n, _ in mod.named_parameters(recurse=False)}
    owned |= {f"{m}.{n}" if m else n for m, mod in model.named_modules()
              if isinstance(mod, nn.modules.batchnorm._BatchNorm) for n, _ in mod.named_buffers(recurse=False)}
    return tuple(i for i, name in enumerate(param_names(model)) if name in owned)


def get_params(model: nn.Module) -> Params:
    """The model's parameters, then its floating-point buffers, as new arrays.

    Buffers such as BatchNorm's running statistics travel and are aggregated with the parameters,
    so the global model carries the federation's statistics (not those of whichever client trained
    last in this process). Integer buffers (``num_batches_tracked``) stay local.
    """
    return [t.detach().cpu().numpy().copy() for _, t in _state(model)]


def set_params(model: nn.Module, params: Params) -> None:
    """Copy ``params`` (parameters, then floating-point buffers) into the model in place (shapes must match)."""
    with torch.no_grad():
        for (_, t), a in zip(_state(model), params, strict=True):
            t.copy_(torch.from_numpy(np.asarray(a)))


@torch.no_grad()
def evaluate_arrays(
    model: nn.Module, x: np.ndarray, y: np.ndarray, loss_fn: LossFn = cross_entropy, batch_size: int = 256
) -> Evaluation:
    """Mean loss and accuracy of ``model`` on arrays; sequence targets count every position."""
    if len(y) == 0:
        raise DataError("cannot evaluate on 0 examples")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, correct, positions = 0.0, 0, 0
    for start in range(0, len(y), batch_size):
        xb = torch.from_numpy(x[start : start + batch_size]).to(device)
        yb = torch.from_numpy(y[start : start + batch_size]).to(device)
        out = model(xb)
        loss_sum += float(loss_fn(out, yb).mean()) * yb.numel()
        correct += int((out.argmax(dim=-1) == yb).sum())
        positions += yb.numel()
    model.train(was_training)
    return Evaluation(loss=loss_sum / positions, accuracy=correct / positions, num_examples=len(y))


class TorchClientWork:
    """Local SGD and evaluation for any ``nn.Module`` built by ``model_fn``.

    One model instance is built on first use and reused for every client the process serves,
    so a simulated client costs a parameter copy, not a model construction.
    """

    def __init__(self, model_fn: Callable[[], nn.Module], loss_fn: LossFn = cross_entropy, device: str = "cpu"):
        self.model_fn = model_fn
        self.loss_fn = loss_fn
        self.device = torch.device(device)
        self._model: nn.Module | None = None

    def initial_params(self, seed: int) -> Params:
        """Parameters of a fresh model built after ``torch.manual_seed(seed)``."""
        torch.manual_seed(seed)
        return get_params(self.model_fn())

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            self._model = self.model_fn().to(self.device)
        return self._model

    def train(self, params: Params, data: ClientDataset, config: TrainConfig) -> Update:
        n = data.num_train
        if n == 0:
            raise DataError("no training examples", client_id=data.client_id, stage="train")
        model = self.model
        set_params(model, params)
        model.train()
        weights = list(model.parameters())
        anchor = [w.detach().clone() for w in weights] if config.mu > 0 else None
        x = torch.from_numpy(data.x_train).to(self.device)
        y = torch.from_numpy(data.y_train).to(self.device)
        rng = keyed_rng(config.seed, config.round, data.client_id)
        loss_sum = torch.zeros((), device=self.device)
        sq_sum = torch.zeros((), device=self.device)
        steps = seen = 0
        for _ in range(config.local_epochs):
            order = torch.from_numpy(rng.permutation(n)).to(self.device)
            for start in range(0, n, config.batch_size):
                if config.max_steps is not None and steps >= config.max_steps:
                    break
                idx = order[start : start + config.batch_size]
                for w in weights:
                    w.grad = None
                loss, squares = mean_and_squares(self.loss_fn(model(x[idx]), y[idx]), len(idx))
                loss.backward()
                with torch.no_grad():
                    for i, w in enumerate(weights):
                        if anchor is not None:
                            w.grad.add_(w - anchor[i], alpha=config.mu)
                        w.add_(w.grad, alpha=-config.lr)
                loss_sum += loss.detach() * len(idx)
                sq_sum += squares
                steps += 1
                seen += len(idx)
        new = get_params(model)
        delta = [a - np.asarray(b) for a, b in zip(new, params)]
        metrics = {"loss": float(loss_sum) / max(seen, 1), "loss_sq": float(sq_sum) / max(seen, 1),
                   "examples": float(seen), "steps": float(steps)}
        return Update(values=delta, weight=float(n), kind="delta", metrics=metrics)

    def evaluate(self, params: Params, data: ClientDataset, config: EvaluateConfig) -> Evaluation:
        if data.num_test == 0:
            raise DataError("no test examples", client_id=data.client_id, stage="evaluate")
        return self.evaluate_params(params, data.x_test, data.y_test, config.batch_size)

    def evaluate_params(self, params: Params, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> Evaluation:
        """Evaluate ``params`` on arrays (used for the server's centralised evaluation too)."""
        set_params(self.model, params)
        return evaluate_arrays(self.model, x, y, self.loss_fn, batch_size)
