"""Building a run from its config: the dataset, the model, the client work and the server's strategy.

Shared by the simulation and the deployment (server and clients build the same pieces from the
same config).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from torch import nn

from fedloom.aggregation.aggregator import Aggregator, chain
from fedloom.aggregation.reducers import coordinate_median, krum, trimmed_mean, weighted_mean
from fedloom.client.pipeline import ClientPipeline
from fedloom.client.torch_work import TorchClientWork, batchnorm_indices, get_params
from fedloom.compression.updates import Compression, compression
from fedloom.config import Config
from fedloom.data.dataset import FederatedDataset
from fedloom.data.readers import read_files, read_hf
from fedloom.data.site import load_site
from fedloom.errors import ConfigError, DataError
from fedloom.messages import EvaluateConfig, TrainConfig
from fedloom.models import build_model
from fedloom.params import ParamSpec
from fedloom.plugins import federate, user_data, user_model
from fedloom.secagg.protocol import NOISE_MARGIN, SecureAggregation
from fedloom.server import (
    ClientSelector,
    OortSelector,
    PoissonSelector,
    PowerOfChoiceSelector,
    Strategy,
    UniformSelector,
    adagrad,
    adam,
    momentum,
    sgd,
    yogi,
)
from fedloom.server.asynchronous import AsyncServer, polynomial_staleness
from fedloom.server.optimizers import ServerOptimizer
from fedloom.stages.attacks import POISONED, Attack, attackers
from fedloom.stages.base import Noise, SecureNoise, SeededNoise, Stage
from fedloom.stages.clipping import CenteredClip, Clip, MaxNorm, NormBound
from fedloom.stages.privacy import Accountant, DistributedNoise, GaussianNoise, LocalNoise, update_multiplier
from fedloom.stages.weighting import Weighting


def load_dataset(cfg: Config) -> FederatedDataset:
    """The federated dataset the config's ``[data]`` section names."""
    from fedloom import data as fd

    d, seed = cfg.data, cfg.run.seed
    if d.dataset == "site":
        return load_site(cfg)
    if d.loader:
        return user_data(d.loader, d, seed)
    if d.dataset == "shakespeare":
        return fd.load_shakespeare(seq_len=d.seq_len, train_fraction=d.train_fraction,
                                   max_clients=d.num_clients or None)
    if d.dataset == "synthetic":
        return fd.synthetic(alpha=d.synthetic_alpha, beta=d.synthetic_beta, num_clients=d.num_clients or 1000,
                            seed=seed, train_fraction=d.train_fraction)
    if d.dataset in ("files", "hf"):
        x, y, ids = (read_files(d.path, d.label_column, d.client_column) if d.dataset == "files"
                     else read_hf(d.path, d.label_column, d.client_column, d.hf_split))
        return federate(x, y, ids if d.partition == "natural" else None, d, seed, Path(d.path).name)
    if d.dataset == "leaf":
        return fd.load_leaf(d.path, d.test_path or None, train_fraction=d.train_fraction)
    return fd.tabular(d.dataset, d.num_clients, partition=d.partition, alpha=d.alpha,
                      shards_per_client=d.shards_per_client, seed=seed, train_fraction=d.train_fraction,
                      classes_per_client=d.classes_per_client, size_skew=d.size_skew)


def model_factory(cfg: Config, dataset: FederatedDataset) -> Callable[[], nn.Module]:
    """A zero-argument function building the config's model (``model.factory``'s, or a built-in one fitted to
    this dataset's inputs, or to ``model.input_shape`` and ``model.num_classes`` for a server that holds no data)."""
    sample = next((c.x_train for c in dataset.clients if c.num_train), None)
    m = cfg.model
    if sample is not None and m.input_shape and list(sample.shape[1:]) != m.input_shape:
        raise DataError(f"dataset {dataset.name!r} has samples of shape {list(sample.shape[1:])}, but "
                        f"model.input_shape is {m.input_shape}")
    if m.factory:
        return user_model(m.factory, dataset)
    if sample is None and not m.input_shape and m.name != "char_lstm":
        if dataset.clients:
            raise DataError(f"dataset {dataset.name!r} has no training samples")
        raise ConfigError("model.input_shape", "a server that holds no data builds the model from the config: give "
                                               "one sample's shape")
    if (dataset.vocab is not None) != (m.name == "char_lstm"):
        raise ConfigError("model.name", f"{m.name!r} does not fit the {dataset.name!r} data, which is "
                                        f"{'character' if dataset.vocab is not None else 'feature'} data; "
                                        "char_lstm is for character data, the others for feature data")
    input_shape = tuple(m.input_shape) if sample is None else tuple(sample.shape[1:])
    return lambda: build_model(m.name, input_shape, dataset.num_classes, hidden=tuple(m.hidden), channels=m.channels,
                               embed_dim=m.embed_dim, hidden_size=m.hidden_size, num_layers=m.num_layers)


def build_clients(cfg: Config, model_fn: Callable[[], nn.Module] | None = None,
                  dataset: FederatedDataset | None = None,
                  work: TorchClientWork | None = None) -> tuple[TorchClientWork, FederatedDataset]:
    """The client work and data a config describes; a picklable ``ClientSpec`` as ``partial(build_clients, cfg)``.

    A Python caller's own ``model_fn`` (a zero-argument model builder), ``dataset`` or ``work``
    replace what the config would build. With a poisoned ``attack.kind`` (``label_flip``, and the
    model replacements ``scale`` and ``weight``) the attackers' training labels are ``C - 1 - y``.
    """
    dataset = dataset if dataset is not None else load_dataset(cfg)
    if cfg.attack.kind in POISONED:
        bad = attackers(cfg.attack.fraction, len(dataset), cfg.run.seed)
        dataset = replace(dataset, clients=[
            replace(c, y_train=(dataset.num_classes - 1 - c.y_train).astype(c.y_train.dtype)) if i in bad else c
            for i, c in enumerate(dataset.clients)])
    if work is None:
        work = TorchClientWork(model_fn or model_factory(cfg, dataset), device=cfg.engine.device)
    return work, dataset


def server_optimizer(cfg: Config) -> ServerOptimizer:
    s = cfg.server
    return {
        "sgd": lambda: sgd(s.lr),
        "momentum": lambda: momentum(s.lr, s.momentum),
        "adagrad": lambda: adagrad(s.lr, s.beta1, s.tau),
        "adam": lambda: adam(s.lr, s.beta1, s.beta2, s.tau),
        "yogi": lambda: yogi(s.lr, s.beta1, s.beta2, s.tau),
    }[s.optimizer]()


def client_selector(cfg: Config) -> ClientSelector:
    """The selector ``[server] selection`` names, seeded by the run's seed."""
    s = cfg.server
    if s.selection == "oort":
        return OortSelector(seed=cfg.run.seed)
    if s.selection == "power_of_choice":
        return PowerOfChoiceSelector(d=s.choice_d or 2 * s.clients_per_round, seed=cfg.run.seed)
    if s.selection == "poisson":
        return PoissonSelector(cfg.run.seed)
    return UniformSelector(cfg.run.seed)


def noise_source(cfg: Config, deployed: bool) -> Noise:
    """A simulation's noise follows ``run.seed``; a deployment's comes from the OS unless a test fixes a seed."""
    if not deployed:
        return SeededNoise(cfg.run.seed)
    return SeededNoise(cfg.privacy.noise_seed) if cfg.privacy.noise_seed >= 0 else SecureNoise()


def accountant(cfg: Config, num_clients: int) -> Accountant:
    """The privacy accountant for the sampling this run uses (``stages/privacy.py``)."""
    p, s = cfg.privacy, cfg.server
    if p.local or s.aggregation != "sync":
        sampling = "none"  # local DP, and asynchronous rounds: no amplification by sampling is claimed
    else:
        sampling = "poisson" if s.selection == "poisson" else "fixed"
    return Accountant(p.noise_multiplier, sampling, num_clients, min(s.clients_per_round, num_clients), p.delta)


def survivors_needed(cfg: Config) -> int:
    """The fewest masked inputs a secure round (or buffer) is applied with: with DP, the survivors its noise is
    shared among (all but ``secagg.dropout_fraction`` of the clients asked); else one."""
    if not cfg.privacy.noise_multiplier or cfg.privacy.local:
        return 1
    per = cfg.server.clients_per_round if cfg.server.aggregation == "sync" else async_buffer(cfg)
    return max(1, math.ceil((1 - cfg.secagg.dropout_fraction) * per - 1e-9))


def build_aggregator(cfg: Config, num_clients: int, deployed: bool = False) -> Aggregator:
    """The chain ``[aggregation]``, ``[privacy]`` and ``[secagg]`` describe (see ``aggregation/aggregator.py``).

    With secure aggregation every update is clipped on its client (``privacy.clip``, needed for the
    fixed point), the server's own checks of single updates are left out (it sees none), and DP's
    noise is added by the clients (:class:`DistributedNoise`) unless it is local.
    """
    a, p, s = cfg.aggregation, cfg.privacy, cfg.server
    secure = cfg.secagg.mode != "off"
    before: list[Stage] = [MaxNorm(a.max_norm)] if a.max_norm and not secure else []
    before.append(Weighting(a.weighting, a.max_weight))
    if a.norm_bound:
        before.append(NormBound(a.norm_bound))
    if a.centered_clip:
        before.append(CenteredClip(a.centered_clip))
    after: list[Stage] = []
    if p.noise_multiplier:
        per_update = s.clients_per_round if s.aggregation == "sync" else async_buffer(cfg)
        count_std = per_update / 20 if p.target_quantile else 0.0  # Andrew et al. 2021's choice
        before.append(Clip(p.clip, p.target_quantile, p.clip_lr, count_std, server_clip=not p.local))
        acct = accountant(cfg, num_clients)
        if p.local:
            before.append(LocalNoise(p.noise_multiplier, acct, p.epsilon_budget))
        elif secure:
            after.append(DistributedNoise(p.noise_multiplier, survivors_needed(cfg), acct, p.epsilon_budget))
        else:
            after.append(GaussianNoise(update_multiplier(p.noise_multiplier, count_std), acct, p.epsilon_budget))
    elif secure:
        before.append(Clip(p.clip))
    reducer = {"mean": weighted_mean, "median": coordinate_median, "trimmed_mean": trimmed_mean(a.trim),
               "krum": krum(a.byzantine, 1), "multi_krum": krum(a.byzantine, a.krum_m)}[a.reducer]
    return chain(*before, reducer, *after, noise=noise_source(cfg, deployed))


def build_compression(cfg: Config) -> Compression:
    """The codecs; with secure aggregation the uplink's is left out: its uniformB levels are the fixed point the
    masking uses (:func:`build_secure`)."""
    c = cfg.compression
    return compression("none" if cfg.secagg.mode != "off" else c.uplink, c.downlink, c.error_feedback, c.chunk)


def build_secure(cfg: Config, num_clients: int, deployed: bool = False) -> SecureAggregation | None:
    """Secure aggregation's settings (``secagg/protocol.py``), or None when ``secagg.mode`` is off.

    The fixed point covers each client's clipped update and its noise (local or distributed) with
    a margin of :data:`NOISE_MARGIN` standard deviations; it is sized for the most clients a round
    may ask (over-selection, Poisson sampling: the whole federation).
    """
    g, p, s, a = cfg.secagg, cfg.privacy, cfg.server, cfg.aggregation
    if g.mode == "off":
        return None
    if s.selection == "poisson":
        most = num_clients
    elif s.aggregation == "sync":
        most = math.ceil(cfg.hetero.over_select * s.clients_per_round)
    else:
        most = secure_cohort(cfg)
    most = max(3, min(most, num_clients))
    need = survivors_needed(cfg)
    std = 0.0
    if p.noise_multiplier:
        std = p.noise_multiplier * p.clip / (1.0 if p.local else math.sqrt(need))
    up = cfg.compression.uplink
    # over-selection drops the slowest clients by design: they count among the dropouts SecAgg+ must survive
    dropout = 1 - (1 - g.dropout_fraction) / (cfg.hetero.over_select if s.aggregation == "sync" else 1.0)
    return SecureAggregation.for_run(
        g.mode, g.bits, int(up[7:]) if up.startswith("uniform") else 0, p.clip + NOISE_MARGIN * std, most,
        threshold=g.threshold, corrupt_fraction=g.corrupt_fraction, dropout_fraction=dropout,
        weight_cap=a.max_weight if a.weighting == "capped" else 0.0, min_survivors=need,
        seed=None if deployed else cfg.run.seed)


def client_pipeline(cfg: Config, work: TorchClientWork, num_clients: int, deployed: bool = False) -> ClientPipeline:
    """What a client runs around its training (``client/pipeline.py``): FedBN's local layers, the aggregator's client
    halves, a simulated attacker's, the codecs."""
    stages = build_aggregator(cfg, num_clients, deployed).client_stages()
    if cfg.attack.kind and cfg.attack.kind != "label_flip":
        stages += (Attack(cfg.attack.kind, attackers(cfg.attack.fraction, num_clients, cfg.run.seed),
                          cfg.attack.strength),)
    local = batchnorm_indices(work.model) if cfg.model.batchnorm == "local" else ()
    if cfg.model.batchnorm == "local" and not local:
        raise ConfigError("model.batchnorm", "\"local\" keeps BatchNorm layers on the clients, but this model has none")
    return ClientPipeline(stages, noise_source(cfg, deployed), build_compression(cfg), local,
                          ParamSpec.of(get_params(work.model)), secure=cfg.secagg.mode != "off")


def build_strategy(cfg: Config, num_clients: int, deployed: bool = False) -> Strategy:
    """The server's pieces; ``num_clients`` is the federation's size (the accountant's population)."""
    c = cfg.client
    train = TrainConfig(lr=c.lr, batch_size=c.batch_size, local_epochs=c.local_epochs,
                        max_steps=c.max_steps or None, mu=c.mu, seed=cfg.run.seed)
    return Strategy(
        clients_per_round=cfg.server.clients_per_round,
        train=train,
        selector=client_selector(cfg),
        aggregator=build_aggregator(cfg, num_clients, deployed),
        optimizer=server_optimizer(cfg),
        min_updates=cfg.server.min_updates,
        evaluate_clients=cfg.eval.federated_clients,
        evaluate=EvaluateConfig(batch_size=cfg.eval.batch_size),
        compression=build_compression(cfg),
        seed=cfg.run.seed,
        secure=build_secure(cfg, num_clients, deployed),
    )


def async_buffer(cfg: Config) -> int:
    """FedBuff's buffer size (default half of ``clients_per_round``); FedAsync's is one."""
    s = cfg.server
    return 1 if s.aggregation == "fedasync" else (s.buffer_size or max(1, s.clients_per_round // 2))


def secure_cohort(cfg: Config) -> int:
    """FedBuff with secure aggregation: the clients of one buffer's cohort, enough that ``buffer_size`` of them arrive
    when ``secagg.dropout_fraction`` drop (at most ``concurrency``)."""
    k = async_buffer(cfg)
    slots = cfg.server.concurrency or cfg.server.clients_per_round
    return max(k, min(slots, math.ceil(k / (1 - cfg.secagg.dropout_fraction) - 1e-9)))


def async_server(cfg: Config, strategy: Strategy) -> AsyncServer:
    """FedBuff with ``buffer_size`` (default half of ``clients_per_round``) or FedAsync (a buffer of one)."""
    return AsyncServer(strategy, async_buffer(cfg), polynomial_staleness(cfg.server.staleness_exponent))
