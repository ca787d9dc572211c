"""The vectorized engine: many clients of one architecture trained at once.

The clients of a round start from their requests' parameters, stacked along a leading client
axis. At every local step, the clients that still have a batch to train on (those with fewer
steps have finished and are left out) run one forward and backward pass together: each
client's loss is the mean cross-entropy of its own batch, the sum of the clients' losses is
differentiated once, and since no parameter is shared between clients each one receives exactly
its own gradient. Batches follow the sequential engine's order exactly
(``RandomState([seed, round, client]).permutation`` per epoch, consecutive slices, the last one
short, an optional step cap), so the result equals sequential training up to float32 rounding.

Models are vectorized through ``torch.func.vmap`` over ``functional_call`` when every module is
of a kind whose per-sample computation is independent of the rest of the batch (linear,
convolution, pooling, activations, and fedloom's reference models; a user module opts in with a
class attribute ``fedloom_vectorize = True``). The character LSTM gets a stacked LSTM written
with batched matmuls over time, because ``nn.LSTM`` has no vmap rule. Anything else (another
loss, batch norm, dropout, a custom module) trains sequentially, announced once on the
``fedloom`` logger; it is never silently wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from fedloom.client.pipeline import NO_STAGES, ClientPipeline
from fedloom.client.torch_work import TorchClientWork, cross_entropy
from fedloom.client.work import ClientWork, failure, handle
from fedloom.data.dataset import ClientDataset, FederatedDataset
from fedloom.messages import Reply, Request, TrainConfig, TrainReply, TrainRequest, Update, error_reply
from fedloom.models import CNN, MLP, CharLSTM, LogisticRegression
from fedloom.seeding import keyed_rng
from fedloom.transport.inprocess import InProcessTransport

log = logging.getLogger("fedloom")

StackedForward = Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]

def _stacked_lstm_forward(model: CharLSTM) -> StackedForward:
    """Forward of G character LSTMs with stacked weights: ``x (G, B, T) -> logits (G, B, T, V)``."""
    layers = model.lstm.num_layers

    def forward(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        emb, rest = params[0], params[1:]
        g, b, t = x.shape
        h_seq = emb[torch.arange(g, device=x.device)[:, None, None], x]  # (G, B, T, E)
        for layer in range(layers):
            w_ih, w_hh, b_ih, b_hh = rest[4 * layer : 4 * layer + 4]
            hidden = w_hh.shape[-1]
            xw = torch.baddbmm((b_ih + b_hh)[:, None, :], h_seq.reshape(g, b * t, -1), w_ih.transpose(1, 2))
            xw_steps = xw.reshape(g, b, t, 4 * hidden).unbind(2)  # unbind: one gradient copy, not one per step
            w_hh_t = w_hh.transpose(1, 2)
            h = x.new_zeros((g, b, hidden), dtype=emb.dtype)
            c = torch.zeros_like(h)
            outs = []
            for step in range(t):
                gates = torch.baddbmm(xw_steps[step], h, w_hh_t)  # PyTorch's gate order: i, f, g, o
                act = torch.sigmoid(gates)  # slicing one activation: cheaper backward than chunk()
                cand = torch.tanh(gates[..., 2 * hidden : 3 * hidden])
                c = act[..., hidden : 2 * hidden] * c + act[..., :hidden] * cand
                h = act[..., 3 * hidden :] * torch.tanh(c)
                outs.append(h)
            h_seq = torch.stack(outs, dim=2)
        w_out, b_out = rest[4 * layers :]
        hidden = h_seq.shape[-1]
        logits = torch.baddbmm(b_out[:, None, :], h_seq.reshape(g, b * t, hidden), w_out.transpose(1, 2))
        return logits.reshape(g, b, t, -1)

    return forward


Layer = Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]


def _linear(idx: dict[str, int], prefix: str, module: nn.Linear) -> Layer:
    w, b = idx[prefix + "weight"], idx.get(prefix + "bias")

    def f(p: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        xs = x.reshape(x.shape[0], -1, x.shape[-1])
        wt = p[w].transpose(1, 2)
        out = torch.bmm(xs, wt) if b is None else torch.baddbmm(p[b][:, None, :], xs, wt)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    return f


def _conv2d(idx: dict[str, int], prefix: str, module: nn.Conv2d) -> Layer | None:
    if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
        return None
    w, b = idx[prefix + "weight"], idx.get(prefix + "bias")

    def f(p: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        g, n = x.shape[:2]
        weight = p[w].reshape(-1, *p[w].shape[2:])  # (G*O, C, kh, kw): one group per client
        bias = None if b is None else p[b].reshape(-1)
        xs = x.transpose(0, 1).reshape(n, -1, *x.shape[3:])  # (B, G*C, H, W)
        out = F.conv2d(xs, weight, bias, module.stride, module.padding, module.dilation, groups=g)
        return out.reshape(n, g, -1, *out.shape[2:]).transpose(0, 1)

    return f


def _per_sample(module: nn.Module) -> Layer:
    def f(p: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        out = module(x.reshape(-1, *x.shape[2:]))
        return out.reshape(*x.shape[:2], *out.shape[1:])

    return f


def _chain(layers: list[Layer | None]) -> Layer | None:
    if any(layer is None for layer in layers):
        return None

    def f(p: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            x = layer(p, x)  # type: ignore[misc]
        return x

    return f


def _flatten(p: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2)


def _stacked_layer(module: nn.Module, prefix: str, idx: dict[str, int]) -> Layer | None:
    """The stacked form of a module whose forward fedloom knows, else None."""
    if isinstance(module, nn.Linear):
        return _linear(idx, prefix, module)
    if isinstance(module, nn.Conv2d):
        return _conv2d(idx, prefix, module)
    if isinstance(module, nn.ReLU | nn.Tanh | nn.Sigmoid | nn.GELU | nn.MaxPool2d | nn.AvgPool2d | nn.Identity):
        return _per_sample(module)
    if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
        return _flatten
    if isinstance(module, nn.Sequential):
        return _chain([_stacked_layer(m, f"{prefix}{name}.", idx) for name, m in module.named_children()])
    if isinstance(module, LogisticRegression):
        return _chain([_flatten, _stacked_layer(module.linear, prefix + "linear.", idx)])
    if isinstance(module, MLP):
        return _chain([_flatten, _stacked_layer(module.net, prefix + "net.", idx)])
    if isinstance(module, CNN):
        return _chain([_stacked_layer(module.features, prefix + "features.", idx), _flatten,
                       _stacked_layer(module.head, prefix + "head.", idx)])
    return None


def stacked_forward(model: nn.Module) -> tuple[StackedForward | None, str]:
    """A forward over stacked parameters for ``model``, or ``(None, reason)`` when it cannot be vectorized.

    Known layers and fedloom's models get hand-written batched forms (``bmm``, grouped
    convolutions); a module marked ``fedloom_vectorize = True`` goes through ``vmap``.
    """
    if isinstance(model, CharLSTM):
        if model.lstm.bidirectional or model.lstm.proj_size or not model.lstm.bias or not model.lstm.batch_first:
            return None, "only a unidirectional, biased, batch-first LSTM is vectorized"
        return _stacked_lstm_forward(model), ""
    if list(model.buffers()):
        return None, "the model has buffers (running statistics)"
    names = [n for n, _ in model.named_parameters()]
    layer = _stacked_layer(model, "", {n: i for i, n in enumerate(names)})
    if layer is not None:
        return layer, ""
    if not getattr(type(model), "fedloom_vectorize", False):
        return None, f"{type(model).__name__} is not a model fedloom knows to be per-sample " \
                     "(mark its class with fedloom_vectorize = True if it is)"

    def one(params: tuple[torch.Tensor, ...], xb: torch.Tensor) -> torch.Tensor:
        return functional_call(model, dict(zip(names, params)), (xb,))

    batched = vmap(one)
    return (lambda params, x: batched(tuple(params), x)), ""


def _client_batches(c: ClientDataset, config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """One client's batches as ``(index, mask)`` of shape ``(steps, batch_size)``, in sequential order.

    Matches ``TorchClientWork.train``: one ``RandomState([seed, round, client]).permutation`` per
    epoch, consecutive slices (the last one short, padded here and masked out), a step cap.
    """
    rng = keyed_rng(config.seed, config.round, c.client_id)
    b, n = config.batch_size, c.num_train
    per_epoch = -(-n // b)
    index = np.zeros((config.local_epochs, per_epoch * b), dtype=np.int64)
    for e in range(config.local_epochs):
        index[e, :n] = rng.permutation(n)
    mask = np.zeros_like(index, dtype=bool)
    mask[:, :n] = True
    index, mask = index.reshape(-1, b), mask.reshape(-1, b)
    if config.max_steps is not None:
        index, mask = index[: config.max_steps], mask[: config.max_steps]
    return index, mask


@dataclass(frozen=True)
class _Schedule:
    """All clients' batches as flat row indices into the group's concatenated data.

    ``index`` and ``mask`` are ``(G, S, B)``; ``steps[g]`` is client g's number of batches.
    """

    index: np.ndarray
    mask: np.ndarray
    steps: np.ndarray


def _schedule(clients: Sequence[ClientDataset], offsets: np.ndarray, config: TrainConfig) -> _Schedule:
    batches = [_client_batches(c, config) for c in clients]
    steps = np.array([len(i) for i, _ in batches], dtype=np.int64)
    index = np.zeros((len(clients), int(steps.max()), config.batch_size), dtype=np.int64)
    mask = np.zeros(index.shape, dtype=bool)
    for g, ((idx, m), off) in enumerate(zip(batches, offsets)):
        index[g] = off
        index[g, : len(idx)] += idx
        mask[g, : len(idx)] = m
    return _Schedule(index, mask, steps)


def train_group(work: TorchClientWork, forward: StackedForward, requests: Sequence[TrainRequest],
                clients: Sequence[ClientDataset]) -> list[Update]:
    """Train ``clients`` (one per request, all with the same config) together; one update per client."""
    config = requests[0].config
    device = work.device
    sizes = np.array([c.num_train for c in clients])
    sched = _schedule(clients, np.concatenate([[0], np.cumsum(sizes)[:-1]]), config)
    # Longest schedules first: the clients still training at step s are always a prefix [:k].
    order = np.argsort(-sched.steps, kind="stable")
    steps = sched.steps[order]
    total_steps = int(steps[0])
    active = (steps[None, :] > np.arange(total_steps)[:, None]).sum(1).tolist()  # clients training at step s
    # Step-major layout so that step s's active clients are one contiguous block.
    index = torch.from_numpy(np.ascontiguousarray(sched.index[order].transpose(1, 0, 2))).to(device)
    counts = sched.mask[order].sum(-1)  # (G, S) samples per batch
    positions = int(np.prod(clients[0].y_train.shape[1:], dtype=np.int64))  # targets per sample
    # Each target's share of its client's batch-mean loss; 0 for padding.
    share = sched.mask[order] / np.maximum(counts, 1)[..., None] / positions
    share = np.ascontiguousarray(np.repeat(share, positions, axis=-1).transpose(1, 0, 2))
    share = torch.from_numpy(share).to(device, torch.get_default_dtype())
    x = torch.from_numpy(np.concatenate([c.x_train for c in clients])).to(device)
    y = torch.from_numpy(np.concatenate([c.y_train for c in clients])).to(device)
    sent = [torch.from_numpy(np.stack([np.asarray(requests[i].params[j]) for i in order]))
            for j in range(len(requests[0].params))]
    stacked = [p.to(device, copy=True) for p in sent]
    anchor = [p.to(device) for p in sent] if config.mu > 0 else None
    losses = torch.zeros(share.shape, device=device)  # per-target losses, for the clients' train loss
    for s, k in enumerate(active):
        weights = [p[:k].detach().requires_grad_() for p in stacked]  # views: updated in place below
        idx = index[s, :k]
        out = forward(weights, x[idx])
        per_target = F.cross_entropy(out.reshape(-1, out.shape[-1]), y[idx].reshape(-1), reduction="none")
        grads = torch.autograd.grad(torch.dot(per_target, share[s, :k].view(-1)), weights)
        with torch.no_grad():
            if anchor is not None:
                grads = [g + config.mu * (w - a[:k]) for g, w, a in zip(grads, weights, anchor)]
            torch._foreach_add_(weights, grads, alpha=-config.lr)
            losses[s, :k] = per_target.detach().view(k, -1)
    batch_loss = (losses * share).sum(-1).cpu().numpy()  # (S, G): each client's batch-mean loss per step
    seen = counts.sum(1)
    loss_sums = (batch_loss.T * counts).sum(1)
    per_sample = losses.view(*losses.shape[:2], -1, positions).mean(-1).cpu().numpy()  # (S, G, B)
    with np.errstate(over="ignore", invalid="ignore"):  # a diverged client's inf is refused with its reason
        sq_sums = (per_sample.transpose(1, 0, 2) ** 2 * sched.mask[order]).sum((1, 2))
    deltas = [(p - q.to(device)).cpu().numpy() for p, q in zip(stacked, sent)]
    updates: list[Update | None] = [None] * len(clients)
    for pos, i in enumerate(order):
        n_seen = max(int(seen[pos]), 1)
        metrics = {"loss": float(loss_sums[pos]) / n_seen, "loss_sq": float(sq_sums[pos]) / n_seen,
                   "examples": float(seen[pos]), "steps": float(steps[pos])}
        updates[i] = Update(values=[d[pos] for d in deltas], weight=float(clients[i].num_train), kind="delta",
                            metrics=metrics)
    return updates  # type: ignore[return-value]


class VectorizedTransport:
    """Runs a round's train requests vectorized, in groups of at most ``group_size`` clients (0 = all).

    Requests are grouped by identical train config. Evaluate requests, clients without training
    data and any group that fails run through the sequential handler, which turns errors into
    error replies for the clients concerned.
    """

    def __init__(self, work: ClientWork, data: FederatedDataset, group_size: int = 0,
                 pipeline: ClientPipeline = NO_STAGES):
        self.work = work
        self.data = data
        self.group_size = group_size
        self.pipeline = pipeline
        self._fallbacks: set[str] = set()  # why a group fell back to sequential training, said once each
        self.sequential = InProcessTransport(work, data, pipeline)
        self.forward: StackedForward | None = None
        reason = "client work is not a TorchClientWork"
        if isinstance(work, TorchClientWork):
            reason = "" if work.loss_fn is cross_entropy else "only the built-in cross-entropy loss is vectorized"
            if not reason:
                self.forward, reason = stacked_forward(work.model)
        if self.forward is None:
            log.warning("fedloom: cannot vectorize (%s); training clients sequentially", reason)

    def exchange(self, requests: Sequence[Request]) -> list[Reply]:
        if self.forward is None:
            return self.sequential.exchange(requests)
        replies: dict[int, Reply] = {}
        groups: dict[TrainConfig, list[int]] = {}
        requests = [self._prepared(r) for r in requests]
        for i, r in enumerate(requests):
            ok = isinstance(r, TrainRequest) and 0 <= r.client_id < len(self.data)
            if ok and self.data[r.client_id].num_train > 0:
                groups.setdefault(r.config, []).append(i)
            else:
                replies[i] = self.sequential.exchange([r])[0]
        for members in groups.values():
            size = self.group_size or len(members)
            for start in range(0, len(members), size):
                chunk = members[start : start + size]
                replies.update(zip(chunk, self._train([requests[i] for i in chunk])))
        return [replies[i] for i in range(len(requests))]

    def _prepared(self, request: Request) -> Request:
        """The request with the model its client trains from (``ClientPipeline.prepare``); as it was if that fails,
        so that the sequential handler reports the failure."""
        try:
            return self.pipeline.prepare(request) if isinstance(request, TrainRequest) else request
        except Exception:  # noqa: BLE001 - handle() prepares it again and turns the error into a reply
            return request

    def _train(self, requests: list[TrainRequest]) -> list[Reply]:
        clients = [self.data[r.client_id] for r in requests]
        try:
            updates = train_group(self.work, self.forward, requests, clients)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - fall back; the sequential path reports per client
            why = f"{type(exc).__name__}: {exc}"
            if why not in self._fallbacks:
                self._fallbacks.add(why)
                log.warning("fedloom: vectorized group failed (%s); training it sequentially (said once)", why)
            return [handle(r, self.work, c, self.pipeline) for r, c in zip(requests, clients)]
        return [self._finish(r, u) for r, u in zip(requests, updates)]

    def _finish(self, request: TrainRequest, update: Update) -> Reply:
        """The client halves of the pipeline on one client's update, as ``handle`` runs them."""
        try:
            update, state = self.pipeline.apply(request, update)
            return TrainReply(request.client_id, request.round, update=update, state=state)
        except Exception as exc:  # noqa: BLE001 - one client's failure, as handle reports it
            return replace(error_reply(request, "client_failed", failure(exc)), state=request.state)

    def close(self) -> None:
        """Nothing to release."""
