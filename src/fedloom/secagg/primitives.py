"""The cryptographic building blocks of secure aggregation: pure functions, no protocol state, no network.

Secure aggregation (Bonawitz et al., CCS 2017, "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", below [B17]) lets a server learn the sum of the clients' vectors and nothing else,
even when some clients drop out mid-round. SecAgg+ (Bell et al., CCS 2020, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", below [B20]) replaces its complete graph of client pairs
by a random sparse one. This module holds the pieces; the protocol rounds that use them are named in
[B17]'s numbering (0 AdvertiseKeys, 1 ShareKeys, 2 MaskedInputCollection, 3 ConsistencyCheck,
4 Unmasking).

Pieces, and the round of [B17] that uses each:

- :func:`generate_keypair`, :func:`agree`: X25519 Diffie-Hellman, then HKDF-SHA256 to a 32-byte key,
  ``info`` separating purposes and contexts. Round 0 (each client advertises two public keys: c for
  encryption, s for masks); rounds 1 and 2 derive the pair keys from them.
- :func:`seal`, :func:`open_sealed`, :func:`associated_data`: AES-256-GCM with a random 96-bit nonce
  prepended, the associated data binding sender, recipient and round. Round 1 (each client's shares for
  each peer, relayed by the server), round 4 (the peer opens them).
- :func:`share`, :func:`reconstruct`: Shamir t-out-of-n secret sharing over GF(2**521 - 1). Round 1
  (share the self-mask seed b_u and the mask private key s_u^SK), round 4 (the server rebuilds b_u of a
  survivor or s_u^SK of a dropped client, never both).
- :func:`expand`: the PRG, AES-256-CTR keystream to n words modulo 2**bits. Round 2 (masks), round 4
  (the server recomputes the masks it must remove).
- :func:`to_field`, :func:`from_field`: fixed point, floats in [-bound, bound] to signed integers modulo
  2**bits with levels few enough (:func:`levels_for`) that a sum never wraps; :func:`pack_words` sends them at
  their width. Round 2 (encode before masking), after round 4 (decode the sum).
- :func:`add_mod`, :func:`sub_mod`: vector arithmetic in Z_(2**bits). Rounds 2 and 4.
- :func:`neighbours`, :func:`thresholds`, :func:`secagg_plus_parameters`: the SecAgg+ graph ([B20]; a
  Harary graph on a seeded random permutation) and its degree k and threshold t. Before round 0: who
  exchanges keys and shares with whom (everyone, in [B17]).

Masking ([B17], round 2). Client u sends y_u = x_u + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)
(mod 2**bits), with x_u = :func:`to_field` of its update and s_uv = :func:`agree` of its mask key with v's.
The pairwise masks cancel in the sum; the server removes the survivors' self masks PRG(b_u) and, for a
dropped client v, the pairwise masks PRG(s_uv) its survivors u added (it rebuilds s_v^SK from t shares).

Security notes.

- Key agreement: the X25519 output is never used directly; HKDF-SHA256 with a caller-chosen ``info``
  derives independent keys per purpose (``b"fedloom-secagg-encrypt"`` vs ``b"fedloom-secagg-mask"``),
  so one key pair never yields the same key for two uses. Put the round (and any session id) in ``info``
  too when key pairs outlive a round; since the exchange is symmetric, put pair ids in canonical order
  (min, max) if at all. A low-order peer point (all-zero shared secret) is refused.
- Encryption: AES-256-GCM with a random 96-bit nonce is safe for far more messages per key than a
  round sends (NIST SP 800-38D bounds it at 2**32). The associated data binds (sender, recipient, round),
  so the server cannot replay a share to another pair or into another round: it fails authentication.
  Wrong key, tampering, truncation and wrong associated data are indistinguishable by design.
- Shamir: information-theoretic; any t - 1 shares are independent of the secret. The field is
  GF(p), p = 2**521 - 1, a Mersenne prime (proved prime in 1952: no constant to verify, unlike an
  ad hoc prime just above 2**256). A 32-byte secret needs p > 2**256; the wider field costs 66-byte shares
  instead of 33, trivial next to a masked model, and buys a check: a reconstruction from unrelated
  shares or with a wrong threshold is a uniform field element, which fits in the secret's 32 bytes with
  probability 2**-265, so :func:`reconstruct` detects it instead of returning garbage. A share off by a
  small amount (a flipped bit, a client's deliberate offset) is not detected this way: it moves the
  secret by that amount times a small Lagrange coefficient, which still fits; the protocol checks that
  two sets of t shares agree when more than t arrive (``protocol.py``). This is not a verifiable secret
  sharing: it does not say which share was bad, and does not resist a malicious dealer. Python integers
  are not constant time; the arithmetic's timing may leak on a shared host.
- PRG: AES-256-CTR with a fixed all-zero counter block. That is safe because each seed is used for one
  vector only (a fresh b_u per round; s_uv via HKDF with a per-purpose, per-round ``info``). Never
  expand one seed for two different vectors: two inputs masked with the same mask leak their difference.
- Fixed point: values are clipped to [-bound, bound] first, so a client cannot push the sum past the
  range and wrap it. With stochastic rounding the encoding is unbiased.
- The SecAgg+ graph is public and must be drawn from a seed fixed after the set of clients (and any
  corruption) is fixed: [B20]'s analysis assumes the adversary cannot choose its clients' positions.
"""

from __future__ import annotations

import functools
import math
import secrets
import struct
import threading
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedloom.errors import FedloomError

__all__ = [
    "KEY_BYTES",
    "NONCE_BYTES",
    "TAG_BYTES",
    "PRIME",
    "SHARE_BYTES",
    "MAX_SECRET_BYTES",
    "SecAggError",
    "generate_keypair",
    "private_to_bytes",
    "private_from_bytes",
    "agree",
    "associated_data",
    "seal",
    "open_sealed",
    "share",
    "reconstruct",
    "expand",
    "word_dtype",
    "levels_for",
    "bits_for",
    "quantization_step",
    "to_field",
    "from_field",
    "pack_words",
    "unpack_words",
    "add_mod",
    "sub_mod",
    "neighbours",
    "thresholds",
    "secagg_plus_parameters",
]

KEY_BYTES = 32  # X25519 keys, derived keys, AES-256 keys, PRG seeds
NONCE_BYTES = 12  # AES-GCM nonce, prepended to each sealed message
TAG_BYTES = 16  # AES-GCM tag, appended by AESGCM.encrypt
PRIME = 2**521 - 1  # Shamir field modulus (Mersenne prime M521)
SHARE_BYTES = (PRIME.bit_length() + 7) // 8  # 66: one share, big-endian
MAX_SECRET_BYTES = 32

_MAX_VALUE_BITS = 52  # float64 holds every integer below 2**53 exactly


class SecAggError(FedloomError):
    """A secure-aggregation value is unusable: a bad peer key, a ciphertext that fails authentication,
    malformed or inconsistent Shamir shares, or a masked sum that cannot be decoded."""

    code = "secagg"


def _as_bytes(value: Any, what: str) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"{what} must be bytes, got {type(value).__name__}")


def _check_int(value: Any, what: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{what} must be {bound}, got {value}")
    return value


# --------------------------------------------------------------------------------------------------
# 1. Key agreement


def generate_keypair() -> tuple[X25519PrivateKey, bytes]:
    """A fresh X25519 key pair: the private key and the raw 32-byte public key to advertise."""
    private = X25519PrivateKey.generate()
    return private, private.public_key().public_bytes_raw()


def private_to_bytes(private: X25519PrivateKey) -> bytes:
    """The raw 32 bytes of a private key (the secret [B17] Shamir-shares as s_u^SK)."""
    return private.private_bytes_raw()


def private_from_bytes(data: bytes) -> X25519PrivateKey:
    """The private key from its raw 32 bytes (for example a reconstructed s_u^SK)."""
    data = _as_bytes(data, "private key")
    if len(data) != KEY_BYTES:
        raise SecAggError(f"private key must be {KEY_BYTES} bytes, got {len(data)}")
    return X25519PrivateKey.from_private_bytes(data)


def agree(private: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """X25519 with the peer's raw public key, then HKDF-SHA256 (no salt, ``info``) to 32 bytes.

    Both sides of a pair derive the same key; a different ``info`` derives an unrelated key.
    Raises :class:`SecAggError` on a peer key of the wrong length or a low-order point.
    """
    if not isinstance(private, X25519PrivateKey):
        raise TypeError(f"private must be an X25519PrivateKey, got {type(private).__name__}")
    info = _as_bytes(info, "info")
    peer_public = _as_bytes(peer_public, "peer public key")
    if len(peer_public) != KEY_BYTES:
        raise SecAggError(f"peer public key must be {KEY_BYTES} bytes, got {len(peer_public)}")
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # OpenSSL refuses an all-zero shared secret
        raise SecAggError("peer public key is a low-order point (the shared secret would be all zero)") from exc
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


# --------------------------------------------------------------------------------------------------
# 2. Authenticated encryption of shares


def associated_data(sender: int, recipient: int, round_number: int, purpose: bytes = b"") -> bytes:
    """The associated data that binds a sealed share to (sender, recipient, round) and a purpose."""
    fields = [_check_int(v, name, 0, 2**64 - 1) for v, name in
              ((sender, "sender"), (recipient, "recipient"), (round_number, "round_number"))]
    return b"fedloom-secagg-share\x00" + struct.pack(">QQQ", *fields) + _as_bytes(purpose, "purpose")


def _check_key(key: Any) -> bytes:
    key = _as_bytes(key, "key")
    if len(key) != KEY_BYTES:
        raise SecAggError(f"key must be {KEY_BYTES} bytes (AES-256), got {len(key)}")
    return key


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-256-GCM: a random 12-byte nonce, then the ciphertext and its 16-byte tag."""
    key = _check_key(key)
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, _as_bytes(plaintext, "plaintext"), _as_bytes(associated, "associated"))


def open_sealed(key: bytes, data: bytes, associated: bytes) -> bytes:
    """The plaintext of :func:`seal`'s output; :class:`SecAggError` if it is short or fails authentication."""
    key = _check_key(key)
    data = _as_bytes(data, "sealed data")
    if len(data) < NONCE_BYTES + TAG_BYTES:
        raise SecAggError(f"sealed data is too short: {len(data)} bytes, at least {NONCE_BYTES + TAG_BYTES} "
                          "(nonce and tag)")
    try:
        return AESGCM(key).decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], _as_bytes(associated, "associated"))
    except InvalidTag:
        raise SecAggError("sealed data failed authentication: tampered or truncated, a wrong key, or "
                          "associated data of another sender, recipient or round") from None


# --------------------------------------------------------------------------------------------------
# 3. Shamir secret sharing over GF(2**521 - 1)


def _check_ids(ids: Any) -> list[int]:
    ids = [_check_int(i, "client id", 0, PRIME - 2) for i in ids]
    if len(set(ids)) != len(ids):
        raise ValueError("client ids must be distinct")
    return ids


def share(secret: bytes, t: int, ids: list[int], rng: Any = secrets) -> dict[int, bytes]:
    """Split ``secret`` (1 to 32 bytes) into one share per client id, any ``t`` of which rebuild it.

    The polynomial f has f(0) = the secret (big-endian integer) and t - 1 coefficients drawn with
    ``rng.randbelow`` (default: the OS CSPRNG); client i's share is f(i + 1) as SHARE_BYTES big-endian
    bytes, so no client is ever given f(0).
    """
    secret = _as_bytes(secret, "secret")
    if not 1 <= len(secret) <= MAX_SECRET_BYTES:
        raise ValueError(f"secret must be 1..{MAX_SECRET_BYTES} bytes, got {len(secret)}")
    ids = _check_ids(ids)
    t = _check_int(t, "threshold t", 1, max(len(ids), 1))
    if not ids:
        raise ValueError("no client ids to share with")
    coefficients = [int.from_bytes(secret, "big")] + [rng.randbelow(PRIME) for _ in range(t - 1)]
    coefficients.reverse()
    shares = {}
    for i in ids:
        x, y = i + 1, 0
        for c in coefficients:  # Horner
            y = (y * x + c) % PRIME
        shares[i] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def reconstruct(shares: dict[int, bytes], t: int, length: int) -> bytes:
    """The ``length``-byte secret from at least ``t`` shares (Lagrange interpolation at 0).

    Exactly t shares are used: those of the t smallest ids. Raises :class:`SecAggError` on fewer than t
    shares, a malformed share (wrong width, not below the prime, a bad id) or a result that does not
    fit in ``length`` bytes (inconsistent shares, or shares of a polynomial of higher degree than t - 1).
    """
    t = _check_int(t, "threshold t", 1)
    length = _check_int(length, "length", 1, MAX_SECRET_BYTES)
    if len(shares) < t:
        raise SecAggError(f"{len(shares)} shares cannot rebuild a secret shared with threshold {t}")
    points = []
    for i, data in shares.items():
        if isinstance(i, bool) or not isinstance(i, int | np.integer) or not 0 <= int(i) <= PRIME - 2:
            raise SecAggError(f"share id {i!r} is not a client id")
        if not isinstance(data, bytes | bytearray) or len(data) != SHARE_BYTES:
            size = len(data) if isinstance(data, bytes | bytearray) else type(data).__name__
            raise SecAggError(f"share of client {i} must be {SHARE_BYTES} bytes, got {size}")
        y = int.from_bytes(data, "big")
        if y >= PRIME:
            raise SecAggError(f"share of client {i} is not an element of the field (>= 2**521 - 1)")
        points.append((int(i) + 1, y))
    points = sorted(points)[:t]
    weights = _lagrange_at_zero(tuple(x for x, _ in points))
    value = sum(y * w for (_, y), w in zip(points, weights)) % PRIME
    if value >> (8 * length):
        raise SecAggError(f"the reconstructed value does not fit in {length} bytes: the shares are inconsistent, "
                          "of another secret, or the threshold is wrong")
    return value.to_bytes(length, "big")


@functools.lru_cache(maxsize=4096)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """L_j(0) = prod_{m != j} x_m / (x_m - x_j) for each j, modulo PRIME, with one modular inversion for all of
    them (Montgomery's batch inversion); memoised, since a round rebuilds many secrets from the same holders."""
    product = 1
    for x in xs:
        product = product * x % PRIME
    denominators = []
    for j, xj in enumerate(xs):  # L_j(0) = product / (x_j * prod_{m != j} (x_m - x_j))
        d = xj
        for m, xm in enumerate(xs):
            if m != j:
                d = d * (xm - xj) % PRIME
        denominators.append(d)
    prefix = [1]
    for d in denominators:
        prefix.append(prefix[-1] * d % PRIME)
    inverse = pow(prefix[-1], -1, PRIME)
    weights = [0] * len(xs)
    for j in range(len(xs) - 1, -1, -1):
        weights[j] = product * inverse * prefix[j] % PRIME  # inverse of denominators[j]
        inverse = inverse * denominators[j] % PRIME
    return tuple(weights)


# --------------------------------------------------------------------------------------------------
# 4. Mask expansion


def word_dtype(bits: int) -> np.dtype:
    """The unsigned dtype of values modulo 2**bits: uint32 for bits <= 32, else uint64."""
    bits = _check_int(bits, "bits", 1, 64)
    return np.dtype(np.uint32) if bits <= 32 else np.dtype(np.uint64)


_PRG_CHUNK = 1 << 20  # bytes of zeros encrypted per call: bounded temporary memory, cache friendly
_ZEROS = bytes(_PRG_CHUNK)


_scratch = threading.local()


def expand(seed: bytes, n: int, bits: int, reuse: bool = False) -> np.ndarray:
    """n pseudo-random values modulo 2**bits from a 32-byte seed (AES-256-CTR keystream, zero counter block).

    The keystream is read as little-endian 32-bit words (bits <= 32) or 64-bit words, masked to ``bits``.
    Deterministic: the same seed, n and bits give the same vector on every platform; the first values
    do not depend on n. Speed: about 1.3 GB of mask per second on one core (n = 10M, bits = 32, 31 ms;
    AES-NI), zeros encrypted 1 MiB at a time straight into the returned array's buffer. With ``reuse`` the
    array is a view of a per-thread scratch buffer, valid until the thread's next ``reuse`` call: for a mask
    that is added or subtracted at once (a fresh 4 MB buffer costs a quarter more in page faults).
    """
    seed = _as_bytes(seed, "seed")
    if len(seed) != KEY_BYTES:
        raise ValueError(f"seed must be {KEY_BYTES} bytes, got {len(seed)}")
    n = _check_int(n, "n", 0)
    dtype = word_dtype(bits)
    size = n * dtype.itemsize
    if reuse:  # the thread's scratch buffer: no fresh pages to fault in for each mask
        buffer = getattr(_scratch, "buffer", None)
        if buffer is None or len(buffer) != size + 15:
            buffer = _scratch.buffer = bytearray(size + 15)
    else:
        buffer = bytearray(size + 15)  # update_into wants room for a block beyond the data
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    view = memoryview(buffer)
    for start in range(0, size, _PRG_CHUNK):
        stop = min(start + _PRG_CHUNK, size)
        encryptor.update_into(_ZEROS[: stop - start] if stop - start < _PRG_CHUNK else _ZEROS,
                              view[start: stop + 15])
    view.release()
    values = np.frombuffer(buffer, dtype=dtype.newbyteorder("<"), count=n).astype(dtype, copy=False)
    if bits not in (32, 64):
        np.bitwise_and(values, dtype.type((1 << bits) - 1), out=values)
    return values


# --------------------------------------------------------------------------------------------------
# 5. Fixed-point encoding


def levels_for(bits: int, num_clients: int) -> int:
    """The most levels L per sign that ``num_clients`` values in [-L, L] can have and still sum without wrapping
    modulo 2**bits as signed numbers: num_clients * L <= 2**(bits - 1) - 1 (at most 2**52: float64 stays exact)."""
    bits = _check_int(bits, "bits", 2, 64)
    num_clients = _check_int(num_clients, "num_clients", 1)
    return min(((1 << (bits - 1)) - 1) // num_clients, 1 << _MAX_VALUE_BITS)


def bits_for(levels: int, num_clients: int) -> int:
    """The fewest bits whose signed range holds the sum of ``num_clients`` values in [-levels, levels]."""
    levels = _check_int(levels, "levels", 1)
    num_clients = _check_int(num_clients, "num_clients", 1)
    return (num_clients * levels).bit_length() + 1


def quantization_step(bound: float, levels: int) -> float:
    """The resolution of :func:`to_field`: bound / levels."""
    bound = float(bound)
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"bound must be a positive finite number, got {bound}")
    return bound / _check_int(levels, "levels", 1)


def to_field(x: np.ndarray, bound: float, levels: int, bits: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Encode float values as signed integers modulo 2**bits (two's complement): round(x / step), step = bound / levels.

    Each value is clipped to [-bound, bound] first, so its level is in [-levels, levels] and a sum of
    n <= (2**(bits - 1) - 1) / levels encodings never wraps (:func:`levels_for` picks the levels for n).
    Rounding is to the nearest level when ``rng`` is None (error <= step / 2), or stochastic with ``rng``
    (floor(q + U[0, 1)): unbiased, error < step). Raises ValueError on non-finite values.
    Returns uint32 (bits <= 32) or uint64, of x's shape.
    """
    step = quantization_step(bound, levels)
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"x must be a float array, got {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError("x has NaN or infinite values")
    q = np.clip(x.astype(np.float64), -float(bound), float(bound))
    q /= step
    q += 0.5 if rng is None else rng.random(q.shape)
    np.floor(q, out=q)
    np.clip(q, -levels, levels, out=q)
    words = q.astype(np.int64).view(np.uint64)  # two's complement
    dtype = word_dtype(bits)
    if bits < 64:
        words &= np.uint64((1 << bits) - 1)
    return words.astype(dtype, copy=False)


def from_field(total: np.ndarray, bound: float, levels: int, bits: int) -> np.ndarray:
    """The float64 sum of the values whose encodings (:func:`to_field`, same bound, levels and bits) summed to
    ``total`` modulo 2**bits: the signed reading of ``total`` times the step, exact in integers before one rounding.

    Right only when no more than (2**(bits - 1) - 1) / levels encodings were summed and every mask was removed;
    a mask left in gives values spread over the whole range.
    """
    step = quantization_step(bound, levels)
    total = np.asarray(total)
    if total.dtype.kind != "u":
        raise TypeError(f"total must be an unsigned integer array, got {total.dtype}")
    shift = np.uint64(64 - bits)  # sign-extend from ``bits`` to 64 bits
    wide = (total.astype(np.uint64) << shift).view(np.int64) >> np.int64(shift)
    return wide.astype(np.float64) * step


def pack_words(words: np.ndarray, bits: int) -> bytes:
    """Values modulo 2**bits as ``ceil(n * bits / 8)`` bytes, little endian, densely packed (bits <= 32)."""
    bits = _check_int(bits, "bits", 1, 32)
    if bits in (8, 16, 32):
        return np.ascontiguousarray(words, dtype=f"<u{bits // 8}").tobytes()
    from fedloom.compression.codecs import pack_bits

    return pack_bits(words, bits).tobytes()


def unpack_words(data: bytes, bits: int, count: int) -> np.ndarray:
    """The ``count`` values :func:`pack_words` packed, as :func:`word_dtype` words; ValueError unless ``data`` is
    exactly their length."""
    bits = _check_int(bits, "bits", 1, 32)
    count = _check_int(count, "count", 0)
    if len(data) != (count * bits + 7) // 8:
        raise ValueError(f"{count} values of {bits} bits take {(count * bits + 7) // 8} bytes, got {len(data)}")
    if bits in (8, 16, 32):  # 32 bits: a read-only view of ``data`` (no copy)
        return np.frombuffer(data, dtype=f"<u{bits // 8}").astype(np.uint32, copy=False)
    from fedloom.compression.codecs import unpack_bits

    return unpack_bits(np.frombuffer(data, np.uint8), bits, count).astype(np.uint32)


# --------------------------------------------------------------------------------------------------
# 6. Mask arithmetic


def _check_words(arrays: tuple[Any, ...], bits: int) -> np.dtype:
    dtype = word_dtype(bits)
    for a in arrays:
        if a is not None and getattr(a, "dtype", None) != dtype:
            got = getattr(a, "dtype", type(a).__name__)
            raise TypeError(f"values modulo 2**{bits} must be {dtype} arrays, got {got}")
    return dtype


def _mod(op: Any, a: np.ndarray, b: np.ndarray, bits: int, out: np.ndarray | None) -> np.ndarray:
    dtype = _check_words((a, b, out), bits)
    result = op(a, b, out=out)
    if bits not in (32, 64):  # 32 and 64 bits wrap by themselves
        np.bitwise_and(result, dtype.type((1 << bits) - 1), out=result)
    return result


def add_mod(a: np.ndarray, b: np.ndarray, bits: int, out: np.ndarray | None = None) -> np.ndarray:
    """(a + b) mod 2**bits, elementwise; into ``out`` when given (``out=a`` adds in place)."""
    return _mod(np.add, a, b, bits, out)


def sub_mod(a: np.ndarray, b: np.ndarray, bits: int, out: np.ndarray | None = None) -> np.ndarray:
    """(a - b) mod 2**bits, elementwise; into ``out`` when given (``out=a`` subtracts in place)."""
    return _mod(np.subtract, a, b, bits, out)


# --------------------------------------------------------------------------------------------------
# 7. SecAgg+ graph and parameters


def neighbours(ids: list[int], k: int, seed: bytes) -> dict[int, frozenset[int]]:
    """The SecAgg+ communication graph: each id's k neighbours, the same for everyone with the same seed.

    A Harary graph H(n, k) (a ring where each node links to the k/2 nearest on each side) over the ids
    placed in a random order: the ids, sorted, are ordered by 64-bit keys expanded (:func:`expand`) from
    HKDF(seed, info=b"fedloom-secagg-graph"). k must be even and >= 2; k >= n - 1 gives the complete
    graph. The seed is public (at least 16 bytes) and must be drawn after the clients are fixed.
    """
    seed = _as_bytes(seed, "seed")
    if len(seed) < 16:
        raise ValueError(f"seed must be at least 16 bytes, got {len(seed)}")
    ordered = sorted(_check_ids(ids))
    n = len(ordered)
    k = _check_int(k, "k", 1)
    if k >= n - 1:
        everyone = frozenset(ordered)
        return {i: everyone - {i} for i in ordered}
    if k % 2:
        raise ValueError(f"k must be even below n - 1 (a Harary graph), got k={k} for n={n}")
    key = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=b"fedloom-secagg-graph").derive(seed)
    order = np.lexsort((np.arange(n), expand(key, n, 64)))  # ties (probability ~n**2 / 2**65) by sorted id
    ring = np.asarray(ordered, dtype=np.int64)[order]
    offsets = np.concatenate([np.arange(1, k // 2 + 1), -np.arange(1, k // 2 + 1)])
    linked = ring[(np.arange(n)[:, None] + offsets[None, :]) % n]
    return {int(node): frozenset(row) for node, row in zip(ring.tolist(), linked.tolist())}


def _counts(corrupt_fraction: float, dropout_fraction: float, n: int) -> tuple[int, int]:
    for value, name in ((corrupt_fraction, "corrupt_fraction"), (dropout_fraction, "dropout_fraction")):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if corrupt_fraction + dropout_fraction >= 1:
        raise ValueError("corrupt_fraction + dropout_fraction must be below 1")
    corrupt = math.floor(corrupt_fraction * n + 1e-9)  # at most this many corrupt clients
    dropped = math.floor(dropout_fraction * n + 1e-9)  # at most this many drop out
    return corrupt, dropped


def _hypergeometric(population: int, marked: int, draws: int) -> tuple[int, list[int], int]:
    """Exact hypergeometric weights as integers.

    Returns (x0, [C(marked, x) * C(population - marked, draws - x) for x = x0 .. min(draws, marked)],
    C(population, draws)).
    """
    x0 = max(0, draws - (population - marked))
    x1 = min(draws, marked)
    weight = math.comb(marked, x0) * math.comb(population - marked, draws - x0)
    weights = [weight]
    for x in range(x0, x1):  # exact: w(x+1) = w(x) (marked-x)(draws-x) / ((x+1)(population-marked-draws+x+1))
        weight = weight * (marked - x) * (draws - x) // ((x + 1) * (population - marked - draws + x + 1))
        weights.append(weight)
    return x0, weights, math.comb(population, draws)


def thresholds(n: int, k: int, corrupt_fraction: float = 1 / 3, dropout_fraction: float = 0.1,
               sigma: int = 40, eta: int = 30) -> tuple[int, int]:
    """The range (t_min, t_max) of Shamir thresholds that is secure and correct for degree k ([B20], semi-honest).

    A client's k neighbours are a uniform k-subset of the n - 1 others (the random permutation of the
    Harary graph), so the number of corrupt ones is hypergeometric, as is the number of surviving ones.
    - Security: t_min is the least t with P[corrupt neighbours >= t] <= 2**-(sigma + 1) / n (the server
      with those neighbours must not hold t shares of an honest client's secret; union bound over n).
    - Correctness: t_max is the largest t with P[surviving neighbours < t] <= 2**-eta / n (each client's
      secret must be rebuilt from its surviving neighbours; union bound over n).
    Corrupt clients number floor(corrupt_fraction * n), dropouts floor(dropout_fraction * n); surviving
    neighbours are counted among n - 1 others with one survivor fewer (the client itself), which is
    conservative. Computed with exact integers, no floating point. Empty when t_min > t_max.
    """
    n = _check_int(n, "n", 2)
    k = _check_int(k, "k", 1, n - 1)
    sigma = _check_int(sigma, "sigma", 1)
    eta = _check_int(eta, "eta", 1)
    corrupt, dropped = _counts(corrupt_fraction, dropout_fraction, n)
    population = n - 1
    x0, weights, total = _hypergeometric(population, min(corrupt, population), k)
    bound, tail, t_min = (1 << (sigma + 1)) * n, 0, x0
    for x in range(x0 + len(weights) - 1, x0 - 1, -1):
        tail += weights[x - x0]
        if tail * bound > total:  # P[corrupt neighbours >= x] is too large: t must exceed x
            t_min = x + 1
            break
    x0, weights, total = _hypergeometric(population, max(n - dropped - 1, 0), k)
    bound, tail, t_max = (1 << eta) * n, 0, x0 + len(weights) - 1
    for x in range(x0, x0 + len(weights)):
        tail += weights[x - x0]
        if tail * bound > total:  # P[surviving neighbours <= x] is too large: t may be x at most
            t_max = x
            break
    return t_min, t_max


def _harary_stays_connected(n: int, k: int, bad: int, sigma: int) -> bool:
    """Whether P[removing `bad` random nodes disconnects H(n, k)] < 2**-(sigma + 1) (union bound).

    Disconnecting H(n, k) takes k / 2 consecutive removed nodes in two places of the ring: at most
    n (n - k - 1) / 2 placements, each with all its k nodes removed with probability bad!/(bad-k)! / (n!/(n-k)!).
    """
    if k > bad:
        return True
    return n * (n - k - 1) * math.perm(bad, k) * (1 << (sigma + 1)) < 2 * math.perm(n, k)


def _log_pmf(population: int, marked: int, draws: int) -> tuple[int, np.ndarray]:
    """Hypergeometric log-probabilities in float64, for x = x0 .. min(draws, marked)."""
    x0 = max(0, draws - (population - marked))
    x = np.arange(x0, min(draws, marked), dtype=np.float64)
    steps = (np.log(marked - x) + np.log(draws - x) - np.log(x + 1)
             - np.log(population - marked - draws + x + 1))
    logs = np.concatenate([[0.0], np.cumsum(steps)])
    return x0, logs - np.logaddexp.reduce(logs)


def _may_be_feasible(n: int, k: int, corrupt: int, dropped: int, sigma: int, eta: int) -> bool:
    """A float screen of :func:`thresholds`, loosened by a factor 2, so that it never rejects a k the exact
    test accepts (float64 errors are far below log 2); the exact test then runs only where this passes."""
    x0, logs = _log_pmf(n - 1, min(corrupt, n - 1), k)
    upper = np.logaddexp.accumulate(logs[::-1])[::-1]  # log P[corrupt neighbours >= x0 + i]
    secure = np.flatnonzero(upper <= (1 - (sigma + 1)) * math.log(2) - math.log(n))
    t_min = x0 + (int(secure[0]) if secure.size else len(logs))
    x0, logs = _log_pmf(n - 1, max(n - dropped - 1, 0), k)
    lower = np.logaddexp.accumulate(logs)  # log P[surviving neighbours <= x0 + i]
    t_max = x0 + int(np.count_nonzero(lower <= (1 - eta) * math.log(2) - math.log(n)))
    return max(t_min, 2) <= t_max


def secagg_plus_parameters(n: int, corrupt_fraction: float = 1 / 3, dropout_fraction: float = 0.1,
                           sigma: int = 40, eta: int = 30) -> tuple[int, int]:
    """The SecAgg+ degree k and threshold t for n clients: the least even k that is secure and correct.

    This is Bell et al.'s semi-honest analysis of the Harary-graph instantiation ([B20]; the same bounds
    as the authors' team's public parameter finder for it, re-derived here, not their Erdos-Renyi
    theorem): with at most corrupt_fraction * n corrupt clients (seen by the server) and
    dropout_fraction * n dropouts, k must make
    (1) the graph minus corrupt and dropped nodes stay connected, except with probability 2**-(sigma + 1)
        (else the server learns partial sums), see :func:`_harary_stays_connected`;
    (2) the threshold range of :func:`thresholds` non-empty (security 2**-(sigma + 1), correctness 2**-eta).
    t is the least secure threshold, and at least 2 (t = 1 would make each share the secret itself).
    The total failure probabilities are 2**-sigma (privacy) and 2**-eta (the server cannot finish).
    When no k < n - 1 works (small n), the complete graph k = n - 1 ([B17]) is returned with its
    threshold; ValueError when even that fails. Semi-honest server only: a malicious one needs
    t > (k + corrupt neighbours) / 2 and a consistency round, not covered here.

    Values at the defaults (k, t): n = 100: (42, 32); 1,000: (114, 78); 10,000: (144, 98);
    100,000: (156, 106); 1,000,000: (166, 112) -- k grows like log n. With sigma = 40, eta = 20 this
    reproduces the reference finder's published (k, t) (for example n = 1,000 at 0.33 / 0.33: (286, 150);
    10**6: (518, 270)), or at most a few more where counting neighbours among n - 1 others (here) instead
    of n (there) is stricter.
    """
    n = _check_int(n, "n", 2)
    sigma = _check_int(sigma, "sigma", 1)
    eta = _check_int(eta, "eta", 1)
    corrupt, dropped = _counts(corrupt_fraction, dropout_fraction, n)
    for k in range(2, n - 1, 2):
        if not _harary_stays_connected(n, k, corrupt + dropped, sigma):
            continue
        if not _may_be_feasible(n, k, corrupt, dropped, sigma, eta):
            continue
        t_min, t_max = thresholds(n, k, corrupt_fraction, dropout_fraction, sigma, eta)
        if max(t_min, 2) <= t_max:
            return k, max(t_min, 2)
    t_min, t_max = thresholds(n, n - 1, corrupt_fraction, dropout_fraction, sigma, eta)
    if max(t_min, 2) <= t_max:
        return n - 1, max(t_min, 2)
    raise ValueError(f"no degree and threshold are secure (sigma={sigma}) and correct (eta={eta}) for n={n}, "
                     f"corrupt_fraction={corrupt_fraction}, dropout_fraction={dropout_fraction}")
