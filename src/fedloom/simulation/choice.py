"""``engine.executor = "auto"``: the engine that suits a run, chosen from what the run is and a timed step.

The engines differ in what they remove from a round (``simulation/engines.py``):

- ``vectorized`` trains a round's clients together. It removes the per-step cost of Python and of
  launching small kernels, which is most of a step for the models it batches (measured
  against sequential on 2 cores: logistic regression 5x, MLP 6x, CNN 3.5x). The character LSTM is
  the exception: its batched form runs one small kernel per time step, where ``nn.LSTM`` runs one
  fused kernel per sequence, so on a CPU it loses (0.5x at 128 units, 0.4x at 32); on a GPU,
  where launches are what a step costs, it wins.
- ``process`` runs clients on all cores at once, one torch thread each. It pays off when a round's
  arithmetic is long against sending the round to the workers (about a millisecond), and when one
  thread per client beats the cores sharing each client's kernels.
- ``sequential`` is the rest: one client per round, one core, or a short round of a model the
  vectorized engine cannot batch (or would slow).

For a model that is not vectorized, one local SGD step of the median client is timed on the
sequential path, on one thread and on all (the fastest of three timings), after two warm-up calls,
with torch's random state kept as it was, so a run with ``auto`` trains exactly as a run that names
the chosen engine.
A user's explicit engine always wins; ``auto`` never picks Ray, which needs a cluster named.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

import torch

from fedloom.client.torch_work import TorchClientWork
from fedloom.config import Config, EngineConfig
from fedloom.data.dataset import FederatedDataset
from fedloom.messages import TrainConfig
from fedloom.models import CharLSTM

POOL_MIN_ROUND_S = 0.1  # a round with less arithmetic than this is not worth sending to worker processes
POOL_MIN_GAIN = 1.1  # the pool must be estimated at least this much faster than sequential training
_TIMED_STEPS = 3
_TIMINGS = 3  # timed calls of _TIMED_STEPS steps each; the fastest counts (another process's burst only slows one)


@dataclass(frozen=True)
class Choice:
    """The engine settings a run uses, and one line saying which engine and why."""

    engine: EngineConfig
    reason: str


def usable_cores() -> int:
    """CPUs this process may run on (its affinity, where the platform says)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def step_seconds(work: TorchClientWork, dataset: FederatedDataset, cfg: Config, threads: int) -> float:
    """Seconds one local SGD step of the median client takes on the sequential path with ``threads`` torch threads:
    the fastest of three timed calls, after two warm-up calls untimed (the first calls of a process pay for torch's
    lazy set-up)."""
    clients = sorted((c for c in dataset.clients if c.num_train), key=lambda c: c.num_train)
    if not clients:
        return 0.0
    client = clients[len(clients) // 2]
    c = cfg.client
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):  # the probe draws nothing the run would have drawn
            params = work.initial_params(cfg.run.seed)
            for _ in range(2):
                work.train(params, client, TrainConfig(lr=c.lr, batch_size=c.batch_size, max_steps=1, mu=c.mu))
            elapsed = float("inf")
            for _ in range(_TIMINGS):
                t = time.perf_counter()
                update = work.train(params, client, TrainConfig(lr=c.lr, batch_size=c.batch_size,
                                                                max_steps=_TIMED_STEPS, mu=c.mu))
                elapsed = min(elapsed, time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)
    return elapsed / max(update.metrics.get("steps", _TIMED_STEPS), 1.0)


def local_steps(dataset: FederatedDataset, cfg: Config) -> float:
    """Local SGD steps a client takes in a round, on average over the clients (epochs and the step cap counted)."""
    c = cfg.client
    steps = [c.local_epochs * -(-d.num_train // c.batch_size) for d in dataset.clients]
    if c.max_steps:
        steps = [min(s, c.max_steps) for s in steps]
    return sum(steps) / max(len(steps), 1)


def resolve_engine(cfg: Config, work: TorchClientWork, dataset: FederatedDataset) -> Choice:
    """The engine settings this run trains with: the configured ones, or for ``auto`` :func:`choose_engine`'s."""
    if cfg.engine.executor != "auto":
        return Choice(cfg.engine, f"{cfg.engine.executor}: as configured")
    return choose_engine(cfg, work, dataset)


def choose_engine(cfg: Config, work: TorchClientWork, dataset: FederatedDataset) -> Choice:
    """The engine ``auto`` stands for in this run (``cfg.engine.executor`` must be ``"auto"``)."""
    from fedloom.simulation.vectorized import stacked_forward

    e = cfg.engine
    forward, why_not = stacked_forward(work.model)
    recurrent = isinstance(work.model, CharLSTM)

    def chose(executor: str, reason: str, **settings: object) -> Choice:
        return Choice(replace(e, executor=executor, **settings), f"{executor}: {reason}")

    if e.device == "cuda":
        if forward is not None:
            return chose("vectorized", "on CUDA, a round's clients train together in one batch")
        return chose("sequential", f"on CUDA, and the vectorized engine cannot batch this model ({why_not})")
    if cfg.server.aggregation != "sync" and cfg.secagg.mode == "off":
        return chose("sequential", f"{cfg.server.aggregation} on the simulated clock sends one task at a time, so "
                                   "there is nothing to train together or share out")
    k = cfg.server.clients_per_round
    if k < 2:
        return chose("sequential", "one client per round")
    if forward is not None and not recurrent:
        return chose("vectorized", f"the vectorized engine batches {type(work.model).__name__}, and training the "
                                   f"round's {k} clients together removes most of a small step's cost (Python, "
                                   "kernel launches)")
    why = ("on a CPU its batched form (a kernel per time step) is slower than nn.LSTM's fused kernel" if recurrent
           else f"the vectorized engine cannot batch this model ({why_not})")
    cores = usable_cores()
    if cores < 2:
        return chose("sequential", f"{why}, and there is one core")
    one = step_seconds(work, dataset, cfg, threads=1)
    every = step_seconds(work, dataset, cfg, threads=torch.get_num_threads())
    steps = k * local_steps(dataset, cfg)
    workers = min(cores, k)
    pooled = steps * one / workers
    timed = f"a local step takes {one * 1e3:.1f} ms on one thread, {every * 1e3:.1f} ms on {torch.get_num_threads()}"
    if steps * one >= POOL_MIN_ROUND_S and steps * every >= POOL_MIN_GAIN * pooled:
        return chose("process", f"{why}; {timed}, so {workers} worker processes (one thread each) should train a "
                                f"round in about {pooled:.2f} s against {steps * every:.2f} s", workers=workers,
                     vectorize=False)
    return chose("sequential", f"{why}; {timed}, and a round (about {steps * every:.2f} s) gains too little from "
                               f"{workers} worker processes")
