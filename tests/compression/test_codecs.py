"""Update codecs: unbiasedness, exact round trips of the lossless parts, sizes, and the payload checks."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from fedloom.compression.codecs import (
    QSGD,
    Codec,
    CodecError,
    Identity,
    RandomK,
    TopK,
    Uniform,
    hadamard_transform,
    pack_bits,
    parse,
    random_indices,
    unpack_bits,
)
from fedloom.errors import WireError

SPECS = ["none", "uniform8", "uniform3", "uniform1", "uniform2+rotate", "qsgd", "qsgd4", "topk0.01",
         "topk0.3+uniform8", "topk0.01+uniform4+rotate", "randk0.01", "randk0.5+uniform8"]
H_UNIFORM = struct.Struct("<BBQBBIQ")  # scheme, version, n, bits, rotate, chunk, seed
H_QSGD = struct.Struct("<BBQHI")  # scheme, version, n, levels, chunk
H_TOPK = struct.Struct("<BBQQBB")  # scheme, version, n, k, index width, values kind
H_RANDK = struct.Struct("<BBQQQB")  # scheme, version, n, k, seed, values kind


def vector(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def chunk_ranges(x: np.ndarray, chunk: int) -> list[slice]:
    return [slice(i, min(i + chunk, x.size)) for i in range(0, x.size, chunk)]


def draws(codec: Codec, x: np.ndarray, count: int, seed: int = 1) -> tuple[np.ndarray, list[bytes]]:
    rng = np.random.default_rng(seed)
    payloads = [codec.encode(x, rng) for _ in range(count)]
    return np.stack([codec.decode(p, x.size) for p in payloads]), payloads


# ------------------------------------------------------------------------------- unbiasedness

DRAWS = 2000


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_uniform_is_unbiased(bits, rotate):
    x = vector(200, seed=bits)
    chunk = 64  # 200 values: three whole chunks and a short one (padded to 256 when rotated)
    codec = Uniform(bits, chunk=chunk, rotate=rotate)
    decoded, payloads = draws(codec, x, DRAWS)
    top = 2**bits - 1
    if rotate:  # the steps are those of the rotated vector: read them from the payloads
        m = 4
        step = max(np.frombuffer(p, "<f4", m, H_UNIFORM.size + 4 * m).max() for p in payloads)
        step = np.full(x.size, step)
    else:
        step = np.empty(x.size)
        for s in chunk_ranges(x, chunk):
            step[s] = (x[s].max() - x[s].min()) / top
    # per value variance <= step**2 / 4; 5 standard errors of the mean, plus the 2**-16-step rounding bias
    tolerance = 5 * np.sqrt(step**2 / 4 / DRAWS) + step * 2.0**-15 + 1e-6
    error = np.abs(decoded.mean(axis=0, dtype=np.float64) - x)
    assert (error <= tolerance).all(), (error / tolerance).max()
    assert decoded.std(axis=0).max() > 0  # it is random


@pytest.mark.parametrize("levels", [16, 4])
def test_qsgd_is_unbiased(levels):
    x = vector(200, seed=levels)
    codec = QSGD(levels, chunk=64)
    decoded, _ = draws(codec, x, DRAWS)
    scale = np.empty(x.size)
    for s in chunk_ranges(x, 64):
        scale[s] = np.linalg.norm(x[s].astype(np.float64)) / levels
    # per value: norm/s times a Bernoulli level offset, variance <= (norm / s)**2 / 4 (Alistarh et al., Lemma 3.1)
    tolerance = 5 * np.sqrt(scale**2 / 4 / DRAWS) + scale * 2.0**-15 + 1e-6
    error = np.abs(decoded.mean(axis=0, dtype=np.float64) - x)
    assert (error <= tolerance).all(), (error / tolerance).max()
    levels_seen = np.unique(np.round(np.abs(decoded[:, :64]) / scale[0]))
    assert levels_seen.max() <= levels


# ------------------------------------------------------------------------- lossless round trips


def test_identity_round_trip_is_exact():
    x = vector(1001)
    data = Identity().encode(x, np.random.default_rng(0))
    y = Identity().decode(data, x.size)
    assert y.dtype == np.float32 and np.array_equal(y, x)
    y[0] = 1.0  # a writable copy, not a view of the payload


@pytest.mark.parametrize("width", range(1, 33))
def test_bit_packing_round_trips_every_width(width):
    rng = np.random.default_rng(width)
    for count in (1, 7, 8, 9, 1001):
        values = rng.integers(0, 2**width, count, dtype=np.uint64)
        values[0] = 2**width - 1
        packed = pack_bits(values, width)
        assert packed.dtype == np.uint8 and packed.size == -(-count * width // 8)
        # the same LSB-first bit stream as a plain bit matrix, whatever the fast path
        bits = (values[:, None] >> np.arange(width, dtype=np.uint64)) & np.uint64(1)
        assert np.array_equal(packed, np.packbits(bits.astype(np.uint8).ravel(), bitorder="little"))
        assert np.array_equal(unpack_bits(packed, width, count).astype(np.uint64), values)


@pytest.mark.parametrize("fraction", [0.01, 0.3, 1.0])
def test_topk_keeps_the_largest_exactly(fraction):
    x = vector(10_000)
    codec = TopK(fraction)
    k = codec.k(x.size)
    data = codec.encode(x, np.random.default_rng(0))
    y = codec.decode(data, x.size)
    kept = np.argpartition(np.abs(x), x.size - k)[x.size - k:]
    assert set(np.flatnonzero(y)) == set(kept.tolist())
    assert np.array_equal(y[kept], x[kept])
    width = H_TOPK.unpack_from(data)[4]
    gaps = np.diff(np.sort(kept), prepend=0)
    assert width == max(1, int(gaps.max()).bit_length())


def test_topk_with_quantized_values():
    x = vector(10_000)
    codec = parse("topk0.01+uniform8")
    y = codec.decode(codec.encode(x, np.random.default_rng(0)), x.size)
    kept = np.argpartition(np.abs(x), x.size - 100)[x.size - 100:]
    assert set(np.flatnonzero(y)) <= set(kept.tolist())
    step = (x[kept].max() - x[kept].min()) / 255
    assert np.abs(y[kept] - x[kept]).max() <= step * 1.001


@pytest.mark.parametrize("block", [1, 2, 8, 64, 128, 1024])
def test_hadamard_rotation_is_orthonormal_and_its_own_inverse(block):
    y = vector(4 * block)
    h = np.ones((1, 1))
    while h.shape[0] < block:
        h = np.block([[h, h], [h, -h]])
    dense = (y.reshape(4, block).astype(np.float64) @ h.T / np.sqrt(block)).ravel()
    z = hadamard_transform(y, block)
    assert np.allclose(z, dense, atol=1e-5)
    assert np.isclose(np.linalg.norm(z), np.linalg.norm(y), rtol=1e-5)
    assert np.allclose(hadamard_transform(z, block), y, atol=1e-5)


def test_rotated_uniform_decodes_close():
    x = vector(3000)
    codec = Uniform(8, chunk=256, rotate=True)
    y = codec.decode(codec.encode(x, np.random.default_rng(0)), x.size)
    assert np.linalg.norm(y - x) / np.linalg.norm(x) < 0.02
    with pytest.raises(ValueError, match="power of two"):
        Uniform(2, chunk=1000, rotate=True)


@pytest.mark.parametrize(("n", "k"), [(10_000, 100), (10_000, 5000), (50, 50), (1, 1)])
def test_random_indices_are_reproducible_distinct_and_sorted(n, k):
    a, b = random_indices(7, n, k), random_indices(7, n, k)
    assert np.array_equal(a, b) and a.size == k
    assert (np.diff(a) > 0).all() and a[0] >= 0 and a[-1] < n
    if k < n:
        assert not np.array_equal(a, random_indices(8, n, k))


@pytest.mark.parametrize("k", [5, 50])
def test_random_indices_are_uniform(k):
    n, seeds = 100, 3000
    counts = np.bincount(np.concatenate([random_indices(s, n, k) for s in range(seeds)]), minlength=n)
    p = k / n
    assert np.abs(counts - seeds * p).max() < 6 * np.sqrt(seeds * p * (1 - p))


def test_randk_decodes_the_seeded_coordinates():
    x = vector(10_000)
    codec = RandomK(0.01)
    data = codec.encode(x, np.random.default_rng(3))
    y = codec.decode(data, x.size)
    seed = H_RANDK.unpack_from(data)[4]
    idx = random_indices(seed, x.size, 100)
    assert np.array_equal(np.flatnonzero(y), idx)
    assert np.array_equal(y[idx], x[idx])
    assert len(data) == H_RANDK.size + 400  # the seed travels, not the indices


def test_constant_chunk_decodes_exactly():
    x = vector(300)
    x[64:128] = np.float32(3.25)
    for codec in (Uniform(1, chunk=64), Uniform(8, chunk=64), QSGD(chunk=64)):
        y = codec.decode(codec.encode(x, np.random.default_rng(0)), x.size)
        if isinstance(codec, Uniform):
            assert (y[64:128] == np.float32(3.25)).all()
        z = np.zeros(300, np.float32)
        assert np.array_equal(codec.decode(codec.encode(z, np.random.default_rng(0)), 300), z)
    c = np.full(1000, -7.5, np.float32)
    assert np.array_equal(Uniform(2).decode(Uniform(2).encode(c, np.random.default_rng(0)), 1000), c)


@pytest.mark.parametrize("spec", SPECS)
def test_bits_per_value_is_the_payload_size(spec):
    codec = parse(spec)
    for n in (1, 1000, 10_007):
        data = codec.encode(vector(n), np.random.default_rng(0))
        if isinstance(codec, TopK):
            expected = codec.bits_per_value(n, width=H_TOPK.unpack_from(data)[4])
        else:
            expected = codec.bits_per_value(n)
        assert len(data) * 8 / n == expected
    assert abs(parse("uniform8").bits_per_value(1_000_000) - 8.06) < 0.01


def test_steps_keep_every_level_in_range():
    from fedloom.compression.codecs import _chunk_steps

    rng = np.random.default_rng(0)
    lo = (rng.standard_normal(200_000) * 10.0 ** rng.integers(-40, 30, 200_000)).astype(np.float32)
    hi = (lo + np.abs(rng.standard_normal(200_000)) * 10.0 ** rng.integers(-44, 30, 200_000)).astype(np.float32)
    hi[:10] = lo[:10]
    for top in (1, 3, 7, 255):
        step = _chunk_steps(lo, hi, top)
        span = hi - lo
        assert (step[span == 0] == 0).all() and (step[span > 0] > 0).all()
        assert (span[span > 0] / step[span > 0] <= top).all()  # so floor(t + u) <= top


@pytest.mark.parametrize("spec", SPECS)
def test_encode_leaves_the_input_alone(spec):
    x = vector(3000)
    parse(spec).encode(x, np.random.default_rng(0))
    assert np.array_equal(x, vector(3000))


@pytest.mark.parametrize("spec", [s for s in SPECS if not s.startswith("randk")])
def test_encode_refuses_non_finite_input(spec):
    x = vector(500)
    x[7] = np.nan
    with pytest.raises(ValueError, match="finite"):
        parse(spec).encode(x, np.random.default_rng(0))


# ------------------------------------------------------------------------------ malformed input


def patched(data: bytes, offset: int, fmt: str, value) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def raises(codec: Codec, data: bytes, n: int, match: str) -> None:
    with pytest.raises(CodecError, match=match) as info:
        codec.decode(data, n)
    assert isinstance(info.value, WireError) and info.value.code == "bad_message"


def test_uniform_payload_checks():
    x, n, codec = vector(1000), 1000, Uniform(4, chunk=128)
    data = codec.encode(x, np.random.default_rng(0))
    m = 8
    raises(codec, data[:-1], n, "shorter than")
    raises(codec, data + b"\0", n, "longer than")
    raises(codec, data[:10], n, "header")
    raises(codec, data, 999, "n=1000 values, the caller expects 999")
    raises(QSGD(), data, n, "scheme id 1")
    raises(codec, patched(data, 1, "<B", 2), n, "version")
    raises(codec, patched(data, 10, "<B", 0), n, "bit width 0 is outside 1..8")
    raises(codec, patched(data, 10, "<B", 9), n, "bit width 9 is outside 1..8")
    raises(codec, patched(data, 10, "<B", 8), n, "bit width 8 is not this codec's 4")
    raises(codec, patched(data, 11, "<B", 1), n, "rotate flag")
    raises(codec, patched(data, 12, "<I", 0), n, "chunk size is 0")
    raises(codec, patched(data, 12, "<I", 64), n, "chunk size 64 is not this codec's 128")
    raises(codec, patched(data, 24, "<f", np.nan), n, "non-finite chunk minimum")
    raises(codec, patched(data, 24 + 4 * m, "<f", np.inf), n, "non-finite chunk step")
    raises(codec, patched(data, 24 + 4 * m, "<f", -1.0), n, "negative chunk step")
    raises(codec, patched(data, 24 + 4 * m, "<f", 3e38), n, "chunk maximum")
    raises(codec, b"", n, "shorter")
    raises(codec, "text", n, "must be bytes")  # type: ignore[arg-type]
    raises(codec, data, 0, "expected length")


def test_qsgd_payload_checks():
    x, n, codec = vector(1000), 1000, QSGD(16, chunk=128)  # 6-bit codes: levels up to 31 fit
    data = codec.encode(x, np.random.default_rng(0))
    raises(codec, patched(data, 10, "<H", 8), n, "levels 8 is not this codec's 16")
    raises(codec, patched(data, 10, "<H", 200), n, "levels 200 outside 1..127")
    raises(codec, patched(data, 16, "<f", -2.0), n, "negative chunk norm")
    raises(codec, patched(data, 16, "<f", np.inf), n, "non-finite chunk norm")
    codes = np.zeros(n, np.uint8)
    codes[5] = 17  # level 17 > s = 16
    bad = data[: 16 + 4 * 8] + pack_bits(codes, 6).tobytes()
    raises(codec, bad, n, "level 17 at position 5 exceeds s=16")


def topk_payload(n: int, gaps, width: int, values) -> bytes:
    gaps = np.asarray(gaps, np.uint32)
    header = H_TOPK.pack(3, 1, n, gaps.size, width, 0)
    return header + pack_bits(gaps, width).tobytes() + np.asarray(values, "<f4").tobytes()


def test_topk_payload_checks():
    n, codec = 1000, TopK(0.003)  # k = 3
    good = topk_payload(n, [5, 10, 100], 8, [1, 2, 3])
    assert np.flatnonzero(codec.decode(good, n)).tolist() == [5, 15, 115]
    raises(codec, topk_payload(n, [5, 0, 100], 8, [1, 2, 3]), n, "not strictly increasing")
    raises(codec, topk_payload(n, [5, 10, 985], 10, [1, 2, 3]), n, "index 1000 is out of range")
    raises(codec, topk_payload(n, [5, 10, 100], 8, [1, np.nan, 3]), n, "non-finite topk value")
    raises(codec, topk_payload(n, [5, 10], 8, [1, 2]), n, "k=2 is not this codec's k=3")
    raises(codec, patched(good, 10, "<Q", 0), n, "k=0 is out of range")
    raises(codec, patched(good, 10, "<Q", 1001), n, "k=1001 is out of range")
    raises(codec, patched(good, 18, "<B", 0), n, "index width 0 is outside 1..32")
    raises(codec, patched(good, 18, "<B", 33), n, "index width 33 is outside 1..32")
    raises(codec, patched(good, 19, "<B", 1), n, "values kind 1 is not this codec's")
    raises(codec, patched(good, 19, "<B", 7), n, "values kind 7")
    raises(codec, good[:-2], n, "shorter")
    nested = TopK(0.003, Uniform(8))
    data = nested.encode(vector(n), np.random.default_rng(0))
    values_at = H_TOPK.size + -(-3 * data[18] // 8)
    raises(nested, patched(data, values_at + 10, "<B", 4), n, "topk values: uniform bit width 4")


def test_randk_payload_checks():
    n, codec = 1000, RandomK(0.01)
    data = codec.encode(vector(n), np.random.default_rng(0))
    raises(codec, patched(data, 10, "<Q", 2000), n, "k=2000 is out of range")
    raises(codec, patched(data, 0, "<B", 9), n, "scheme id 9 .unknown.")
    raises(codec, data + b"xx", n, "longer")


@pytest.mark.parametrize("spec", SPECS)
def test_fuzzed_payloads_raise_only_codec_errors(spec):
    codec, n = parse(spec), 1000
    rng = np.random.default_rng(zlib.crc32(spec.encode()))
    valid = codec.encode(vector(n), rng)
    header = {Identity: 10, Uniform: 24, QSGD: 16, TopK: 20, RandomK: 27}[type(codec)]
    outcomes = {"ok": 0, "error": 0}
    for i in range(300):
        data = bytearray(valid)
        kind = i % 5
        if kind == 0:
            data = data[: rng.integers(0, len(data))]
        elif kind == 1:
            data += rng.bytes(int(rng.integers(1, 64)))
        elif kind == 2:
            for _ in range(rng.integers(1, 3)):
                data[rng.integers(0, header)] ^= int(rng.integers(1, 256))
        elif kind == 3:
            for _ in range(rng.integers(1, 8)):
                data[rng.integers(header, len(data))] = int(rng.integers(0, 256))
        else:
            data = bytearray(rng.bytes(int(rng.integers(0, 2 * len(valid)))))
            data[:2] = valid[:2]
        try:
            y = codec.decode(bytes(data), n)
        except CodecError:
            outcomes["error"] += 1
        else:
            assert y.dtype == np.float32 and y.shape == (n,) and np.isfinite(y).all()
            outcomes["ok"] += 1
    assert outcomes["error"] >= 180  # truncations, extensions and random bytes never pass
    if spec != "none":
        assert outcomes["ok"] > 0  # some body changes stay in range


# --------------------------------------------------------------------------------------- parse


@pytest.mark.parametrize("spec", SPECS + ["uniform5", "uniform1+rotate", "qsgd127", "topk1e-05", "randk1.0"])
def test_parse_round_trips_names(spec):
    codec = parse(spec)
    assert isinstance(codec, Codec)
    assert codec.name == spec
    assert parse(codec.name) == codec


def test_parse_round_trips_codecs():
    for codec in (Identity(), Uniform(3), Uniform(2, rotate=True), QSGD(), QSGD(4), TopK(0.05, Uniform(8)),
                  RandomK(1e-3), RandomK(0.25, Uniform(2, rotate=True)), TopK(1)):
        assert parse(codec.name) == codec
    assert parse("qsgd16") == QSGD() and parse("QSGD4") == QSGD(4)


@pytest.mark.parametrize("spec", ["zip", "uniform9", "uniform0", "uniform8+rotat", "topk0", "topk1.5", "qsgd0",
                                  "qsgd200", "randk", "topk0.01+qsgd", ""])
def test_parse_refuses_unknown_specs_listing_the_valid_forms(spec):
    with pytest.raises(ValueError, match="valid forms: none; uniform1 .. uniform8") as info:
        parse(spec)
    assert "topk0.01+uniform8" in str(info.value) and repr(spec) in str(info.value)
