"""Update codecs: one flat float32 update to ``bytes`` and back, for compressed communication.

A codec compresses the whole model update, flattened to one float32 vector of ``n`` values
(1 <= n <= 2**31 - 1), into ``bytes`` (:meth:`Codec.encode`, which draws its randomness from the
``numpy.random.Generator`` it is given) and decodes it back to a float32 vector of length ``n``
(:meth:`Codec.decode`, which checks every field of the payload and raises :class:`CodecError`,
and nothing else, on any malformed byte string). Everything is vectorized numpy: no Python loop
runs per value or per chunk. Build one from a config string with :func:`parse`.

Wire layout (little-endian, written with ``struct``). Every payload starts with a 1-byte scheme id
and a 1-byte version (1), then the scheme's fields and body:

=========  ==  ==============================================  ==================================================
scheme     id  header after id and version                     body
=========  ==  ==============================================  ==================================================
none        0  n: u64                                          n float32
uniform     1  n: u64, bits: u8, rotate: u8, chunk: u32,       m chunk minima (float32), m steps (float32),
               seed: u64 (0 unless rotate)                     N levels packed at ``bits`` bits each
qsgd        2  n: u64, levels s: u16, chunk: u32               m chunk L2 norms (float32), n codes packed at
                                                               w = ceil(log2(s+1)) + 1 bits (sign in the top bit)
topk        3  n: u64, k: u64, index width w: u8, values: u8   k index gaps packed at w bits (the first gap is the
                                                               first index), then the values: k float32
                                                               (values=0) or a nested uniform payload (values=1)
randk       4  n: u64, k: u64, seed: u64, values: u8           the values, as for topk (the indices are
                                                               regenerated from the seed)
=========  ==  ==============================================  ==================================================

N is n, or n padded to a multiple of the chunk when rotated; m = ceil(N / chunk). Packed bit
streams are little-endian: value i occupies bits i*w .. i*w + w - 1, least significant bit first,
and the last byte is padded with zero bits.

Schemes, their size at n = 1,000,000 (chunk 1024) and their error. Relative error is
||x^ - x|| / ||x||, measured at n = 1M on a standard normal vector and on a heavy-tailed one
(Student's t, 2 degrees of freedom), where rotation pays off:

====================  ==============  ==========================  ===========  ===========
spec                  bits per value  expected error              rel. N(0,1)  rel. t(2)
====================  ==============  ==========================  ===========  ===========
none                  32.00           0 (lossless)                0            0
uniform8              8.06            unbiased, (U)               0.010        0.047
uniform4              4.06            unbiased, (U)               0.18         0.84
uniform2              2.06            unbiased, (U)               0.89         3.8
uniform2+rotate       2.06            unbiased, (R)               0.89         0.67
qsgd (s = 16)         6.03            unbiased, (Q)               0.81         0.57
qsgd4                 4.03            unbiased, (Q)               2.3          1.4
topk0.01              0.43            biased, (T)                 0.96         0.47
topk0.01+uniform8     0.19            biased, (T) + (U) on k      0.96         0.47
randk0.01             0.32            biased, (K)                 0.995        0.996
randk0.01+uniform8    0.081           biased, (K) + (U) on k      0.995        0.998
====================  ==============  ==========================  ===========  ===========

- (U) per value variance <= step**2 / 4, step = (max - min) / (2**bits - 1) of its chunk;
- (R) E||x^ - x||**2 = O(log B / (2**bits - 1)**2) ||x||**2, B the rotation block (Suresh et al. 2017);
- (Q) per chunk of c values E||x^ - x||**2 <= min(c / s**2, sqrt(c) / s) ||x||**2 (Alistarh et al. 2017);
- (T) ||x^ - x||**2 <= (1 - k / n) ||x||**2; topk's size depends on the largest gap between kept indices;
- (K) E x^ = (k / n) x and E||x^ - x||**2 = (1 - k / n) ||x||**2.

The biased sparsifiers are meant to be paired with error feedback on the client.

Speed, encode + decode of 10M values on one core (``python -m benchmarks.run codecs``, AMD EPYC
family 25): uniform8 ~740 MB/s of float32 input, uniform4 ~640, uniform2+rotate ~280 (the two
Hadamard rotations take 60 of its ~140 ms), qsgd ~360, topk0.01 ~900, randk0.01 ~1700.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from functools import cache
from typing import Protocol, runtime_checkable

import numpy as np

from fedloom.errors import WireError

__all__ = [
    "QSGD",
    "Codec",
    "CodecError",
    "Identity",
    "RandomK",
    "TopK",
    "Uniform",
    "hadamard_transform",
    "pack_bits",
    "parse",
    "random_indices",
    "unpack_bits",
]

VERSION = 1
MAX_N = 2**31 - 1
_F32_MAX = float(np.finfo(np.float32).max)

_NONE, _UNIFORM, _QSGD, _TOPK, _RANDK = 0, 1, 2, 3, 4
_H_NONE = struct.Struct("<BBQ")  # scheme, version, n
_H_UNIFORM = struct.Struct("<BBQBBIQ")  # scheme, version, n, bits, rotate, chunk, seed
_H_QSGD = struct.Struct("<BBQHI")  # scheme, version, n, levels, chunk
_H_TOPK = struct.Struct("<BBQQBB")  # scheme, version, n, k, index width, values kind
_H_RANDK = struct.Struct("<BBQQQB")  # scheme, version, n, k, seed, values kind
_SCHEME_NAMES = {_NONE: "none", _UNIFORM: "uniform", _QSGD: "qsgd", _TOPK: "topk", _RANDK: "randk"}
_VALUES_FLOAT32, _VALUES_UNIFORM = 0, 1


class CodecError(WireError):
    """A compressed update's payload is malformed: its message says which field is wrong and how."""


@runtime_checkable
class Codec(Protocol):
    """Compresses one flat float32 vector into bytes and back."""

    @property
    def name(self) -> str:
        """The config string :func:`parse` turns back into this codec."""
        ...

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> bytes:
        """``x``: 1-D float32, finite. Randomness (rounding, rotation, coordinates) comes from ``rng``."""
        ...

    def decode(self, data: bytes, n: int) -> np.ndarray:
        """1-D float32 of length ``n``; raises :class:`CodecError` on any malformed input."""
        ...

    def bits_per_value(self, n: int) -> float:
        """Size of ``encode``'s output for ``n`` values, in bits per value."""
        ...


# ---------------------------------------------------------------------------------------------
# bit packing


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


_MAGIC = {1: (np.dtype("<u8"), sum(1 << (56 - 7 * i) for i in range(8)), 56),
          2: (np.dtype("<u4"), 0x01041040, 24),
          4: (np.dtype("<u2"), 0x0110, 8)}


@cache
def _unpack_table(width: int) -> np.ndarray:
    """For width 1, 2 or 4: byte value -> its 8 // width fields, one per byte, as one little-endian word."""
    per = 8 // width
    b = np.arange(256, dtype=np.uint16)[:, None]
    fields = ((b >> (width * np.arange(per, dtype=np.uint16))) & ((1 << width) - 1)).astype(np.uint8)
    table = np.ascontiguousarray(fields).view(_MAGIC[width][0]).ravel()
    table.setflags(write=False)
    return table


def _in_groups(values: np.ndarray, group: int, pack) -> np.ndarray:
    """``pack`` the values in whole groups; the last, partial group is padded with zeros."""
    rest = values.size % group
    if not rest:
        return pack(values)
    tail = np.zeros(group, values.dtype)
    tail[:rest] = values[values.size - rest:]
    if values.size == rest:
        return pack(tail)
    return np.concatenate([pack(values[: values.size - rest]), pack(tail)])


def _pack_small(v: np.ndarray, width: int) -> np.ndarray:
    """width 1, 2 or 4: one multiplication gathers a word's fields (one per byte) into its top byte."""
    dtype, magic, shift = _MAGIC[width]
    words = v.view(dtype)
    out = np.multiply(words, dtype.type(magic))  # wraps: only the top byte is kept
    out >>= dtype.type(shift)
    return out.astype(np.uint8)


def _pack_group8(v: np.ndarray, width: int) -> np.ndarray:
    """width 3, 5, 6, 7: eight values (one per byte of a u64) -> ``width`` bytes."""
    words = v.view("<u8")
    acc = words & np.uint64(0xFF)
    tmp = np.empty_like(acc)
    mask = (1 << width) - 1
    for j in range(1, 8):  # per field of a group, not per value
        np.right_shift(words, np.uint64(8 * j - width * j), out=tmp)
        tmp &= np.uint64(mask << (width * j))
        acc |= tmp
    return acc.view(np.uint8).reshape(-1, 8)[:, :width].ravel()


def _pack_matrix(values: np.ndarray, width: int) -> np.ndarray:
    """Any width up to 32 through a (count, width) bit matrix."""
    v = np.ascontiguousarray(values, dtype="<u4").view(np.uint8).reshape(-1, 4)
    bits = np.unpackbits(v, axis=1, bitorder="little")[:, :width]
    return np.packbits(bits.ravel(), bitorder="little")


def pack_bits(values: np.ndarray, width: int) -> np.ndarray:
    """Pack non-negative integers below ``2**width`` (1 <= width <= 32) densely, LSB first.

    Returns ``ceil(len(values) * width / 8)`` bytes as a uint8 array: value i occupies bits
    ``i*width .. i*width + width - 1`` of the little-endian bit stream.
    """
    if not 1 <= width <= 32:
        raise ValueError(f"bit width {width} is outside 1..32")
    values = np.asarray(values).ravel()
    count = values.size
    nbytes = _ceil_div(count * width, 8)
    if width == 8:
        return np.ascontiguousarray(values, dtype=np.uint8)
    if width > 8:
        return _pack_matrix(values, width)[:nbytes]
    v = np.ascontiguousarray(values, dtype=np.uint8)
    if width in _MAGIC:
        return _in_groups(v, 8 // width, lambda a: _pack_small(a, width))[:nbytes]
    return _in_groups(v, 8, lambda a: _pack_group8(a, width))[:nbytes]


def unpack_bits(buf: np.ndarray, width: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` values from ``buf`` (uint8, at least the packed length).

    uint8 for widths up to 8, uint32 above.
    """
    if not 1 <= width <= 32:
        raise ValueError(f"bit width {width} is outside 1..32")
    nbytes = _ceil_div(count * width, 8)
    buf = np.asarray(buf, dtype=np.uint8)[:nbytes]
    if width == 8:
        return buf
    if width > 8:
        bits = np.unpackbits(buf, count=count * width, bitorder="little").reshape(count, width)
        matrix = np.zeros((count, 32), np.uint8)
        matrix[:, :width] = bits
        return np.packbits(matrix, axis=1, bitorder="little").view("<u4").ravel().astype(np.uint32, copy=False)
    if width in _MAGIC:
        return np.take(_unpack_table(width), buf).view(np.uint8)[:count]
    groups = _ceil_div(count, 8)
    raw = np.zeros(groups * width, np.uint8)
    raw[:nbytes] = buf
    words8 = np.zeros((groups, 8), np.uint8)
    words8[:, :width] = raw.reshape(groups, width)
    words = words8.view("<u8").ravel()
    out = np.empty((groups, 8), np.uint8)
    tmp = np.empty_like(words)
    mask = np.uint64((1 << width) - 1)
    for j in range(8):  # per field of a group, not per value
        np.right_shift(words, np.uint64(width * j), out=tmp)
        tmp &= mask
        out[:, j] = tmp
    return out.ravel()[:count]


# ---------------------------------------------------------------------------------------------
# randomness, rotation, chunked quantization


_RAW64 = (np.random.PCG64, np.random.PCG64DXSM, np.random.Philox, np.random.SFC64)


def _uniform16(rng: np.random.Generator, size: int) -> np.ndarray:
    """``size`` independent uniform uint16 values (raw 64-bit draws split in four where the generator has them)."""
    if isinstance(rng.bit_generator, _RAW64):
        return rng.bit_generator.random_raw(_ceil_div(size, 4)).astype("<u8", copy=False).view("<u2")[:size]
    return rng.integers(0, 1 << 16, size, dtype=np.uint16)


def _draw_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**64, dtype=np.uint64))


@cache
def _hadamard(m: int) -> np.ndarray:
    """The orthonormal Sylvester-Hadamard matrix of size m (a power of two), float32."""
    h = np.ones((1, 1))
    while h.shape[0] < m:
        h = np.block([[h, h], [h, -h]])
    h = (h / math.sqrt(m)).astype(np.float32)
    h.setflags(write=False)
    return h


def hadamard_transform(y: np.ndarray, block: int, out: np.ndarray | None = None) -> np.ndarray:
    """The normalized Walsh-Hadamard transform H/sqrt(B) of each ``block``-long piece of ``y`` (float32).

    ``len(y)`` must be a multiple of ``block``, a power of two. The transform is orthonormal and
    symmetric, so it is its own inverse. It runs as two matrix products over all blocks at once
    (B = a*b with H_B = H_a (x) H_b: each block as an (a, b) matrix X becomes H_a X H_b), which
    measured 9x faster than log2(B) add/subtract passes. ``out`` (float32, y's size, may be ``y``)
    receives the result.
    """
    nblocks = y.size // block
    a = 1 << (int(math.log2(block)) // 2)
    b = block // a
    z = np.ascontiguousarray(y, dtype=np.float32).reshape(-1, b) @ _hadamard(b)
    if out is None:
        out = np.empty(y.size, np.float32)
    np.matmul(_hadamard(a), z.reshape(nblocks, a, b), out=out.reshape(nblocks, a, b))
    return out


def _sign_mask(seed: int, size: int) -> np.ndarray:
    """A float32 sign-bit mask (uint32: 0 or 1 << 31) of ``size`` random signs, from ``seed``."""
    raw = np.random.Generator(np.random.PCG64(seed)).bit_generator.random_raw(_ceil_div(size, 64))
    bits = np.unpackbits(raw.astype("<u8", copy=False).view(np.uint8), count=size, bitorder="little")
    return np.left_shift(bits, np.uint32(31), dtype=np.uint32)


def _chunks(size: int, chunk: int) -> list[slice]:
    """The whole chunks as one slice, and the last, shorter chunk as another (at most two)."""
    head = size - size % chunk
    return [s for s in (slice(0, head), slice(head, size)) if s.stop > s.start]


def _rows(a: np.ndarray, s: slice, chunk: int) -> np.ndarray:
    part = a[s]
    return part.reshape(-1, min(chunk, part.size))


def _chunk_steps(lo: np.ndarray, hi: np.ndarray, top: int) -> np.ndarray:
    """float32 steps (hi - lo) / top, rounded up where needed so that fl(fl(hi - lo) / step) <= top."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        span = hi - lo
        if not np.isfinite(span).all():
            raise ValueError("a chunk's range max - min overflows float32")
        step = span / np.float32(top)
        bad = (span > 0) & ((step == 0) | (span / np.where(step > 0, step, 1) > top))
        while bad.any():  # a few ulps at most
            step[bad] = np.nextafter(step[bad], np.float32(np.inf))
            bad = (span > 0) & (span / np.where(step > 0, step, 1) > top)
        if not (np.isfinite(step * np.float32(top)) & np.isfinite(lo + step * np.float32(top))).all():
            raise ValueError("values too close to float32's limit to quantize")
    return step


def _quantize(y: np.ndarray, chunk: int, top: int, rng: np.random.Generator, scratch: bool = False):
    """Stochastic rounding of ``y`` to levels 0..top per chunk: (minima, steps, uint8 levels).

    ``scratch``: ``y`` may be overwritten.
    """
    parts = _chunks(y.size, chunk)
    rows = [_rows(y, s, chunk) for s in parts]
    lo = np.concatenate([r.min(axis=1) for r in rows])
    hi = np.concatenate([r.max(axis=1) for r in rows])
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise ValueError("x must be finite")
    step = _chunk_steps(lo, hi, top)
    div = np.where(step > 0, step, np.float32(1))
    u = np.empty(y.size, np.float32)
    np.multiply(_uniform16(rng, y.size), np.float32(2.0**-16), out=u)
    t = y if scratch else np.empty(y.size, np.float32)
    levels = np.empty(y.size, np.uint8)
    first = 0
    for s, r in zip(parts, rows):  # the whole chunks, then the short last one
        c = slice(first, first + r.shape[0])
        first = c.stop
        tr = _rows(t, s, chunk)
        np.subtract(r, lo[c, None], out=tr)
        np.divide(tr, div[c, None], out=tr)
        tr += _rows(u, s, chunk)  # floor(t + u), u ~ U{0, 2**-16, ..}: rounds up with prob. ~ frac(t)
    np.copyto(levels, t, casting="unsafe")  # t + u >= 0: truncation is floor; <= top by _chunk_steps
    return lo, step, levels


def _dequantize(levels: np.ndarray, lo: np.ndarray, step: np.ndarray, chunk: int) -> np.ndarray:
    out = np.empty(levels.size, np.float32)
    first = 0
    for s in _chunks(levels.size, chunk):
        o = _rows(out, s, chunk)
        c = slice(first, first + o.shape[0])
        first = c.stop
        np.multiply(_rows(levels, s, chunk), step[c, None], out=o)
        o += lo[c, None]
    return out


def _as_vector(x: np.ndarray) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "fiu":
        raise ValueError(f"x must be a float32 vector, not {a.dtype}")
    if a.ndim != 1 or not 1 <= a.size <= MAX_N:
        raise ValueError(f"x must be 1-D with 1..{MAX_N} values, got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# decoding helpers


def _view(data: bytes) -> memoryview:
    try:
        return memoryview(data).cast("B")
    except TypeError as e:
        raise CodecError(f"payload must be bytes, not {type(data).__name__}") from e


def _expect_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 1 <= n <= MAX_N:
        raise CodecError(f"expected length n={n!r} is not an integer in 1..{MAX_N}")
    return int(n)


def _header(mv: memoryview, fmt: struct.Struct, scheme: int, n: int) -> tuple:
    name = _SCHEME_NAMES[scheme]
    if len(mv) < fmt.size:
        raise CodecError(f"{name} payload of {len(mv)} bytes is shorter than its {fmt.size}-byte header")
    fields = fmt.unpack_from(mv, 0)
    if fields[0] != scheme:
        got = _SCHEME_NAMES.get(fields[0], "unknown")
        raise CodecError(f"scheme id {fields[0]} ({got}) is not this codec's {scheme} ({name})")
    if fields[1] != VERSION:
        raise CodecError(f"{name} payload version {fields[1]} is not the supported {VERSION}")
    if fields[2] != n:
        raise CodecError(f"{name} header says n={fields[2]} values, the caller expects {n}")
    return fields[3:]


def _check_length(mv: memoryview, expected: int, name: str) -> None:
    if len(mv) != expected:
        word = "shorter" if len(mv) < expected else "longer"
        raise CodecError(f"{name} payload is {len(mv)} bytes, {word} than the {expected} its header says")


def _floats(mv: memoryview, offset: int, count: int) -> np.ndarray:
    return np.frombuffer(mv, "<f4", count, offset).astype(np.float32, copy=False)


def _bytes(mv: memoryview, offset: int, count: int) -> np.ndarray:
    return np.frombuffer(mv, np.uint8, count, offset)


def _check_finite(a: np.ndarray, what: str) -> None:
    if not np.isfinite(a).all():
        raise CodecError(f"non-finite {what} at position {int(np.flatnonzero(~np.isfinite(a))[0])}")


# ---------------------------------------------------------------------------------------------
# schemes


@dataclass(frozen=True)
class Identity:
    """Raw float32, no compression (``"none"``): the lossless reference. 32 bits per value + 10 bytes."""

    @property
    def name(self) -> str:
        return "none"

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> bytes:
        x = _as_vector(x)
        if not np.isfinite(x).all():
            raise ValueError("x must be finite")
        return b"".join([_H_NONE.pack(_NONE, VERSION, x.size), x.astype("<f4", copy=False)])

    def decode(self, data: bytes, n: int) -> np.ndarray:
        mv, n = _view(data), _expect_n(n)
        _header(mv, _H_NONE, _NONE, n)
        _check_length(mv, _H_NONE.size + 4 * n, "none")
        out = _floats(mv, _H_NONE.size, n).copy()
        _check_finite(out, "value")
        return out

    def bits_per_value(self, n: int) -> float:
        return (_H_NONE.size + 4 * n) * 8 / n


@dataclass(frozen=True)
class Uniform:
    """Unbiased stochastic uniform quantization with per-chunk scales (``"uniform8"``, ``"uniform2+rotate"``).

    Per chunk of ``chunk`` values (the last may be shorter) lo = min, hi = max, and 2**bits levels
    evenly spaced over [lo, hi], step = (hi - lo) / (2**bits - 1); a value v is sent as level
    floor((v - lo) / step + u), u uniform in [0, 1) (stochastic rounding, as in QSGD, Alistarh et
    al. 2017, and Suresh et al. 2017's stochastic k-level quantization), and decodes to
    lo + level * step. Unbiased; the variance per value is at most step**2 / 4. A constant chunk
    sends step 0 and decodes to lo exactly.

    u is drawn as 16-bit uniforms j / 2**16: a value rounds up with probability floor(2**16 f) / 2**16
    for a fractional part f, so the bias is in (-2**-16, 0] steps, zero whenever f is a multiple of
    2**-16 (every value in the top half of the 8-bit range), and of the order of float32's own
    rounding of the decoded value; 16-bit draws cost a quarter of float32 ones.

    ``rotate=True`` (Suresh et al. 2017, "Distributed Mean Estimation with Limited Communication",
    ICML): a 64-bit seed from ``rng`` gives random signs D; x is padded with zeros to a multiple of
    the block B = ``chunk`` (a power of two) and each block is rotated by the normalized Walsh-Hadamard
    transform H D x before quantization; the seed travels in the payload and decoding applies D H
    and drops the padding. The rotation spreads the mass evenly over a block, so hi - lo shrinks from
    O(max |x|) to O(||x_block|| sqrt(log B / B)) w.h.p. and E||x^ - x||**2 = O(log B / (2**bits - 1)**2)
    ||x||**2 (Suresh et al., Theorem 3), which matters most at 1 and 2 bits.

    Bits per value: bits + 64 / chunk (lo and step as float32 each: 8-bit at chunk 1024 is 8.06
    bits, 3.97x smaller than float32; float16 scales would save 0.03 bits but lose range) + a
    24-byte header; rotated, n counts its padding.
    """

    bits: int
    chunk: int = 1024
    rotate: bool = False

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer in 1..8, got {self.bits!r}")
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or not 1 <= self.chunk < 2**32:
            raise ValueError(f"chunk must be an integer in 1..{2**32 - 1}, got {self.chunk!r}")
        if self.rotate and self.chunk & (self.chunk - 1):
            raise ValueError(f"rotate=True needs chunk to be a power of two (the Hadamard block), got {self.chunk}")
        object.__setattr__(self, "rotate", bool(self.rotate))

    @property
    def name(self) -> str:
        return f"uniform{self.bits}" + ("+rotate" if self.rotate else "")

    def _padded(self, n: int) -> int:
        return _ceil_div(n, self.chunk) * self.chunk if self.rotate else n

    def _size(self, n: int) -> int:
        size = self._padded(n)
        return _H_UNIFORM.size + 8 * _ceil_div(size, self.chunk) + _ceil_div(size * self.bits, 8)

    def bits_per_value(self, n: int) -> float:
        return self._size(n) * 8 / n

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> bytes:
        x = _as_vector(x)
        n = x.size
        seed = 0
        y = x
        if self.rotate:
            seed = _draw_seed(rng)
            y = np.zeros(self._padded(n), np.float32)
            np.bitwise_xor(x.view(np.uint32), _sign_mask(seed, n), out=y[:n].view(np.uint32))
            with np.errstate(over="ignore", invalid="ignore"):
                hadamard_transform(y, self.chunk, out=y)
        try:
            lo, step, levels = _quantize(y, self.chunk, (1 << self.bits) - 1, rng, scratch=self.rotate)
        except ValueError:
            if self.rotate and np.isfinite(x).all():
                raise ValueError("the rotated values overflow float32") from None
            raise
        header = _H_UNIFORM.pack(_UNIFORM, VERSION, n, self.bits, int(self.rotate), self.chunk, seed)
        return b"".join([header, lo.astype("<f4", copy=False), step.astype("<f4", copy=False),
                         pack_bits(levels, self.bits)])

    def decode(self, data: bytes, n: int) -> np.ndarray:
        mv, n = _view(data), _expect_n(n)
        bits, rotate, chunk, seed = _header(mv, _H_UNIFORM, _UNIFORM, n)
        if not 1 <= bits <= 8:
            raise CodecError(f"uniform bit width {bits} is outside 1..8")
        if bits != self.bits:
            raise CodecError(f"uniform bit width {bits} is not this codec's {self.bits}")
        if rotate not in (0, 1) or bool(rotate) != self.rotate:
            raise CodecError(f"uniform rotate flag {rotate} is not this codec's {int(self.rotate)}")
        if chunk == 0:
            raise CodecError("uniform chunk size is 0")
        if chunk != self.chunk:
            raise CodecError(f"uniform chunk size {chunk} is not this codec's {self.chunk}")
        if not rotate and seed:
            raise CodecError(f"uniform payload without rotation carries a seed ({seed})")
        size = self._padded(n)
        m = _ceil_div(size, chunk)
        _check_length(mv, self._size(n), "uniform")
        lo = _floats(mv, _H_UNIFORM.size, m)
        step = _floats(mv, _H_UNIFORM.size + 4 * m, m)
        _check_finite(lo, "chunk minimum")
        _check_finite(step, "chunk step")
        if (step < 0).any():
            raise CodecError(f"negative chunk step at chunk {int(np.argmax(step < 0))}")
        top = np.float32((1 << bits) - 1)
        with np.errstate(over="ignore", invalid="ignore"):
            hi = lo + step * top
            _check_finite(hi, "chunk maximum (minimum + top level * step)")
        levels = unpack_bits(_bytes(mv, _H_UNIFORM.size + 8 * m, _ceil_div(size * bits, 8)), bits, size)
        y = _dequantize(levels, lo, step, chunk)
        if not rotate:
            return y
        with np.errstate(over="ignore", invalid="ignore"):
            hadamard_transform(y, chunk, out=y)
        # |rotated| <= sqrt(B) max |value|: check the values only where that bound could overflow
        if max(float(np.abs(lo).max()), float(np.abs(hi).max())) * math.sqrt(chunk) * 1.001 >= _F32_MAX:
            _check_finite(y, "decoded value (the inverse rotation overflows float32)")
        out = np.empty(n, np.float32)
        np.bitwise_xor(y[:n].view(np.uint32), _sign_mask(seed, n), out=out.view(np.uint32))
        return out


@dataclass(frozen=True)
class QSGD:
    """QSGD (Alistarh et al. 2017, "QSGD: Communication-Efficient SGD via Gradient Quantization and Encoding").

    Per chunk of ``chunk`` values, the L2 norm (float32); each value v sends its sign and a level
    l in 0..s (s = ``levels``), l = floor(|v| / norm * s + u) with u uniform in [0, 1) (16-bit
    draws, as in :class:`Uniform`), and decodes to norm * sign * l / s. Unbiased; per chunk of c
    values E||x^ - x||**2 <= min(c / s**2, sqrt(c) / s) ||x||**2 (the paper's Lemma 3.1), and per
    value the variance is at most (norm / s)**2 / 4.

    Deviation from the paper: instead of Elias coding of the levels, each value's sign and level
    are packed at a fixed width of ceil(log2(s + 1)) + 1 bits (6 at s = 16: 6.03 bits per value with
    the chunk norms at chunk 1024, + a 16-byte header). ``levels`` is in 1..127 (widths up to 8).
    """

    levels: int = 16
    chunk: int = 1024

    def __post_init__(self):
        if isinstance(self.levels, bool) or not isinstance(self.levels, int) or not 1 <= self.levels <= 127:
            raise ValueError(f"levels must be an integer in 1..127, got {self.levels!r}")
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or not 1 <= self.chunk < 2**32:
            raise ValueError(f"chunk must be an integer in 1..{2**32 - 1}, got {self.chunk!r}")

    @property
    def name(self) -> str:
        return "qsgd" if self.levels == 16 else f"qsgd{self.levels}"

    @property
    def width(self) -> int:
        """Bits per value: the level's ceil(log2(s + 1)) and the sign."""
        return self.levels.bit_length() + 1

    def _size(self, n: int) -> int:
        return _H_QSGD.size + 4 * _ceil_div(n, self.chunk) + _ceil_div(n * self.width, 8)

    def bits_per_value(self, n: int) -> float:
        return self._size(n) * 8 / n

    def _scales(self, norm: np.ndarray) -> np.ndarray:
        return norm / np.float32(self.levels)

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> bytes:
        x = _as_vector(x)
        n, s, chunk = x.size, self.levels, self.chunk
        parts = _chunks(n, chunk)
        rows = [_rows(x, p, chunk) for p in parts]
        norm = np.concatenate([np.sqrt(np.einsum("ij,ij->i", r, r, dtype=np.float64)) for r in rows])
        if not np.isfinite(norm).all():
            raise ValueError("x must be finite")
        with np.errstate(over="ignore"):
            norm = norm.astype(np.float32)
            scale = self._scales(norm)
            if not (np.isfinite(norm).all() and np.isfinite(scale * np.float32(s)).all()):
                raise ValueError("a chunk's L2 norm overflows float32")
        div = np.where(scale > 0, scale, np.float32(1))
        t = np.abs(x)
        first = 0
        for p in parts:
            tr = _rows(t, p, chunk)
            c = slice(first, first + tr.shape[0])
            first = c.stop
            np.divide(tr, div[c, None], out=tr)
        t += np.multiply(_uniform16(rng, n), np.float32(2.0**-16), dtype=np.float32)
        codes = t.astype(np.uint8)  # t <= s (1 + eps) + 1 < 256
        np.minimum(codes, np.uint8(s), out=codes)  # float rounding may put |v| / scale a hair above s
        codes |= np.signbit(x).view(np.uint8) << np.uint8(self.width - 1)
        header = _H_QSGD.pack(_QSGD, VERSION, n, s, chunk)
        return b"".join([header, norm.astype("<f4", copy=False), pack_bits(codes, self.width)])

    def decode(self, data: bytes, n: int) -> np.ndarray:
        mv, n = _view(data), _expect_n(n)
        s, chunk = _header(mv, _H_QSGD, _QSGD, n)
        if not 1 <= s <= 127:
            raise CodecError(f"qsgd levels {s} outside 1..127")
        if s != self.levels:
            raise CodecError(f"qsgd levels {s} is not this codec's {self.levels}")
        if chunk == 0:
            raise CodecError("qsgd chunk size is 0")
        if chunk != self.chunk:
            raise CodecError(f"qsgd chunk size {chunk} is not this codec's {self.chunk}")
        m = _ceil_div(n, chunk)
        _check_length(mv, self._size(n), "qsgd")
        norm = _floats(mv, _H_QSGD.size, m)
        _check_finite(norm, "chunk norm")
        if (norm < 0).any():
            raise CodecError(f"negative chunk norm at chunk {int(np.argmax(norm < 0))}")
        scale = self._scales(norm)
        with np.errstate(over="ignore"):
            _check_finite(scale * np.float32(s), "chunk norm (overflows float32 once decoded)")
        codes = unpack_bits(_bytes(mv, _H_QSGD.size + 4 * m, _ceil_div(n * self.width, 8)), self.width, n)
        sign = codes >> np.uint8(self.width - 1)
        level = codes & np.uint8((1 << (self.width - 1)) - 1)
        top = int(level.max())
        if top > s:
            raise CodecError(f"qsgd level {top} at position {int(np.argmax(level > s))} exceeds s={s}")
        out = np.empty(n, np.float32)
        first = 0
        for p in _chunks(n, chunk):
            o = _rows(out, p, chunk)
            c = slice(first, first + o.shape[0])
            first = c.stop
            np.multiply(_rows(level, p, chunk), scale[c, None], out=o)
        out.view(np.uint32)[...] ^= np.left_shift(sign, np.uint32(31), dtype=np.uint32)
        return out


def _values_kind(values: Uniform | None) -> int:
    return _VALUES_FLOAT32 if values is None else _VALUES_UNIFORM


def _encode_values(values: Uniform | None, v: np.ndarray, rng: np.random.Generator):
    if not np.isfinite(v).all():
        raise ValueError("x must be finite")
    return v.astype("<f4", copy=False) if values is None else values.encode(v, rng)


def _values_size(values: Uniform | None, k: int) -> int:
    return 4 * k if values is None else values._size(k)


def _decode_values(values: Uniform | None, kind: int, mv: memoryview, offset: int, k: int, name: str):
    if kind not in (_VALUES_FLOAT32, _VALUES_UNIFORM):
        raise CodecError(f"{name} values kind {kind} is neither 0 (float32) nor 1 (uniform)")
    if kind != _values_kind(values):
        want = "float32" if values is None else values.name
        raise CodecError(f"{name} values kind {kind} is not this codec's ({want})")
    if values is None:
        _check_length(mv, offset + 4 * k, name)
        v = _floats(mv, offset, k)
        _check_finite(v, f"{name} value")
        return v
    try:
        return values.decode(mv[offset:], k)
    except CodecError as e:
        raise CodecError(f"{name} values: {e.message}") from e


def _fraction(value) -> float:
    f = float(value)
    if not 0 < f <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {value!r}")
    return f


def _k(fraction: float, n: int) -> int:
    return min(n, max(1, math.ceil(fraction * n)))


@dataclass(frozen=True)
class _Sparse:
    """What top-k and random-k share: the fraction kept, and how the kept values travel (float32 or ``values``)."""

    kind = ""  # the spec's prefix
    fraction: float
    values: Uniform | None = None

    def __post_init__(self):
        object.__setattr__(self, "fraction", _fraction(self.fraction))
        if self.values is not None and not isinstance(self.values, Uniform):
            raise ValueError(f"values must be a Uniform codec or None, got {self.values!r}")

    @property
    def name(self) -> str:
        return f"{self.kind}{self.fraction!r}" + (f"+{self.values.name}" if self.values else "")

    def k(self, n: int) -> int:
        """How many values are kept of ``n``."""
        return _k(self.fraction, n)

    def _check_k(self, k: int, n: int) -> None:
        """A payload's k: in range, and the one this codec keeps of ``n``."""
        if not 0 < k <= n:
            raise CodecError(f"{self.kind} k={k} is out of range 1..n={n}")
        if k != self.k(n):
            raise CodecError(f"{self.kind} k={k} is not this codec's k={self.k(n)} for n={n}")


@dataclass(frozen=True)
class TopK(_Sparse):
    """Top-k sparsification (``"topk0.01"``, ``"topk0.01+uniform8"``): the k = max(1, ceil(fraction * n))
    values of largest magnitude, zeros elsewhere.

    Selected with ``np.argpartition`` (no full sort). The sorted indices travel as gaps (the first
    index, then the differences, all >= 1) bit-packed at the smallest width w that holds the
    largest gap; the values as float32, or quantized by ``values`` (a :class:`Uniform`, e.g. 8-bit).

    Not unbiased: ||x^ - x||**2 <= (1 - k / n) ||x||**2 (a contraction), plus the values'
    quantization error. Pair it with error feedback on the client (Seide et al. 2014, "1-bit SGD";
    Stich et al. 2018, "Sparsified SGD with Memory"; Karimireddy et al. 2019, "Error Feedback Fixes
    SignSGD"), which makes the compressed SGD converge like the uncompressed one.

    Bits per value: (w + 32) * k / n with float32 values (w ~ log2(n / k * ln k) for scattered
    indices: 11 bits at n = 1M, k = 10k, so ~0.43 bits per value at 1%), (w + 8.06) * k / n with
    8-bit values, + a 20-byte header.
    """

    kind = "topk"

    def bits_per_value(self, n: int, width: int | None = None) -> float:
        """Exact for a given index ``width`` (the payload's header byte 18: the size depends on the data).

        By default, the width that the largest gap among k uniformly scattered indices, about
        (n / k) (ln k + a Gumbel variable), stays under 9 times in 10: that of (n / k) (ln k + 2.25).
        """
        k = self.k(n)
        if width is None:
            gap = math.ceil(n / k * (math.log(k) + 2.25))
            width = 1 if k == n else max(1, min((n - 1).bit_length(), gap.bit_length()))
        return (_H_TOPK.size + _ceil_div(k * width, 8) + _values_size(self.values, k)) * 8 / n

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> bytes:
        x = _as_vector(x)
        n = x.size
        k = self.k(n)
        if k < n:
            idx = np.argpartition(np.abs(x), n - k)[n - k:]
            idx.sort()
        else:
            idx = np.arange(n)
        v = x[idx]
        gaps = np.empty(k, np.int64)
        gaps[0] = idx[0]
        np.subtract(idx[1:], idx[:-1], out=gaps[1:])
        width = max(1, int(gaps.max()).bit_length())
        body = _encode_values(self.values, v, rng)
        header = _H_TOPK.pack(_TOPK, VERSION, n, k, width, _values_kind(self.values))
        return b"".join([header, pack_bits(gaps, width), body])

    def decode(self, data: bytes, n: int) -> np.ndarray:
        mv, n = _view(data), _expect_n(n)
        k, width, kind = _header(mv, _H_TOPK, _TOPK, n)
        self._check_k(k, n)
        if not 1 <= width <= 32:
            raise CodecError(f"topk index width {width} is outside 1..32")
        gap_bytes = _ceil_div(k * width, 8)
        offset = _H_TOPK.size + gap_bytes
        if len(mv) < offset:
            raise CodecError(f"topk payload is {len(mv)} bytes, shorter than its header and {gap_bytes} index bytes")
        gaps = unpack_bits(_bytes(mv, _H_TOPK.size, gap_bytes), width, k).astype(np.int64)
        if k > 1 and not gaps[1:].all():
            raise CodecError(f"topk indices are not strictly increasing (a zero gap at {int(np.argmin(gaps[1:])) + 1})")
        idx = np.cumsum(gaps)
        if idx[-1] >= n:
            raise CodecError(f"topk index {int(idx[-1])} is out of range for n={n}")
        v = _decode_values(self.values, kind, mv, offset, k, "topk")
        out = np.zeros(n, np.float32)
        out[idx] = v
        return out


def random_indices(seed: int, n: int, k: int) -> np.ndarray:
    """k distinct indices in 0..n-1, sorted, uniformly random and determined by ``seed`` (int64).

    For k <= n / 16: draw about -n ln(1 - k/n) random integers from PCG64(seed) (topping up in
    rounds until k distinct ones were seen) and keep the first k distinct ones in draw order, a
    uniform k-subset (np.unique sorts them: O(k log k)). Above: the k smallest of n random 64-bit
    keys (argpartition, O(n)). ``rng.choice(n, k, replace=False)`` is far slower for large n.
    """
    g = np.random.Generator(np.random.PCG64(seed))
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if 16 * k > n:
        keys = g.bit_generator.random_raw(n)
        idx = np.argpartition(keys, k - 1)[:k]
        idx.sort()
        return idx.astype(np.int64, copy=False)
    expected = -n * math.log1p(-k / n)
    draws = g.integers(0, n, int(expected + 4 * math.sqrt(expected) + 16), dtype=np.int64)
    while True:  # rounds of top-up draws, rarely more than one
        distinct, first = np.unique(draws, return_index=True)
        if distinct.size >= k:
            break
        more = g.integers(0, n, 2 * (k - distinct.size) + 16, dtype=np.int64)
        draws = np.concatenate([draws, more])
    if distinct.size > k:
        distinct = distinct[first <= np.partition(first, k - 1)[k - 1]]
    return distinct


@dataclass(frozen=True)
class RandomK(_Sparse):
    """Random-k sparsification (``"randk0.01"``, ``"randk0.01+uniform8"``): k = max(1, ceil(fraction * n))
    coordinates drawn uniformly without replacement, zeros elsewhere.

    The coordinates come from a 64-bit seed drawn from ``rng``; the payload carries the seed, not the
    indices, and decoding regenerates them (:func:`random_indices`). The values are sent unscaled
    (float32, or quantized by ``values``), as rand-k with memory in Stich et al. 2018 ("Sparsified
    SGD with Memory"): biased, E x^ = (k / n) x and E||x^ - x||**2 = (1 - k / n) ||x||**2; pair it
    with error feedback (scaling by n / k would make it unbiased at a variance of (n / k - 1) ||x||**2).

    Bits per value: 32 k / n with float32 values (0.32 at 1%), 8.06 k / n with 8-bit values, + a
    27-byte header.
    """

    kind = "randk"

    def bits_per_value(self, n: int) -> float:
        return (_H_RANDK.size + _values_size(self.values, self.k(n))) * 8 / n

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> bytes:
        x = _as_vector(x)
        n = x.size
        k = self.k(n)
        seed = _draw_seed(rng)
        body = _encode_values(self.values, x[random_indices(seed, n, k)], rng)
        return b"".join([_H_RANDK.pack(_RANDK, VERSION, n, k, seed, _values_kind(self.values)), body])

    def decode(self, data: bytes, n: int) -> np.ndarray:
        mv, n = _view(data), _expect_n(n)
        k, seed, kind = _header(mv, _H_RANDK, _RANDK, n)
        self._check_k(k, n)
        v = _decode_values(self.values, kind, mv, _H_RANDK.size, k, "randk")
        out = np.zeros(n, np.float32)
        out[random_indices(seed, n, k)] = v
        return out


# ---------------------------------------------------------------------------------------------
# config strings

_FLOAT = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_UNIFORM_RE = r"uniform([1-8])(\+rotate)?"
_SPEC_FORMS = ("none; uniform1 .. uniform8, optionally +rotate (uniform2+rotate); qsgd (16 levels) or qsgdS "
               "(S levels, 1..127, e.g. qsgd4); topkF or randkF with 0 < F <= 1 (topk0.01, randk0.01), "
               "optionally +uniformB[+rotate] for the kept values (topk0.01+uniform8)")


def parse(spec: str) -> Codec:
    """The codec a config string names (chunk 1024): see the module docstring's table.

    ``parse(codec.name) == codec`` for every codec with the default chunk.
    """
    text = spec.strip().lower() if isinstance(spec, str) else ""
    try:
        if text == "none":
            return Identity()
        if m := re.fullmatch(_UNIFORM_RE, text):
            return Uniform(int(m[1]), rotate=bool(m[2]))
        if m := re.fullmatch(r"qsgd(\d+)?", text):
            return QSGD(int(m[1]) if m[1] else 16)
        if m := re.fullmatch(rf"(topk|randk)({_FLOAT})(?:\+{_UNIFORM_RE})?", text):
            values = Uniform(int(m[3]), rotate=bool(m[4])) if m[3] else None
            return (TopK if m[1] == "topk" else RandomK)(float(m[2]), values)
    except ValueError as e:
        raise ValueError(f"bad codec {spec!r}: {e}; valid forms: {_SPEC_FORMS}") from e
    raise ValueError(f"unknown codec {spec!r}; valid forms: {_SPEC_FORMS}")
