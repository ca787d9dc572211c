"""The simulated clock of a synchronous round: who arrives when, and who the round keeps.

Host speed never enters: a client's task takes download + compute + upload time from its
:class:`DeviceProfile` and the real encoded sizes of its request and reply (the protobuf
envelopes the gRPC deployment would send). A round starts at simulated time ``t0`` with the
clients available then; it keeps the first ``k`` arrivals (over-selection asks more than ``k``)
that land before the deadline; clients that drop out (``dropout_p``, drawn per client and round)
never arrive. Stragglers are either dropped or, FedProx-style (Li et al. 2020), asked for only the
local steps that fit before the deadline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from torch import nn

from fedloom.config import Config
from fedloom.data.dataset import FederatedDataset
from fedloom.hetero.profiles import REFERENCE_FLOPS, DeviceProfile, task_duration
from fedloom.messages import Reply, Request, TrainReply, TrainRequest, error_reply
from fedloom.seeding import keyed_rng
from fedloom.transport import wire


def flops_per_sample(num_params: int, targets_per_sample: int) -> float:
    """Training cost of one sample: ``6 * N`` FLOPs per target (forward and backward over N parameters).

    The usual dense-model approximation (Kaplan et al. 2020, "Scaling Laws for Neural Language
    Models"); it undercounts convolutions, whose weights are reused across positions, so set
    ``hetero.flops_per_sample`` for a CNN when its compute time matters.
    """
    return 6.0 * num_params * max(1, targets_per_sample)


def run_flops(cfg: Config, model: nn.Module, dataset: FederatedDataset) -> float:
    """Training FLOPs per sample of a run's model: ``hetero.flops_per_sample``, else :func:`flops_per_sample` with
    one sample's targets (a server that holds no data: ``data.seq_len`` for char_lstm, else one)."""
    if cfg.hetero.flops_per_sample:
        return cfg.hetero.flops_per_sample
    if dataset.clients:
        targets = int(math.prod(dataset[0].y_train.shape[1:]))
    else:
        targets = cfg.data.seq_len if cfg.model.name == "char_lstm" else 1
    return flops_per_sample(sum(p.numel() for p in model.parameters()), targets)


def message_bytes(message: Request | Reply) -> int:
    """Size of the message as the gRPC deployment encodes it."""
    return wire.message_size(message)


def steps_that_fit(profile: DeviceProfile, budget_s: float, flops: float, batch_size: int, down_bytes: int,
                   up_bytes: int) -> int:
    """Local steps of ``batch_size`` samples a client can finish within ``budget_s`` (partial work)."""
    comm = task_duration(profile, flops, 0, down_bytes, up_bytes)
    per_step = batch_size * flops / REFERENCE_FLOPS / profile.compute_sps
    return max(0, math.floor((budget_s - comm) / per_step))


def shrink_to_deadline(requests: Sequence[TrainRequest], profiles: Sequence[DeviceProfile], deadline_s: float,
                       flops: float, full_steps: Sequence[int]) -> list[TrainRequest]:
    """Requests whose step cap is lowered to what fits before the deadline (at least one step)."""
    out = []
    for r, steps in zip(requests, full_steps):
        size = message_bytes(r)
        fit = steps_that_fit(profiles[r.client_id], deadline_s, flops, r.config.batch_size, size, size)
        if 1 <= fit < steps:
            r = replace(r, config=replace(r.config, max_steps=fit))
        out.append(r)
    return out


@dataclass(frozen=True)
class RoundClock:
    """What a round cost in simulated time and traffic, and which replies it keeps."""

    replies: list[Reply]  # the kept ones unchanged; the rest turned into error replies saying why
    end_s: float
    durations: dict[int, float]  # what the server measures: kept clients' round trips; how long it waited for
    # those it did not keep (a lower bound); nothing for clients that failed at once
    trips: int
    bytes_down: int
    bytes_up: int


def run_clock(t0: float, requests: Sequence[Request], replies: Sequence[Reply],
              profiles: Sequence[DeviceProfile], flops: float, k: int, deadline_s: float, seed: int,
              step: int = 0) -> RoundClock:
    """Simulate the round's trips from ``t0`` and keep the first ``k`` arrivals before the deadline.

    A round of several exchanges (secure aggregation) runs this once per exchange: ``step`` numbers
    the exchanges of a round (0 the training), so that a device may drop out at any of them.
    """
    deadline = t0 + deadline_s if deadline_s > 0 else math.inf
    arrivals: list[tuple[float, int]] = []
    fates: dict[int, str] = {}
    down = up = 0
    last_event = t0
    for i, (req, rep) in enumerate(zip(requests, replies)):
        profile = profiles[req.client_id]
        d_bytes = message_bytes(req)
        down += d_bytes
        train = isinstance(rep, TrainReply)
        if rep.error is not None or (train and rep.update is None):
            fates[i] = f"{rep.error.code}: {rep.error.reason}" if rep.error else "no update"
            continue
        u_bytes = message_bytes(rep)
        samples = rep.update.metrics.get("examples", rep.update.weight) if train else 0  # type: ignore[union-attr]
        duration = task_duration(profile, flops, samples, d_bytes, u_bytes)
        rng = keyed_rng(seed, req.round, req.client_id, 2, *((step,) if step else ()))
        if rng.random_sample() < profile.dropout_p:
            fates[i] = "dropped: the device left mid-task"
            last_event = max(last_event, min(deadline, t0 + rng.random_sample() * duration))
            continue
        up += u_bytes
        arrivals.append((t0 + duration, i))
    arrivals.sort()
    kept = {i for t, i in [a for a in arrivals if a[0] <= deadline][:k]}
    for t, i in arrivals:
        if i in kept:
            continue
        fates[i] = (f"straggler: would arrive at {t - t0:.1f} s, after the {deadline_s:g} s deadline" if t > deadline
                    else f"over-selected: not among the first {k} arrivals")
    if len(kept) == k:
        end = max(t for t, i in arrivals if i in kept)
    elif math.isfinite(deadline):
        end = deadline  # the server waits out the deadline for clients that never come
    else:
        end = max([t for t, _ in arrivals] + [last_event])
    out = [rep if i in kept else error_reply(requests[i], "not_kept", fates[i]) for i, rep in enumerate(replies)]
    durations = {requests[i].client_id: t - t0 for t, i in arrivals if i in kept}
    for i, req in enumerate(requests):
        if i not in kept and replies[i].error is None and getattr(replies[i], "update", True) is not None:
            durations[req.client_id] = end - t0
    return RoundClock(out, end, durations, len(requests), down, up)
