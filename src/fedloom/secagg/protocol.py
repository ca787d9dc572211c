"""Secure aggregation's round, server side: a generator of exchanges with no I/O.

The protocol of Bonawitz et al. (CCS 2017, [B17]) with the sparse graph of SecAgg+ (Bell et al.,
CCS 2020, [B20]); the cryptography is in ``primitives.py``, the client's side in ``client.py``. A
round is five exchanges with a shrinking set of clients (U0 asked, then U1 ... U4 the survivors of
each):

1. ``secagg.advertise`` (U0): the round's public plan (:class:`Plan`: the clients, the graph's
   degree and seed, the threshold, the fixed-point encoding); each client answers two fresh X25519
   public keys (c for encryption, s for masks).
2. ``secagg.share`` (U1): each client gets its neighbours' keys, Shamir-shares its self-mask seed b_u
   and its mask key s_u^SK among them and itself (threshold t; as in [B17], which shares among all of
   U1, the client keeps its own share) and answers one AES-GCM-sealed share pair per neighbour, which
   the server cannot open.
3. ``secagg.collect`` (U2): each client gets the sealed shares its neighbours in U2 made for it, keeps
   them, and from then on masks with exactly those neighbours. ([B17] sends these with round 2's
   request; here they come first so that the training itself is an ordinary train request.)
4. training (U2): an ordinary ``TrainRequest``; the client trains, runs the client halves of the
   aggregator (clipping, distributed noise) and sends its weighted update masked (``Update.kind ==
   "masked"``, ``client.mask_update``). A deadline or over-selection keeps the first arrivals; the
   rest count as dropped (U3 are the masked inputs kept).
5. ``secagg.unmask`` (U3): each survivor gets U3 and answers, for each neighbour v it holds shares
   of, the share of b_v when v is in U3, else of s_v^SK (never both), and its own share of b_u.

The server rebuilds b_v for every v in U3 and s_v^SK for every v in U2 \\ U3 from t shares each,
removes the self masks and the dropped clients' pairwise masks from the sum of the masked inputs,
and decodes it. Fewer than t shares for any of them, or fewer than ``min_survivors`` masked inputs,
aborts the round: the sum is never unmasked and nothing is revealed (the model stays).
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedloom.errors import ConfigError
from fedloom.messages import Reply, Request, StepReply, StepRequest, TrainReply, TrainRequest
from fedloom.params import Params, ParamSpec, unflatten
from fedloom.secagg.primitives import (
    KEY_BYTES,
    NONCE_BYTES,
    SHARE_BYTES,
    TAG_BYTES,
    SecAggError,
    add_mod,
    agree,
    associated_data,
    bits_for,
    expand,
    from_field,
    levels_for,
    neighbours,
    open_sealed,
    private_from_bytes,
    reconstruct,
    secagg_plus_parameters,
    sub_mod,
    unpack_words,
    word_dtype,
)

ADVERTISE, SHARE, COLLECT, UNMASK = "secagg.advertise", "secagg.share", "secagg.collect", "secagg.unmask"
STEPS = (ADVERTISE, SHARE, COLLECT, UNMASK)
MODES = ("secagg", "secagg+")
SEALED_BYTES = NONCE_BYTES + 16 + 2 * SHARE_BYTES + TAG_BYTES  # sender, recipient, share of s^SK, share of b
Check = Callable[[TrainRequest, TrainReply], TrainReply]  # the server's door for a masked reply; raises to refuse it
NOISE_MARGIN = 8.0  # a client's noised value is encoded within clip + 8 noise std (P[clipped] ~ 1e-15 per value)


# -- bytes of ids and keys ---------------------------------------------------------------------


def ids_to_bytes(ids: Sequence[int]) -> bytes:
    return np.asarray(list(ids), dtype="<i8").tobytes()


def ids_from_bytes(data: bytes, what: str) -> list[int]:
    if len(data) % 8:
        raise SecAggError(f"{what}: {len(data)} bytes is not a list of 8-byte ids")
    ids = np.frombuffer(data, dtype="<i8").tolist()
    if len(set(ids)) != len(ids) or any(i < 0 for i in ids):
        raise SecAggError(f"{what}: ids must be distinct and >= 0")
    return ids


def _blobs(data: bytes, size: int, count: int, what: str) -> list[bytes]:
    if len(data) != size * count:
        raise SecAggError(f"{what}: expected {count} blobs of {size} bytes, got {len(data)} bytes")
    return [data[i * size:(i + 1) * size] for i in range(count)]


def encrypt_info(round: int) -> bytes:
    return b"fedloom-secagg-encrypt" + struct.pack(">Q", round)


def mask_info(round: int, u: int, v: int) -> bytes:
    return b"fedloom-secagg-mask" + struct.pack(">QQQ", round, min(u, v), max(u, v))


def pair_sign(u: int, v: int) -> int:
    """Client u adds PRG(s_uv) when v > u and subtracts it when v < u, so each pair cancels in the sum."""
    return 1 if v > u else -1


# -- the round's public plan -------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What every client of a round must agree on: who takes part, the graph, the threshold, the encoding.

    ``dim`` is the length of a masked vector: the model's values and one more for the weight.
    ``weight_cap``: 0 weighs every update the same; else a client weighs its update by
    min(examples, cap) / cap (``aggregation.weighting = "capped"``).
    """

    round: int
    clients: tuple[int, ...]
    degree: int
    threshold: int
    graph_seed: bytes
    bits: int
    levels: int
    bound: float
    dim: int
    weight_cap: float = 0.0

    def __post_init__(self) -> None:
        n = len(self.clients)
        if n < 2 or len(set(self.clients)) != n or min(self.clients) < 0:
            raise SecAggError(f"a plan needs at least 2 distinct client ids, got {n}")
        if not 2 <= self.threshold <= self.degree <= n - 1:
            raise SecAggError(f"threshold {self.threshold} and degree {self.degree} must satisfy 2 <= t <= k <= n - 1 "
                              f"(n = {n})")
        if not 2 <= self.bits <= 32 or not 1 <= self.levels or n * self.levels > (1 << (self.bits - 1)) - 1:
            raise SecAggError(f"{n} values of {self.levels} levels do not sum within {self.bits} bits")
        if not (math.isfinite(self.bound) and self.bound > 0 and self.dim >= 2 and len(self.graph_seed) >= 16):
            raise SecAggError("the plan's bound, dimension or graph seed is invalid")
        if not (math.isfinite(self.weight_cap) and self.weight_cap >= 0):
            raise SecAggError(f"weight cap must be >= 0, got {self.weight_cap}")

    @property
    def payload_bytes(self) -> int:
        """Bytes of one masked vector on the wire."""
        return (self.dim * self.bits + 7) // 8

    def graph(self) -> dict[int, frozenset[int]]:
        return neighbours(list(self.clients), self.degree, self.graph_seed)

    def values(self) -> dict[str, bytes]:
        return {"clients": ids_to_bytes(self.clients), "graph_seed": self.graph_seed,
                "numbers": struct.pack("<qqqqqdd", self.round, self.degree, self.threshold, self.bits, self.levels,
                                       self.bound, self.weight_cap),
                "dim": struct.pack("<q", self.dim)}

    @classmethod
    def from_values(cls, values: Mapping[str, bytes]) -> Plan:
        try:
            rnd, degree, t, bits, levels, bound, cap = struct.unpack("<qqqqqdd", values["numbers"])
            (dim,) = struct.unpack("<q", values["dim"])
            return cls(rnd, tuple(ids_from_bytes(values["clients"], "clients")), degree, t,
                       bytes(values["graph_seed"]), bits, levels, bound, dim, cap)
        except (KeyError, struct.error) as exc:
            raise SecAggError(f"the plan is incomplete or malformed: {exc}") from None


# -- the run's settings ------------------------------------------------------------------------


@dataclass(frozen=True)
class SecureAggregation:
    """Secure aggregation's settings for a run; :meth:`round` runs one round's exchanges.

    ``mode``: ``"secagg"`` ([B17]: every pair of clients masks, t from ``threshold``) or ``"secagg+"``
    ([B20]: O(log n) neighbours, degree and threshold from :func:`secagg_plus_parameters` for
    ``corrupt_fraction`` and ``dropout_fraction``). ``bits`` and ``levels``: the fixed-point encoding
    of values in [-bound, bound] (``bound``: the clip bound, widened by the distributed noise's
    margin), fixed for the run; ``max_clients``: the most clients a round may ask.
    ``min_survivors``: masked inputs a round needs to be unmasked (distributed DP's noise is
    calibrated for it). ``seed``: the graph's seed in a simulation (None: from the OS).
    """

    mode: str = "secagg+"
    bits: int = 32
    levels: int = 0
    bound: float = 1.0
    max_clients: int = 2
    threshold: float = 0.5
    corrupt_fraction: float = 1 / 3
    dropout_fraction: float = 0.1
    weight_cap: float = 0.0
    min_survivors: int = 1
    seed: int | None = None
    _params: dict = field(default_factory=dict, compare=False, repr=False)  # n -> (k, t), memoised

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError("secagg.mode", f"must be one of off, {', '.join(MODES)}; got {self.mode!r}")
        if self.levels < 1 or self.max_clients * self.levels > (1 << (self.bits - 1)) - 1:
            raise ConfigError("secagg.bits", f"{self.max_clients} clients' values of {self.levels} levels do not sum "
                                             f"within {self.bits} bits")

    @classmethod
    def for_run(cls, mode: str, bits: int, quantize_bits: int, bound: float, max_clients: int,
                **kw: float | int | None) -> SecureAggregation:
        """Settings whose encoding fits ``max_clients``: ``bits`` wide (default 32), or, with a ``quantize_bits``
        codec, its levels (2**(b - 1) - 1 per sign) in the fewest bits that hold their sum (compressed stays
        compressed)."""
        if quantize_bits:
            levels = (1 << (quantize_bits - 1)) - 1
            bits = bits_for(levels, max_clients)
            if bits > 32:
                raise ConfigError("compression.uplink", f"uniform{quantize_bits} for {max_clients} clients needs "
                                                        f"{bits} bits per value; at most 32 are sent")
        else:
            levels = levels_for(bits, max_clients)
        return cls(mode, bits, levels, bound, max_clients, **kw)  # type: ignore[arg-type]

    def parameters(self, n: int) -> tuple[int, int]:
        """(degree, threshold) for n clients."""
        if n not in self._params:
            if self.mode == "secagg" or n <= 3:
                k = n - 1
                t = max(2, min(k, math.ceil(self.threshold * n)))
            else:
                k, t = secagg_plus_parameters(n, self.corrupt_fraction, self.dropout_fraction)
            self._params[n] = (k, t)
        return self._params[n]

    def plan(self, rnd: int, clients: Sequence[int], dim: int) -> Plan:
        k, t = self.parameters(len(clients))
        seed = os.urandom(KEY_BYTES) if self.seed is None else \
            np.random.default_rng([self.seed, rnd, 31]).bytes(KEY_BYTES)
        return Plan(rnd, tuple(sorted(clients)), k, t, seed, self.bits, self.levels, self.bound, dim, self.weight_cap)

    def payload_bytes(self, num_values: int) -> int:
        """Bytes of a masked update of a model of ``num_values`` values (and its weight)."""
        return ((num_values + 1) * self.bits + 7) // 8

    def round(self, rnd: int, requests: Sequence[TrainRequest], dim: int,
              check: Check) -> Generator[list[Request], tuple[list[Reply], dict[int, float]], SecureSum]:
        """One round's exchanges (see the module docstring): yields each step's requests, receives
        ``(replies, durations)``, returns the unmasked sum. ``check(request, reply)`` is the server's door
        for the masked train replies (it raises with the reason to refuse one)."""
        out = _Round(self, rnd, list(requests), dim)
        if len(requests) < 3:
            return out.abort(f"secure aggregation needs at least 3 clients, {len(requests)} were asked; nothing was "
                             "sent")
        plan = out.plan = self.plan(rnd, [r.client_id for r in requests], dim)
        asked = out.ask(ADVERTISE, plan.clients, lambda u: plan.values())
        keys = out.take(ADVERTISE, asked, (yield asked)[0], _advertised)
        if why := out.short(keys, "advertised keys"):
            return out.abort(why)
        graph = plan.graph()

        def share_request(u: int) -> dict[str, bytes]:
            peers = sorted(v for v in graph[u] if v in keys)
            return {"peers": ids_to_bytes(peers), "keys": b"".join(keys[v][0] + keys[v][1] for v in peers)}

        asked = out.ask(SHARE, sorted(keys), share_request)
        sealed = out.take(SHARE, asked, (yield asked)[0], _shared)
        if why := out.short(sealed, "shared their keys"):
            return out.abort(why)
        inbox: dict[int, dict[int, bytes]] = {u: {} for u in sealed}  # u -> the shares sealed for it, by sender
        for v, blobs in sealed.items():
            for u, blob in blobs.items():
                if u in inbox:
                    inbox[u][v] = blob

        def collect_request(u: int) -> dict[str, bytes]:
            senders = sorted(inbox[u])
            return {"from": ids_to_bytes(senders), "sealed": b"".join(inbox[u][v] for v in senders)}

        asked = out.ask(COLLECT, sorted(sealed), collect_request)
        collected = out.take(COLLECT, asked, (yield asked)[0], lambda q, r: True)
        training = [r for r in requests if r.client_id in collected]
        replies, out.durations = yield training
        masked = out.take_masked(training, replies, check)
        if why := out.short(masked, "sent masked inputs", need=max(plan.threshold, self.min_survivors)):
            return out.abort(why)
        survivors = sorted(masked)
        if why := out.unrecoverable(survivors, set(sealed) - set(masked), inbox):
            return out.abort(why)
        asked = out.ask(UNMASK, survivors, lambda u: {"survivors": ids_to_bytes(survivors)})
        shares = out.take(UNMASK, asked, (yield asked)[0], lambda q, r: _revealed(q, r, inbox))
        return out.unmask(masked, shares, keys, set(sealed) - set(masked), inbox)


@dataclass
class SecureSum:
    """What a secure round produced: the sum of the survivors' weighted updates and of their weights, or why not."""

    total: np.ndarray | None  # float64, the model's values then the weight (times the bound)
    survivors: list[int]
    rejected: dict[int, str]
    metrics: dict[int, dict[str, float]]
    durations: dict[int, float]
    problem: str = ""
    measurements: dict[str, float] = field(default_factory=dict)

    def mean(self, bound: float, spec: ParamSpec, factor: float = 1.0) -> Params:
        """``factor`` times the weighted mean of the survivors' updates: the sum over its weight coordinate."""
        assert self.total is not None
        weight = self.total[-1] / bound
        return unflatten(self.total[:-1] * (factor / weight if weight > 0 else 0.0), spec)


# -- checking the clients' answers -----------------------------------------------------------


def _values(reply: StepReply, names: Sequence[str]) -> list[bytes]:
    missing = [n for n in names if n not in reply.values]
    if missing:
        raise SecAggError(f"the reply lacks {', '.join(missing)}")
    return [reply.values[n] for n in names]


def _advertised(request: StepRequest, reply: StepReply) -> tuple[bytes, bytes]:
    c_pk, s_pk = _values(reply, ("c_pk", "s_pk"))
    if len(c_pk) != KEY_BYTES or len(s_pk) != KEY_BYTES or c_pk == s_pk:
        raise SecAggError(f"public keys must be two distinct {KEY_BYTES}-byte keys")
    return c_pk, s_pk


def _shared(request: StepRequest, reply: StepReply) -> dict[int, bytes]:
    to, blob = _values(reply, ("to", "sealed"))
    peers = ids_from_bytes(request.values["peers"], "peers")
    if ids_from_bytes(to, "to") != peers:
        raise SecAggError("sealed shares must be addressed to exactly the peers it was sent, in order")
    return dict(zip(peers, _blobs(blob, SEALED_BYTES, len(peers), "sealed shares")))


def _revealed(request: StepRequest, reply: StepReply,
              inbox: dict[int, dict[int, bytes]]) -> dict[str, dict[int, bytes]]:
    b_ids, b_shares, s_ids, s_shares = _values(reply, ("b_ids", "b_shares", "s_ids", "s_shares"))
    b = ids_from_bytes(b_ids, "b_ids")
    s = ids_from_bytes(s_ids, "s_ids")
    held = set(inbox.get(request.client_id, {}))
    survivors = set(ids_from_bytes(request.values["survivors"], "survivors"))
    if set(b) != (held | {request.client_id}) & survivors or set(s) != held - survivors:
        raise SecAggError("shares revealed for other clients than the survivors and dropped clients it holds shares of")
    return {"b": dict(zip(b, _blobs(b_shares, SHARE_BYTES, len(b), "b shares"))),
            "s": dict(zip(s, _blobs(s_shares, SHARE_BYTES, len(s), "s shares")))}


class _Round:
    """The bookkeeping of one secure round: who is still in, who left at which step and why."""

    def __init__(self, settings: SecureAggregation, rnd: int, requests: list[TrainRequest], dim: int):
        self.settings, self.rnd, self.requests, self.dim = settings, rnd, requests, dim
        self.rejected: dict[int, str] = {}
        self.metrics: dict[int, dict[str, float]] = {}
        self.durations: dict[int, float] = {}
        self.plan: Plan | None = None
        self.total: np.ndarray | None = None  # the sum of the masked inputs taken so far

    def ask(self, step: str, clients: Sequence[int], values: Callable[[int], dict[str, bytes]]) -> list[StepRequest]:
        return [StepRequest(u, self.rnd, step, values(u)) for u in clients]

    def take(self, step: str, requests: list[StepRequest], replies: list[Reply], parse: Callable) -> dict:
        """The parsed answers of the clients whose replies to ``step`` are valid; the others are recorded."""
        out = {}
        for q, r in zip(requests, replies):
            u = q.client_id
            if not isinstance(r, StepReply) or r.client_id != u or r.round != self.rnd or r.step != step:
                self.rejected[u] = f"secagg_bad_reply: not an answer to {step} of round {self.rnd}"
            elif r.error is not None:
                self.rejected[u] = f"secagg_dropped: at {step}: {r.error.code}: {r.error.reason}"
            else:
                try:
                    out[u] = parse(q, r)
                except (SecAggError, ValueError) as exc:
                    self.rejected[u] = f"secagg_bad_reply: at {step}: {exc}"
        return out

    def take_masked(self, asked: list[TrainRequest], replies: list[Reply], check: Check) -> dict[int, bool]:
        """The clients whose masked inputs are valid; their sum (modulo 2**bits) is kept as they come, so the
        server holds one vector, not one per client."""
        plan = self.plan
        assert plan is not None
        out: dict[int, bool] = {}
        for q, r in zip(asked, replies):
            u = q.client_id
            if u in out:
                continue  # a second answer of the same client: its input is summed once
            try:
                r = check(q, r)
            except Exception as exc:  # noqa: BLE001 - the door's refusal, with its code
                self.rejected[u] = f"{getattr(exc, 'code', 'invalid')}: {getattr(exc, 'message', exc)}"
                continue
            if r.error is not None:
                self.rejected[u] = f"{r.error.code}: {r.error.reason}"
                continue
            try:
                words = unpack_words(r.update.payload, plan.bits, plan.dim)
            except ValueError as exc:
                self.rejected[u] = f"secagg_bad_reply: the masked input: {exc}"
                continue
            if self.total is None:
                self.total = words.astype(word_dtype(plan.bits), copy=True)
            else:
                add_mod(self.total, words.astype(word_dtype(plan.bits), copy=False), plan.bits, out=self.total)
            out[u] = True
            self.metrics[u] = dict(r.update.metrics)
        return out

    def short(self, answered: Mapping, what: str, need: int | None = None) -> str:
        plan = self.plan
        assert plan is not None
        need = plan.threshold if need is None else need
        if len(answered) < need:
            return (f"secure aggregation aborted: {len(answered)} clients {what}, fewer than the {need} needed; "
                    "nothing was unmasked")
        return ""

    def unrecoverable(self, survivors: list[int], dropped: set[int], inbox: dict[int, dict[int, bytes]]) -> str:
        """Why unmasking cannot succeed even if every survivor answers: a secret it must rebuild (a survivor's
        self-mask seed, a dropped client's mask key) has fewer than t shares among the survivors, who alone are
        asked (a survivor's own share of its seed counts); then nobody is asked to reveal anything."""
        plan = self.plan
        assert plan is not None
        for v in [*survivors, *sorted(masked_with(dropped, survivors, inbox))]:
            holders = sum(v in inbox[u] or u == v for u in survivors)  # a survivor holds a share of its own
            if holders < plan.threshold:
                return (f"secure aggregation aborted: {holders} of the {len(survivors)} clients that sent masked "
                        f"inputs hold shares of client {v}'s secrets, fewer than the threshold {plan.threshold}; "
                        "nothing was unmasked")
        return ""

    def abort(self, why: str) -> SecureSum:
        return SecureSum(None, [], self.rejected, {}, self.durations, why)

    def unmask(self, masked: dict[int, bool], shares: dict[int, dict[str, dict[int, bytes]]],
               keys: dict[int, tuple[bytes, bytes]], dropped: set[int],
               inbox: dict[int, dict[int, bytes]]) -> SecureSum:
        """Rebuild the survivors' self-mask seeds and the dropped clients' mask keys, then remove their masks."""
        plan = self.plan
        assert plan is not None
        t, bits, graph = plan.threshold, plan.bits, plan.graph()
        seeds: dict[int, bytes] = {}
        mask_keys: dict[int, bytes] = {}
        needed = masked_with(dropped, list(masked), inbox)  # a dropped client no survivor masked with needs nothing
        for v, kind, into in [(v, "b", seeds) for v in masked] + [(v, "s", mask_keys) for v in sorted(needed)]:
            got = {u: s[kind][v] for u, s in shares.items() if v in s[kind]}
            if len(got) < t:
                return self.abort(f"secure aggregation aborted: {len(got)} shares to unmask client {v} arrived, fewer "
                                  f"than the threshold {t}; nothing was unmasked")
            try:
                into[v] = reconstruct(got, t, KEY_BYTES)  # from the t smallest ids
                # a share off by a little (a flipped bit, a malicious client's offset) shifts the secret by a little,
                # which still fits in its bytes: the surplus shares must rebuild the same one
                if len(got) > t and reconstruct(dict(sorted(got.items())[-t:]), t, KEY_BYTES) != into[v]:
                    raise SecAggError("two sets of t shares rebuild different secrets")
            except SecAggError as exc:
                return self.abort(f"secure aggregation aborted: client {v}'s shares are inconsistent ({exc}); nothing "
                                  "was unmasked")
        total = self.total
        assert total is not None
        for seed in seeds.values():
            sub_mod(total, expand(seed, plan.dim, bits, reuse=True), bits, out=total)
        masks = len(seeds)  # the mask expansions of d words: the bulk of the server's unmasking time
        for v, secret in mask_keys.items():
            private = private_from_bytes(secret)
            for u in graph[v]:
                if u in masked and v in inbox.get(u, {}):  # u masked with v: v's shares reached u
                    mask = expand(agree(private, keys[u][1], mask_info(self.rnd, u, v)), plan.dim, bits, reuse=True)
                    (sub_mod if pair_sign(u, v) > 0 else add_mod)(total, mask, bits, out=total)
                    masks += 1
        survivors = sorted(masked)
        summed = from_field(total, plan.bound, plan.levels, bits)
        weight = summed[-1] / plan.bound  # each client's weight is in (0, 1]: anything else is a wrapped sum
        if not 0 < weight <= len(survivors) * (1 + 1e-6) + plan.bound / plan.levels:
            return self.abort(f"secure aggregation aborted: the unmasked weights sum to {weight:.4g}, outside (0, "
                              f"{len(survivors)}]: a client sent a vector outside the fixed point's range, so the sum "
                              "wrapped; it is not applied")
        return SecureSum(summed, survivors, self.rejected,
                         {u: self.metrics[u] for u in survivors}, self.durations,
                         measurements={"secagg.survivors": float(len(survivors)), "secagg.dropped": float(len(dropped)),
                                       "secagg.degree": float(plan.degree), "secagg.threshold": float(t),
                                       "secagg.masks": float(masks)})


def masked_with(dropped: set[int], survivors: list[int], inbox: dict[int, dict[int, bytes]]) -> set[int]:
    """The dropped clients some survivor masked with (its shares reached that survivor): their keys must be rebuilt."""
    return {v for v in dropped if any(v in inbox.get(u, {}) for u in survivors)}


def open_share(private_c: bytes, peer_c_pk: bytes, blob: bytes, sender: int, recipient: int,
               rnd: int) -> tuple[bytes, bytes]:
    """The (s^SK share, b share) that ``sender`` sealed for ``recipient`` in round ``rnd``."""
    key = agree(private_from_bytes(private_c), peer_c_pk, encrypt_info(rnd))
    plain = open_sealed(key, blob, associated_data(sender, recipient, rnd, b"share"))
    head = struct.pack(">QQ", sender, recipient)
    if len(plain) != 16 + 2 * SHARE_BYTES or plain[:16] != head:
        raise SecAggError(f"the share sealed by client {sender} names another pair")
    return plain[16:16 + SHARE_BYTES], plain[16 + SHARE_BYTES:]
