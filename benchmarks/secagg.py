"""Secure aggregation's cost: a SecAgg+ round against the same round without it.

    python -m benchmarks.run secagg                        # n = 50, 100, 200; d = 100k, 1M; dropout 0, 10%
    python -m benchmarks.run secagg --tasks 100:1000000:0.1 --repeat 5   # points as n:d:dropout
    python -m benchmarks.run secagg --tasks 500:100000:0.1:secagg --repeat 1   # Bonawitz et al.'s complete graph

One JSON line per point on stdout with exactly the issue's fields: ``n`` (clients asked), ``d`` (model
values), ``dropout`` (fraction of the clients that drop out), ``server_s``, ``client_s`` (the slowest
client), ``ratio`` (the secure round's critical path over the plain round's) and ``bytes_ratio`` (the most
bytes a surviving client uploads in the secure round, all its steps, over its plain float32 train reply).
The rest of each point goes to stderr (``benchmarks/rows.py``): the plain round's server and client
seconds, each round's critical path and sequential wall time, clients' mean seconds, bytes, the
protocol's degree and threshold, peak RSS, and the check of the secure sum.

What a round is. The server and clients are built from the config as the simulation builds them:
``secagg.mode = "secagg+"`` (or ``"secagg"``, Bonawitz et al. 2017: every pair masks, the threshold half the
clients, for a point given as ``n:d:dropout:secagg``), ``"off"`` for the plain round;
``aggregation.weighting = "uniform"``, every client asked, ``secagg.dropout_fraction`` left at its
default 0.1 for both dropout rows (the protocol is provisioned for 10%, and a round does not know
beforehand how many leave). The model is a ``torch.nn.Linear(d / 10 - 1, 10)``, exactly d parameters;
each client trains it for one real SGD step (a batch of 8 synthetic samples, features N(0, 1/in_features),
lr 0.1) with ``TorchClientWork`` and the client pipeline, so the updates (norms 0.04 to 0.07) are never
clipped by ``privacy.clip = 1``. Dropped clients (``dropout * n`` of them, drawn from seed 0, the same in
both rounds) answer the training with an error reply: the worst case, since they already shared keys, so
the server rebuilds their mask keys and removes their pairwise masks.

What is timed. Every message crosses the wire codec a deployment uses (``wire.to_envelope`` and
``SerializeToString`` by the sender, ``Envelope.FromString`` and ``wire.from_envelope`` by the
receiver). A client's seconds are its decode of each request, its state files (read and written:
a deployed client keeps them on its own disk), its work (training, masking, key steps) and its encode
of each reply, summed over the round's steps. The server's seconds are everything else in the
round: selection, its encodes of the requests and decodes of the replies, the round generator,
unmasking, aggregation and the optimizer step. In a federation clients run in parallel on their own
devices, so a round's critical path is ``server_s`` plus the slowest client's ``client_s``; ``ratio``
compares these. (Network time is left out; ``bytes_ratio`` says what the secure round adds to it.)
Here the clients run one after another in this process, so ``*_wall_s`` is that sequential
simulation's time. Each point runs in its own child process (its peak RSS is its own;
``plain_peak_rss_mb`` is the peak after the plain warm-up round): one untimed plain and one untimed
secure round, then ``--repeat`` pairs of a plain and a secure round (default 3; interleaved, so that
other work on the machine weighs on both alike), each from the same initial model; the fastest
critical path of each kind counts. It runs on one thread (``OMP_NUM_THREADS=1``: a client is one
device, and a second torch thread only adds waits when the machine is shared). Every time is also
taken in CPU seconds of the process (the ``cpu_*`` fields and ``cpu_ratio``, from each kind's round with
the least CPU on its critical path): on a shared machine the wall-clock figures include time the machine
gave other work, the CPU figures do not. The secure sum is checked against the plain one: their new
global models must agree within the fixed-point step (bound / levels) and float32 rounding.

The work no implementation of the protocol avoids. ``masks`` is how many masks of d words the server
regenerated to unmask (``secagg.masks``: each survivor's self mask, each pair mask a survivor shared with
a dropped client); ``mask_s`` is one of them (an AES-CTR expansion subtracted from a sum) timed alone in
this process on one core, the fastest of 40; ``mask_work_s`` = masks x mask_s, and ``mask_work_ratio`` is
that over the plain round's critical path. The secure server does this besides what the plain one does
(encoding the model for each client, decoding the updates, aggregating), so a ``ratio`` of 1.5 needs
``mask_work_ratio`` well under 0.5 on one core.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.rows import emit

FIELDS = ("n", "d", "dropout", "server_s", "client_s", "ratio", "bytes_ratio")
POINTS = tuple((n, d, p) for d in (100_000, 1_000_000) for n in (50, 100, 200) for p in (0.0, 0.1))
CLASSES = 10
SAMPLES = 8  # per client: one batch, one local step
POOL = 64  # distinct feature rows; each client's batch is a view of SAMPLES consecutive ones
REPEAT = 3
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def in_features(d: int) -> int:
    """Inputs of a Linear layer to CLASSES outputs with exactly d parameters (weights and biases)."""
    if d % CLASSES or d // CLASSES < 2:
        raise ValueError(f"d must be a multiple of {CLASSES} of at least {2 * CLASSES}, got {d}")
    return d // CLASSES - 1


def synthetic_clients(n: int, d: int, seed: int = 0):
    """n clients of SAMPLES synthetic examples each (features N(0, 1/in), labels uniform); no test split."""
    from fedloom.data.dataset import ClientDataset, FederatedDataset

    k = in_features(d)
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal((POOL + SAMPLES, k), dtype=np.float32) / np.float32(math.sqrt(k)))
    labels = rng.integers(0, CLASSES, (n, SAMPLES)).astype(np.int64)
    empty_x, empty_y = np.zeros((0, k), np.float32), np.zeros(0, np.int64)
    clients = [ClientDataset(i, pool[i % POOL:i % POOL + SAMPLES], labels[i], empty_x, empty_y) for i in range(n)]
    return FederatedDataset(f"secagg-synthetic-{n}x{d}", clients, CLASSES)


def config(n: int, mode: str):
    from fedloom.config import load_config

    return load_config(None, [f"secagg.mode=\"{mode}\"", "aggregation.weighting=\"uniform\"",
                              f"server.clients_per_round={n}", "engine.executor=\"sequential\"", "client.lr=0.1",
                              f"client.batch_size={SAMPLES}", "client.max_steps=1", "run.seed=0"])


def _now() -> np.ndarray:
    """Wall-clock and CPU seconds of this process (the CPU figure leaves out time the machine gave other work)."""
    return np.array([time.perf_counter(), time.process_time()])


@dataclass
class Timed:
    """A transport that sends every message through the wire codec and times each side's part of it.

    ``engine`` serves one request at a time (the in-process clients, with their state files when they keep
    state); ``dropped`` clients answer their train request with an error reply, without training. Times are
    pairs: (wall-clock, CPU) seconds.
    """

    engine: object
    dropped: frozenset[int] = frozenset()
    client_s: dict[int, np.ndarray] = field(default_factory=dict)  # each client's side this round
    up: dict[int, int] = field(default_factory=dict)  # bytes each client uploaded (message_size of its replies)
    down: dict[int, int] = field(default_factory=dict)
    untimed: np.ndarray = field(default_factory=lambda: np.zeros(2))  # this bookkeeping's own, out of the server's

    def reset(self) -> None:
        self.client_s, self.up, self.down, self.untimed = {}, {}, {}, np.zeros(2)

    def exchange(self, requests: Sequence) -> list:
        from fedloom.messages import TrainRequest, error_reply
        from fedloom.transport import wire
        from fedloom.transport.proto import fedloom_pb2 as pb

        replies = []
        for q in requests:
            cid = q.client_id
            sent = wire.to_envelope(q).SerializeToString()  # server
            t0 = _now()
            if isinstance(q, TrainRequest) and cid in self.dropped:  # not the server's work either
                reply = error_reply(q, "dropped", "this client left the round (benchmark)")
                data = wire.to_envelope(reply).SerializeToString()
            else:
                asked = wire.from_envelope(pb.Envelope.FromString(sent))  # client
                del sent
                (reply,) = self.engine.exchange([asked])  # type: ignore[attr-defined]
                data = wire.to_envelope(reply).SerializeToString()
                self.client_s[cid] = self.client_s.get(cid, 0.0) + (_now() - t0)
                t0 = _now()
            size = wire.message_size(reply)
            assert size == len(data), (size, len(data))
            self.up[cid] = self.up.get(cid, 0) + size
            self.down[cid] = self.down.get(cid, 0) + wire.message_size(q)
            del reply
            self.untimed += _now() - t0
            replies.append(wire.from_envelope(pb.Envelope.FromString(data)))  # server
        return replies

    def close(self) -> None:
        self.engine.close()  # type: ignore[attr-defined]


@dataclass
class Side:
    """One kind of round (plain or secure), built from its config."""

    server: object
    state: object  # the initial server state: every round starts from it
    transport: Timed
    secure: object | None


def build(n: int, d: int, mode: str, dropped: frozenset[int]) -> Side:
    from torch import nn

    from fedloom.build import build_clients, build_strategy
    from fedloom.server import SyncServer
    from fedloom.simulation.runner import build_engine

    cfg = config(n, mode)
    work, dataset = build_clients(cfg, lambda: nn.Linear(in_features(d), CLASSES), synthetic_clients(n, d))
    strategy = build_strategy(cfg, n)
    server = SyncServer(strategy, n)
    state = server.init(work.initial_params(cfg.run.seed))
    engine = build_engine(cfg, work, dataset)
    return Side(server, state, Timed(engine, dropped), strategy.secure)


def one_round(side: Side) -> dict:
    """One timed round from ``side.state``: its seconds (wall-clock; ``cpu_*`` the CPU's), bytes, result and model."""
    from fedloom.rounds import Immediate, drive

    t = side.transport
    t.reset()
    t0 = _now()
    requests, state = side.server.train_requests(side.state)  # type: ignore[attr-defined]
    result, after = drive(side.server.round(state, requests), t, Immediate())  # type: ignore[attr-defined]
    total = _now() - t0 - t.untimed
    server = total - sum(t.client_s.values())
    slowest = np.max(list(t.client_s.values()), axis=0)  # each clock's slowest client
    kept = [c for c in t.client_s if c not in t.dropped]
    mean = np.mean([t.client_s[c] for c in kept], axis=0)
    out = {"up": max(t.up[c] for c in kept), "down": max(t.down[c] for c in kept), "result": result,
           "params": after.params}
    for i, prefix in enumerate(("", "cpu_")):
        out.update({prefix + "wall_s": float(total[i]), prefix + "server_s": float(server[i]),
                    prefix + "client_s": float(slowest[i]), prefix + "client_mean_s": float(mean[i]),
                    prefix + "critical_s": float(server[i] + slowest[i])})
    return out


def check_sum(plain: dict, secure: dict, side: Side, n: int, dropped: frozenset[int]) -> float:
    """The largest difference between the two rounds' new models; AssertionError beyond the fixed-point step."""
    for r in (plain, secure):
        result = r["result"]
        assert not result.problem, result.problem
        assert sorted(result.accepted) == sorted(set(range(n)) - dropped), (result.accepted, result.rejected)
    s = side.secure
    step = s.bound / s.levels  # type: ignore[attr-defined]
    error = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(plain["params"], secure["params"]))
    scale = max(float(np.max(np.abs(a))) for a in plain["params"])
    assert error <= step + 4 * np.finfo(np.float32).eps * scale, f"the secure sum differs by {error} (step {step})"
    return error


def mask_seconds(d: int, bits: int, count: int = 40) -> float:
    """One mask's part of the unmasking on one core: an AES-CTR expansion of d words subtracted from a sum
    (the fastest of ``count``, with the server's own functions)."""
    from fedloom.secagg.primitives import KEY_BYTES, expand, sub_mod, word_dtype

    total = np.zeros(d, word_dtype(bits))
    times = []
    for i in range(count):
        t0 = time.perf_counter()
        sub_mod(total, expand(i.to_bytes(KEY_BYTES, "little"), d, bits, reuse=True), bits, out=total)
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(n: int, d: int, dropout: float, repeat: int = REPEAT, mode: str = "secagg+") -> dict:
    """One point, both rounds, in this process: its full record (see the module docstring)."""
    count = math.floor(dropout * n + 1e-9)
    dropped = frozenset(int(c) for c in np.random.default_rng(0).choice(n, count, replace=False))
    plain_side = build(n, d, "off", dropped)
    one_round(plain_side)  # warm-up
    plain_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    secure_side = build(n, d, mode, dropped)
    one_round(secure_side)
    runs = [(one_round(plain_side), one_round(secure_side)) for _ in range(repeat)]  # interleaved: the same load
    fastest = {(i, c): min((run[i] for run in runs), key=lambda r: r[c + "critical_s"]) for i in (0, 1) for c in
               ("", "cpu_")}
    plain, secure = fastest[0, ""], fastest[1, ""]
    error = check_sum(plain, secure, secure_side, n, dropped)
    s = secure_side.secure
    k, t = s.parameters(n)  # type: ignore[attr-defined]
    for side in (plain_side, secure_side):
        side.transport.close()
    record = {"n": n, "d": d, "dropout": dropout, "server_s": secure["server_s"], "client_s": secure["client_s"],
              "ratio": round(secure["critical_s"] / plain["critical_s"], 2),
              "bytes_ratio": round(secure["up"] / plain["up"], 4)}
    for c in ("", "cpu_"):  # the CPU view: each kind's round with the least CPU on its critical path
        for prefix, r in (("", fastest[1, c]), ("plain_", fastest[0, c])):
            record.update({prefix + c + key: r[c + key] for key in ("server_s", "client_s", "client_mean_s",
                                                                    "critical_s", "wall_s")
                           if prefix + c + key not in record})
    record["cpu_ratio"] = fastest[1, "cpu_"]["cpu_critical_s"] / fastest[0, "cpu_"]["cpu_critical_s"]
    record = {key: round(v, 2 if key == "cpu_ratio" else 3) if isinstance(v, float) and key != "dropout" else v
              for key, v in record.items()}
    record.update(wall_ratio=round(secure["wall_s"] / plain["wall_s"], 2), bytes_up=secure["up"],
                  plain_bytes_up=plain["up"], bytes_down=secure["down"], plain_bytes_down=plain["down"],
                  mode=mode, dropped=len(dropped), degree=k, threshold=t, bits=s.bits,  # type: ignore[attr-defined]
                  max_abs_error=float(f"{error:.3g}"), step=float(f"{s.bound / s.levels:.3g}"),  # type: ignore
                  repeat=repeat, plain_peak_rss_mb=round(plain_rss, 1),
                  peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    masks = int(secure["result"].measurements["secagg.masks"])  # the unmasking's unavoidable work
    one = float(f"{mask_seconds(d, s.bits):.3g}")  # type: ignore[attr-defined]
    record.update(masks=masks, mask_s=one, mask_work_s=float(f"{masks * one:.3g}"),
                  mask_work_ratio=round(masks * one / plain["critical_s"], 2))
    return record


def parse_points(tasks: Sequence[str] | None) -> list[tuple[int, int, float, str]]:
    """Points as ``n:d:dropout`` or ``n:d:dropout:mode`` (mode: secagg+, the default, or secagg)."""
    if not tasks:
        return [(*point, "secagg+") for point in POINTS]
    points = []
    for task in tasks:
        n, d, p, *mode = task.split(":")
        points.append((int(n), int(float(d)), float(p), mode[0] if mode else "secagg+"))
    return points


def run_secagg(tasks: Sequence[str] | None = None, repeat: int = REPEAT) -> list[dict]:
    """Each point in its own child process (its peak RSS its own); print each record (``rows.emit``)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, **dict.fromkeys(THREAD_VARS, "1")}
    records = []
    for n, d, p, mode in parse_points(tasks):
        done = subprocess.run([sys.executable, "-m", "benchmarks.secagg", f"{n}:{d}:{p}:{mode}", str(repeat)], cwd=root,
                              env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(json.dumps({"n": n, "d": d, "dropout": p, "error": done.stderr.strip()[-800:]}), flush=True)
            continue
        record = json.loads(done.stdout.strip().splitlines()[-1])
        emit(record, FIELDS)
        records.append(record)
    return records


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.secagg", description="one point, in this process")
    parser.add_argument("point", help="n:d:dropout[:mode]")
    parser.add_argument("repeat", type=int, nargs="?", default=REPEAT)
    args = parser.parse_args()
    ((n, d, p, mode),) = parse_points([args.point])
    print(json.dumps(measure(n, d, p, args.repeat, mode)), flush=True)
