"""The config of a run, simulated or deployed: one dataclass per TOML section, each field with a default and a comment.

``load_config(path, overrides)`` reads a TOML file, applies ``key=value`` overrides and checks
every value before any data is loaded or model built; a bad value raises
:class:`fedloom.errors.ConfigError` naming the key (``client.lr: must be > 0, got -1.0``).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fedloom.errors import ConfigError

DATASETS = ("shakespeare", "synthetic", "digits", "breast_cancer", "leaf", "files", "hf", "site")
PARTITIONS = ("natural", "iid", "dirichlet", "dirichlet_balanced", "shards", "classes", "lognormal", "power_law")
MODELS = ("logreg", "mlp", "cnn", "char_lstm")
OPTIMIZERS = ("sgd", "momentum", "adagrad", "adam", "yogi")
ENGINES = ("auto", "sequential", "vectorized", "process", "ray")
DEVICES = ("cpu", "cuda")
STRAGGLERS = ("drop", "partial")
AGGREGATIONS = ("sync", "fedbuff", "fedasync")
SELECTIONS = ("uniform", "poisson", "oort", "power_of_choice")
REDUCERS = ("mean", "median", "trimmed_mean", "krum", "multi_krum")
WEIGHTINGS = ("examples", "uniform", "capped")
ATTACKS = ("", "sign_flip", "scale", "gaussian", "weight", "label_flip")


def _f(default: Any, doc: str, check: str = "") -> Any:
    """A field with its comment and an optional check: ``>0``, ``>=0``, ``>=1``, ``0..1`` or a tuple of choices."""
    kw = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(**kw, metadata={"doc": doc, "check": check})


@dataclass(frozen=True)
class RunConfig:
    name: str = _f("run", "name of the run; its folder is OUT_DIR/NAME-TIMESTAMP")
    seed: int = _f(0, "seeds model init, client selection and every local shuffle", ">=0")
    rounds: int = _f(20, "number of training rounds", ">=1")
    out_dir: str = _f("runs", "folder that receives run folders")
    client_metrics: bool = _f(False, "also write clients.csv: a row per asked client and round (accepted or the "
                                     "refusal's code, what the client reported, and its round trip on the simulated "
                                     "clock)")
    checkpoint_every: int = _f(10, "write checkpoint.npz every N rounds (and at the end and at Ctrl-C) for "
                                   "`fedloom simulate --resume`; 0 = only at the end and at Ctrl-C", ">=0")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _f("shakespeare", "shakespeare | synthetic | digits | breast_cancer | leaf | files (your CSV, "
                                     "Parquet or .npz: data.path) | hf (a Hugging Face dataset saved to disk: "
                                     "data.path) | site (a deployed site's own data only: data.path or "
                                     "data.loader; docs/deployment.md)", DATASETS)
    partition: str = _f("natural", "natural (one client per role/user) | iid | dirichlet | dirichlet_balanced (equal "
                                   "sizes) | shards | classes (classes_per_client each) | lognormal | power_law "
                                   "(quantity skew: size_skew)", PARTITIONS)
    num_clients: int = _f(0, "clients; 0 = the dataset's natural number (all roles, 1000 synthetic users)", ">=0")
    alpha: float = _f(0.5, "Dirichlet concentration for partition = dirichlet (smaller = more skew)", ">0")
    shards_per_client: int = _f(2, "label shards per client for partition = shards", ">=1")
    classes_per_client: int = _f(2, "classes each client holds for partition = classes", ">=1")
    size_skew: float = _f(1.0, "lognormal: sigma of the client sizes; power_law: the Pareto shape (smaller = "
                               "heavier tail)", ">0")
    synthetic_alpha: float = _f(1.0, "Synthetic(alpha, beta): spread of the clients' models", ">=0")
    synthetic_beta: float = _f(1.0, "Synthetic(alpha, beta): spread of the clients' features", ">=0")
    path: str = _f("", "leaf: training JSON file or folder; files: a CSV, Parquet or .npz file, or a folder of one "
                       "per client; hf: the folder of a dataset saved with save_to_disk")
    label_column: str = _f("label", "files, hf: the label column")
    client_column: str = _f("client", "files, hf: the client-id column (partition = natural)")
    hf_split: str = _f("train", "hf: the split of a saved DatasetDict")
    test_path: str = _f("", "leaf: test JSON file or folder; empty = split each user's samples")
    train_fraction: float = _f(0.8, "share of each client's samples for training; the rest is its test split", "0..1")
    seq_len: int = _f(80, "characters per input window for shakespeare", ">=1")
    loader: str = _f("", "your data: 'package.module:function' returning a FederatedDataset or (x, y, client_ids) "
                         "arrays (site: this site's (x, y)); empty = data.dataset")
    vocab: str = _f("", "site, leaf: the characters of a text model's vocabulary, the same at every site (character i "
                        "has id i); empty = leaf: every character of its files")


@dataclass(frozen=True)
class ModelConfig:
    name: str = _f("char_lstm", "logreg | mlp | cnn | char_lstm", MODELS)
    embed_dim: int = _f(8, "char_lstm: embedding size", ">=1")
    hidden_size: int = _f(128, "char_lstm: LSTM hidden units per layer", ">=1")
    num_layers: int = _f(1, "char_lstm: stacked LSTM layers", ">=1")
    hidden: list[int] = _f([64], "mlp: hidden layer widths")
    channels: int = _f(16, "cnn: channels of the first convolution", ">=1")
    factory: str = _f("", "your model: 'package.module:function' returning an nn.Module (given the FederatedDataset "
                          "if it takes an argument); empty = model.name")
    input_shape: list[int] = _f([], "one sample's shape (features: [30]; images: [1, 28, 28]), for a server that "
                                    "holds no data (data.dataset = \"site\"); empty = the data's")
    num_classes: int = _f(0, "classes the model predicts, for sites that each see only some of them; 0 = the data's "
                             "(char_lstm: the vocabulary's size)", ">=0")
    batchnorm: str = _f("global", "BatchNorm layers: global (aggregated like every parameter, running statistics "
                                  "included) | local (FedBN, Li et al. 2021: each client keeps its own; evaluation is "
                                  "federated)", ("global", "local"))


@dataclass(frozen=True)
class ClientConfig:
    lr: float = _f(1.0, "local SGD learning rate", ">0")
    batch_size: int = _f(10, "local mini-batch size", ">=1")
    local_epochs: int = _f(1, "passes over the local training split per round", ">=1")
    max_steps: int = _f(0, "cap on local SGD steps per round; 0 = no cap", ">=0")
    mu: float = _f(0.0, "FedProx proximal coefficient; 0 = plain FedAvg", ">=0")


@dataclass(frozen=True)
class ServerConfig:
    clients_per_round: int = _f(10, "clients asked per round (before over-selection)", ">=1")
    selection: str = _f("uniform", "sync: uniform (k of n) | poisson (each client with probability k/n) | oort "
                                   "(Lai et al. 2021) | power_of_choice (Cho et al. 2022)", SELECTIONS)
    choice_d: int = _f(0, "power_of_choice: clients drawn before the k highest-loss; 0 = 2 x clients_per_round",
                       ">=0")
    optimizer: str = _f("sgd", "sgd (FedAvg) | momentum (FedAvgM) | adagrad | adam | yogi", OPTIMIZERS)
    lr: float = _f(1.0, "server learning rate (1.0 with sgd = FedAvg)", ">0")
    momentum: float = _f(0.9, "momentum: server momentum coefficient", "0..1")
    beta1: float = _f(0.9, "adagrad/adam/yogi: first-moment decay", "0..1")
    beta2: float = _f(0.99, "adam/yogi: second-moment decay", "0..1")
    tau: float = _f(1e-3, "adagrad/adam/yogi: adaptivity (added to sqrt(v))", ">0")
    min_updates: int = _f(1, "valid updates needed to apply a round", ">=1")
    aggregation: str = _f("sync", "sync (rounds) | fedbuff (buffered asynchronous) | fedasync (buffer of one)",
                          AGGREGATIONS)
    concurrency: int = _f(0, "fedbuff/fedasync: clients training at once; 0 = clients_per_round", ">=0")
    buffer_size: int = _f(0, "fedbuff: arrivals per server update; 0 = half of clients_per_round", ">=0")
    staleness_exponent: float = _f(0.5, "fedbuff/fedasync: updates scaled by (1 + staleness) ** -exponent", ">=0")


@dataclass(frozen=True)
class EvalConfig:
    every: int = _f(5, "centralised evaluation every N rounds (and always after the last)", ">=1")
    max_examples: int = _f(0, "cap on centralised test samples (first N of the union); 0 = all", ">=0")
    federated_clients: int = _f(0, "clients that evaluate on their own test split when evaluating; 0 = none", ">=0")
    batch_size: int = _f(256, "evaluation batch size", ">=1")


@dataclass(frozen=True)
class EngineConfig:
    executor: str = _f("auto", "auto (chosen for the model, clients per round, cores and device; the run says which "
                               "and why) | sequential | vectorized (clients trained together) | process (all cores) | "
                               "ray", ENGINES)
    workers: int = _f(0, "process/ray: worker processes or actors; 0 = one per core (process) or per CPU (ray)",
                      ">=0")
    vectorize: bool = _f(True, "process/ray: each worker trains its share of the clients vectorized")
    group_size: int = _f(0, "vectorized: most clients trained together; 0 = all of a round's clients", ">=0")
    device: str = _f("cpu", "cpu | cuda: where clients train", DEVICES)
    ray_address: str = _f("", "ray: cluster address (\"auto\", \"ray://head:10001\"); empty = start a local Ray")


@dataclass(frozen=True)
class AggregationConfig:
    reducer: str = _f("mean", "mean (FedAvg) | median | trimmed_mean (Yin et al. 2018) | krum | multi_krum "
                              "(Blanchard et al. 2017)", REDUCERS)
    weighting: str = _f("examples", "examples (as each client reports, FedAvg) | uniform | capped (at most max_weight)",
                        WEIGHTINGS)
    max_weight: float = _f(0.0, "capped: the most examples one update counts for", ">=0")
    max_norm: float = _f(1e6, "refuse any update whose L2 norm is above this (corrupt or malicious); 0 = no limit",
                         ">=0")
    trim: float = _f(0.1, "trimmed_mean: fraction dropped at each end of every coordinate", "0..1")
    byzantine: int = _f(1, "krum/multi_krum: attackers tolerated (f); a round needs more than 2f + 2 updates", ">=0")
    krum_m: int = _f(0, "multi_krum: best updates averaged; 0 = n - f", ">=0")
    norm_bound: float = _f(0.0, "server clips each update to this L2 norm (Sun et al. 2019); 0 = off", ">=0")
    centered_clip: float = _f(0.0, "server clips each update's distance from the last aggregate to this "
                                   "(Karimireddy et al. 2021); 0 = off", ">=0")


@dataclass(frozen=True)
class PrivacyConfig:
    noise_multiplier: float = _f(0.0, "DP-FedAvg noise multiplier z (McMahan et al. 2018); 0 = no differential "
                                      "privacy", ">=0")
    clip: float = _f(1.0, "clip bound C of each update (the first one, with adaptive clipping)", ">0")
    target_quantile: float = _f(0.0, "adaptive clipping (Andrew et al. 2021): fraction of updates left unclipped; "
                                     "0 = a fixed bound", "0..1")
    clip_lr: float = _f(0.2, "adaptive clipping: learning rate of the bound (geometric steps)", ">0")
    local: bool = _f(False, "local DP: each client adds the noise to its own clipped update")
    delta: float = _f(1e-5, "delta of the (epsilon, delta) reported and budgeted", "0..1")
    epsilon_budget: float = _f(0.0, "stop training before epsilon would exceed this; 0 = no budget", ">=0")
    noise_seed: int = _f(-1, "deployed server and clients: a fixed noise seed, for tests only; -1 = the OS's "
                             "secure random source (a simulation's noise follows run.seed)")


@dataclass(frozen=True)
class SecAggConfig:
    mode: str = _f("off", "secure aggregation, the server sees only the sum of a round's updates "
                          "(docs/secure-aggregation.md): off | secagg (Bonawitz et al. 2017: every pair of clients "
                          "masks) | secagg+ (Bell et al. 2020: O(log n) neighbours each)", ("off", "secagg", "secagg+"))
    bits: int = _f(32, "width of a masked value, 2..32 (a round's sum must fit); a uniformB uplink codec sets the "
                       "fewest that hold its levels' sum", ">=1")
    threshold: float = _f(0.5, "secagg: fraction of a round's clients whose shares rebuild a secret (secagg+ takes "
                               "it from its analysis)", "0..1")
    corrupt_fraction: float = _f(1 / 3, "secagg+: fraction of clients assumed to collude with the server", "0..1")
    dropout_fraction: float = _f(0.1, "fraction of a round's clients that may drop out; with DP, a round needs the "
                                      "rest (its noise is shared among them)", "0..1")


@dataclass(frozen=True)
class AttackConfig:
    kind: str = _f("", "simulated attackers: empty = none | sign_flip | scale (a poisoned model, boosted) | "
                       "weight (a poisoned model claiming 10^12 examples) | gaussian | label_flip", ATTACKS)
    fraction: float = _f(0.0, "fraction of the clients that attack (drawn from run.seed)", "0..1")
    strength: float = _f(10.0, "sign_flip and scale: the factor; gaussian: the noise's std", ">0")


@dataclass(frozen=True)
class CompressionConfig:
    uplink: str = _f("none", "codec of each client's update: none | uniform1..uniform8 (stochastic, per-chunk "
                             "scales; +rotate: randomized Hadamard first) | qsgd, qsgdS (S levels) | topkF, randkF "
                             "(a fraction F of the values; +uniformB: those values at B bits), e.g. topk0.01+uniform8")
    downlink: str = _f("none", "codec of the broadcast model (same forms as uplink); clients train from its decoding")
    error_feedback: bool = _f(False, "each client adds what its last compressed update left out (Seide et al. 2014, "
                                     "Karimireddy et al. 2019); kept in its client state")
    chunk: int = _f(1024, "values per quantization scale (a power of two with +rotate)", ">=1")


@dataclass(frozen=True)
class HeteroConfig:
    population: str = _f("", "device population: empty = none (no simulated clock), mobile, silo, or a CSV/JSON trace")
    flops_per_sample: float = _f(0.0, "training FLOPs per sample; 0 = 6 x parameters x targets per sample", ">=0")
    deadline_s: float = _f(0.0, "round deadline in simulated seconds (deployed: wall-clock seconds); 0 = wait for "
                                "every kept client", ">=0")
    over_select: float = _f(1.0, "ask this many times clients_per_round, keep the first clients_per_round arrivals",
                            ">=1")
    stragglers: str = _f("drop", "with a deadline: drop late clients, or ask them for the partial work that fits",
                         STRAGGLERS)
    trip_budget: int = _f(0, "stop once this many client trips were sent (equal-cost comparisons); 0 = no limit",
                          ">=0")


@dataclass(frozen=True)
class DeployConfig:
    address: str = _f("127.0.0.1:7443", "server: HOST:PORT to listen on; client: the server to connect to")
    state_dir: str = _f("fedloom-server", "server: folder of its SQLite state, checkpoints and client tokens")
    clients: list[str] = _f([], "server: client names enrolled at first start (ids 0..n-1; tokens in state_dir/tokens)")
    min_clients: int = _f(1, "server: clients that must have joined before the first round", ">=1")
    round_timeout_s: float = _f(600.0, "server: longest wait for a round's replies", ">0")
    heartbeat_s: float = _f(5.0, "seconds between client heartbeats; a client silent for 3 of them is lost", ">0")
    max_message_mb: int = _f(256, "largest message accepted, checked before allocation", ">=1")
    max_examples: int = _f(1_000_000, "server: most examples a client may claim for one task (train weight, "
                                      "evaluation count); a larger claim is refused", ">=1")
    client_calls: int = _f(4, "server: polls and heartbeats one client may have open at once (its pushes: one per "
                              "task it owes); more are refused", ">=1")
    join_calls: int = _f(64, "server: Join calls in flight at once over all connections (not yet authenticated); "
                             "more are refused", ">=1")
    recv_timeout_s: float = _f(30.0, "server: longest wait for a call's next message (a request, a chunk of a push); "
                                     "a slower sender is cut off", ">0")
    session_s: float = _f(3600.0, "server: lifetime of a session; then the client joins again by itself", ">0")
    inflight_mb: int = _f(512, "server: bytes of replies being received or decoded at once, over all clients; "
                               "more wait", ">=1")
    min_chunk_kb: int = _f(64, "server: every chunk of a push but the last carries at least this many KiB",
                           ">=1")
    tls: bool = _f(True, "encrypt with TLS (false only for local experiments)")
    mutual_tls: bool = _f(False, "server: also require client certificates signed by ca")
    ca: str = _f("", "CA certificate (PEM): the client trusts it; with mutual_tls the server checks clients with it")
    cert: str = _f("", "this process's certificate (PEM): the server's, or the client's for mutual TLS")
    key: str = _f("", "this process's private key (PEM)")
    name: str = _f("", "client: its enrolled name")
    token_file: str = _f("", "client: file holding its enrolment token")
    client_index: int = _f(0, "client: which client of the configured dataset holds this process's data (not with "
                              "data.dataset = \"site\": the site's data is all its own)", ">=0")
    test_data: str = _f("", "server: its own test set for centralised evaluation (CSV, Parquet, .npz, LEAF .json or a "
                            "folder of .txt, read as a site's data); empty = the dataset's held-out splits (site: "
                            "none, so evaluation is federated)")
    reconnect_s: float = _f(3600.0, "client: how long it keeps trying to reach a server that is down before it "
                                    "gives up (exit 2); 0 = forever", ">=0")
    client_state_dir: str = _f("", "client: folder of what it keeps between rounds (error feedback, FedBN's layers); "
                                   "empty = fedloom-client-NAME")


@dataclass(frozen=True)
class LogConfig:
    tensorboard: bool = _f(False, "also write the metrics.csv numbers as TensorBoard scalars in RUN_DIR/tensorboard "
                                  "(pip install 'fedloom[tensorboard]')")
    mlflow: str = _f("", "also log the run to MLflow: a local folder such as \"mlruns\" (MLflow's file store) or "
                         "a tracking server's URI (http://HOST:5000); empty = off (pip install 'fedloom[mlflow]')")


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    hetero: HeteroConfig = field(default_factory=HeteroConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _check_value(key: str, value: Any, expected: Any, check: Any) -> Any:
    """Return ``value`` converted to the field's type, or raise ConfigError naming ``key``."""
    if expected in (int, "int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}")
    elif expected in (float, "float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"must be a number, got {value!r}")
        value = float(value)
        if value != value:
            raise ConfigError(key, "must be a number, got nan")
    elif expected in (bool, "bool"):
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
    elif expected in (str, "str"):
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
    elif expected in (list[str], "list[str]"):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(key, f"must be a list of non-empty strings, got {value!r}")
    elif expected in (list[int], "list[int]"):
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                  for v in value):
            raise ConfigError(key, f"must be a list of positive integers, got {value!r}")
    if isinstance(check, tuple) and value not in check:
        raise ConfigError(key, f"must be one of {', '.join(check)}; got {value!r}")
    bounds = {">0": lambda v: v > 0, ">=0": lambda v: v >= 0, ">=1": lambda v: v >= 1, "0..1": lambda v: 0 <= v <= 1}
    if isinstance(check, str) and check and not bounds[check](value):
        rule = {"0..1": "between 0 and 1"}.get(check, check.replace(">=", ">= ").replace(">0", "> 0"))
        raise ConfigError(key, f"must be {rule}, got {value!r}")
    return value


def _section(cls: type, key: str, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(key, f"must be a table, got {values!r}")
    known = {f.name: f for f in fields(cls)}
    for name in values:
        if name not in known:
            raise ConfigError(f"{key}.{name}", f"unknown setting; known: {', '.join(known)}")
    kwargs = {}
    for name, value in values.items():
        f = known[name]
        kwargs[name] = _check_value(f"{key}.{name}", value, f.type, f.metadata["check"])
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and check a :class:`Config` from parsed TOML."""
    sections = {f.name: f for f in fields(Config)}
    for name in raw:
        if name not in sections:
            raise ConfigError(name, f"unknown section; known: {', '.join(sections)}")
    base = Config()
    parts = {name: _section(type(getattr(base, name)), name, raw.get(name, {})) for name in sections}
    return _check_whole(Config(**parts))


def _check_whole(cfg: Config) -> Config:
    """Checks that involve more than one field."""
    d = cfg.data
    if d.dataset == "site":
        _check_site(cfg)
    elif not d.loader:
        _check_dataset(cfg)
    if cfg.hetero.trip_budget and not cfg.hetero.population:
        raise ConfigError("hetero.trip_budget", "counts trips on the simulated clock: name a device population")
    if cfg.server.aggregation != "sync" and cfg.server.selection != "uniform":
        raise ConfigError("server.selection", f"{cfg.server.selection} picks the clients of synchronous rounds; "
                                              f"{cfg.server.aggregation} sends work to available clients uniformly")
    _check_aggregation(cfg)
    _check_compression(cfg)
    _check_secagg(cfg)
    if not 0 < d.train_fraction < 1:
        raise ConfigError("data.train_fraction", f"must be strictly between 0 and 1, got {d.train_fraction}")
    return cfg


def _check_dataset(cfg: Config) -> None:
    """The built-in datasets' own settings, and the built-in models they fit."""
    d = cfg.data
    if d.dataset in ("shakespeare", "synthetic", "leaf") and d.partition != "natural":
        raise ConfigError("data.partition", f"{d.dataset} is split by its natural key; use partition = \"natural\"")
    if d.dataset in ("digits", "breast_cancer") and d.partition == "natural":
        raise ConfigError("data.partition", f"{d.dataset} has no natural clients; use iid, dirichlet, "
                                            "dirichlet_balanced, shards, classes, lognormal or power_law")
    if d.dataset in ("digits", "breast_cancer") and d.num_clients < 1:
        raise ConfigError("data.num_clients", f"{d.dataset} needs num_clients >= 1")
    if d.dataset in ("leaf", "files", "hf") and not d.path:
        raise ConfigError("data.path", f"{d.dataset} needs the path of its file or folder")
    text = {"shakespeare": True, "leaf": None}.get(d.dataset, False)  # LEAF holds either: checked when loaded
    if not cfg.model.factory and text is not None and text != (cfg.model.name == "char_lstm"):
        raise ConfigError("model.name", f"{cfg.model.name!r} does not fit dataset {d.dataset!r}; "
                                        "char_lstm is for character data, the others for feature data")


def _check_site(cfg: Config) -> None:
    """A site's data sets neither the classes nor (on a server that holds none) the inputs: the config does."""
    m = cfg.model
    if m.factory:
        return
    if m.name == "char_lstm" and not cfg.data.vocab:
        raise ConfigError("data.vocab", "char_lstm on sites' own text needs the vocabulary every site shares (the "
                                        "characters, in id order)")
    if m.name != "char_lstm" and not m.num_classes:
        raise ConfigError("model.num_classes", "each site sees only its own labels: give the number of classes")
    if m.num_classes and m.name == "char_lstm" and m.num_classes != len(cfg.data.vocab):
        raise ConfigError("model.num_classes", f"char_lstm predicts the vocabulary's {len(cfg.data.vocab)} "
                                               f"characters, not {m.num_classes}; leave it 0")


def _check_aggregation(cfg: Config) -> None:
    """The aggregation, privacy and attack settings that do not work together."""
    a, p, s = cfg.aggregation, cfg.privacy, cfg.server
    if a.weighting == "capped" and not a.max_weight > 0:
        raise ConfigError("aggregation.max_weight", "capped weighting needs max_weight > 0")
    if a.reducer in ("krum", "multi_krum"):
        per = s.clients_per_round if s.aggregation == "sync" else (s.buffer_size or max(1, s.clients_per_round // 2))
        if per <= 2 * a.byzantine + 2:
            raise ConfigError("aggregation.byzantine", f"{a.reducer} against f={a.byzantine} needs more than "
                                                       f"{2 * a.byzantine + 2} updates per aggregation; it gets {per}")
    if s.aggregation == "sync" and s.selection != "poisson" and s.min_updates > s.clients_per_round:
        raise ConfigError("server.min_updates", f"a round needs {s.min_updates} valid updates but asks only "
                                                f"{s.clients_per_round} clients (server.clients_per_round): no round "
                                                "could ever be applied")
    if (cfg.attack.kind == "") != (cfg.attack.fraction == 0):
        raise ConfigError("attack.kind", "a simulated attack needs both a kind and a fraction > 0")
    if s.selection == "poisson" and s.aggregation != "sync":
        raise ConfigError("server.selection", "poisson sampling picks the clients of synchronous rounds")
    if not p.noise_multiplier:
        return
    why = None
    if a.reducer != "mean":
        why = (f"DP noise is calibrated for the mean of clipped updates; aggregation.reducer = {a.reducer!r} has "
               "another sensitivity", "aggregation.reducer")
    elif a.weighting != "uniform":
        why = ("DP-FedAvg weighs every update the same (a weight would be part of a client's sensitivity): set "
               "aggregation.weighting = \"uniform\"", "aggregation.weighting")
    elif a.centered_clip:
        why = ("centered clipping moves updates out of the clip ball DP is calibrated to", "aggregation.centered_clip")
    elif s.selection not in ("uniform", "poisson"):
        why = (f"the accountant covers uniform and poisson sampling; {s.selection} chooses clients by what they "
               "reported", "server.selection")
    elif p.local and p.target_quantile:
        why = ("adaptive clipping learns from norms the server cannot see under local noise: use a fixed clip",
               "privacy.target_quantile")
    if why:
        raise ConfigError(why[1], why[0])


def _check_compression(cfg: Config) -> None:
    """The codecs parse, and FedBN's evaluation is federated."""
    from fedloom.compression.updates import codec

    c = cfg.compression
    for key in ("uplink", "downlink"):
        try:
            codec(getattr(c, key), c.chunk)
        except ValueError as exc:
            raise ConfigError(f"compression.{key}", str(exc)) from None
    if c.error_feedback and c.uplink == "none":
        raise ConfigError("compression.error_feedback", "keeps what a compressed update left out: set an uplink codec")
    reducer = cfg.aggregation.reducer
    if c.uplink.startswith(("topk", "randk")) and reducer in ("median", "trimmed_mean"):
        raise ConfigError("aggregation.reducer", f"{reducer} works coordinate by coordinate, and a sparsified update "
                                                 f"({c.uplink}) is zero almost everywhere: the aggregate would be zero "
                                                 "wherever most clients sent nothing. Use mean or (multi_)krum with "
                                                 "norm_bound, or a quantizing uplink codec")
    if cfg.model.batchnorm == "local" and not cfg.eval.federated_clients:
        raise ConfigError("eval.federated_clients", "with model.batchnorm = \"local\" (FedBN) every client keeps "
                                                   "its own BatchNorm layers, so the server's model has none worth "
                                                   "testing: evaluate on the clients (eval.federated_clients > 0)")


def _check_secagg(cfg: Config) -> None:
    """What secure aggregation cannot run with: whatever needs to see one client's update on the server."""
    g, a, p, s, c = cfg.secagg, cfg.aggregation, cfg.privacy, cfg.server, cfg.compression
    if g.mode == "off":
        return
    sees = "needs each update on its own, and secure aggregation shows the server only the sum"
    why = None
    if not 2 <= g.bits <= 32:
        why = ("secagg.bits", f"must be 2..32, got {g.bits}")
    elif not 0 < g.threshold <= 1 or not g.dropout_fraction < 1 or not g.corrupt_fraction < 1:
        why = ("secagg.threshold", "threshold must be in (0, 1], corrupt_fraction and dropout_fraction below 1")
    elif a.reducer != "mean":
        why = ("aggregation.reducer", f"{a.reducer} {sees}: use mean")
    elif a.weighting == "examples":
        why = ("aggregation.weighting", "a client's weight is summed securely with its update, so it needs a known "
                                        "range: use uniform, or capped with max_weight (each client weighs its "
                                        "update by min(examples, max_weight) / max_weight)")
    elif a.norm_bound or a.centered_clip:
        why = ("aggregation.norm_bound" if a.norm_bound else "aggregation.centered_clip",
               f"the server's clipping {sees}; every update is clipped to privacy.clip on its client instead")
    elif p.target_quantile:
        why = ("privacy.target_quantile", f"adaptive clipping counts unclipped updates on the server and {sees}")
    elif s.aggregation == "fedasync":
        why = ("server.aggregation", "fedasync applies each update alone: there is no sum to hide it in (use fedbuff)")
    elif (s.clients_per_round if s.aggregation == "sync" else (s.buffer_size or max(1, s.clients_per_round // 2))) < 3:
        why = ("server.clients_per_round", "secure aggregation needs at least 3 clients per round (per buffer)")
    elif s.aggregation == "fedbuff" and (s.buffer_size or 0) > (s.concurrency or s.clients_per_round):
        why = ("server.buffer_size", "secure FedBuff sums each buffer over one cohort of clients training at once: "
                                     "buffer_size must not exceed server.concurrency (or clients_per_round)")
    elif g.mode == "secagg+" and (bad := _secagg_plus_unfit(g, s.clients_per_round)):
        why = ("secagg.corrupt_fraction", bad)
    elif c.uplink != "none" and not (c.uplink.startswith("uniform") and c.uplink[7:].isdigit()):
        why = ("compression.uplink", f"secure aggregation sums updates in its own fixed-point integers; {c.uplink} "
                                     "cannot be summed masked. A uniformB codec is (its levels are the fixed point)")
    elif c.error_feedback:
        why = ("compression.error_feedback", "secure aggregation rounds stochastically without bias; there is no "
                                             "residual to feed back")
    if why:
        raise ConfigError(*why)


def _secagg_plus_unfit(g: SecAggConfig, n: int) -> str:
    """Why SecAgg+ has no secure and correct degree and threshold for ``n`` clients at these fractions (or "")."""
    if g.corrupt_fraction + g.dropout_fraction >= 1:
        return "corrupt_fraction + dropout_fraction must be below 1: no threshold is both secure and reachable"
    if n < 4:
        return ""
    from fedloom.secagg.primitives import secagg_plus_parameters

    try:
        secagg_plus_parameters(n, g.corrupt_fraction, g.dropout_fraction)
    except ValueError as exc:
        return str(exc)
    return ""


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"client.lr=0.5"`` -> ``(["client", "lr"], 0.5)``; the value is read as TOML, else as a string."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(key.strip() or item, "overrides look like section.key=value")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return parts, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML config (or the defaults when ``path`` is None) and apply ``section.key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("config", f"no such file: {path}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    for item in overrides:
        (section, key), value = parse_override(item)
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(section, f"must be a table, got {table!r}")
        table[key] = value
    return config_from_dict(raw)


def with_rounds(cfg: Config, rounds: int) -> Config:
    """``cfg`` with ``run.rounds`` replaced (checked)."""
    return replace(cfg, run=_section(RunConfig, "run", {**cfg.run.__dict__, "rounds": rounds}))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def to_toml(cfg: Config) -> str:
    """The whole config as commented TOML (what a run folder keeps, and a template to start from)."""
    lines = []
    for sec in fields(Config):
        lines.append(f"[{sec.name}]")
        part = getattr(cfg, sec.name)
        for f in fields(part):
            lines.append(f"{f.name} = {_toml_value(getattr(part, f.name))}  # {f.metadata['doc']}")
        lines.append("")
    return "\n".join(lines)
