"""Secure-aggregation primitives: keys agree, seals bind, Shamir rebuilds from t, masks cancel, sums never wrap."""

import itertools
import random
import secrets

import numpy as np
import pytest

from fedloom.errors import FedloomError
from fedloom.secagg.primitives import (
    PRIME,
    SHARE_BYTES,
    SecAggError,
    add_mod,
    agree,
    associated_data,
    bits_for,
    expand,
    from_field,
    generate_keypair,
    levels_for,
    neighbours,
    open_sealed,
    pack_words,
    private_from_bytes,
    private_to_bytes,
    quantization_step,
    reconstruct,
    seal,
    secagg_plus_parameters,
    share,
    sub_mod,
    thresholds,
    to_field,
    unpack_words,
)

MASK_INFO = b"fedloom-secagg-mask|round=1"


# ------------------------------------------------------------------------------------------ keys


def test_two_parties_agree_and_info_separates_purposes():
    a, a_pub = generate_keypair()
    b, b_pub = generate_keypair()
    assert len(a_pub) == len(b_pub) == 32
    key = agree(a, b_pub, MASK_INFO)
    assert len(key) == 32 and key == agree(b, a_pub, MASK_INFO)
    assert agree(a, b_pub, b"fedloom-secagg-encrypt|round=1") != key
    assert agree(a, b_pub, b"fedloom-secagg-mask|round=2") != key
    c, c_pub = generate_keypair()
    assert agree(a, c_pub, MASK_INFO) != key
    restored = private_from_bytes(private_to_bytes(a))  # what Shamir shares as s_u^SK
    assert agree(restored, b_pub, MASK_INFO) == key


@pytest.mark.parametrize("peer", [bytes(31), bytes(33), b"",
                                  bytes(32),  # u = 0, order 2: all-zero shared secret
                                  b"\x01" + bytes(31)])  # u = 1, order 4: all-zero shared secret
def test_a_malformed_or_low_order_peer_key_is_refused(peer):
    private, _ = generate_keypair()
    with pytest.raises(SecAggError) as err:
        agree(private, peer, MASK_INFO)
    assert err.value.code == "secagg" and isinstance(err.value, FedloomError)


# ------------------------------------------------------------------------------------------ seal


def test_seal_round_trips_and_binds_key_and_associated_data():
    key, other = secrets.token_bytes(32), secrets.token_bytes(32)
    ad = associated_data(3, 7, 12)
    sealed = seal(key, b"share bytes", ad)
    assert open_sealed(key, sealed, ad) == b"share bytes"
    assert seal(key, b"share bytes", ad) != sealed  # fresh nonce
    assert open_sealed(key, seal(key, b"", ad), ad) == b""
    for position in (0, 11, 12, len(sealed) - 1):  # nonce, ciphertext, tag
        tampered = bytearray(sealed)
        tampered[position] ^= 0x01
        with pytest.raises(SecAggError, match="authentication"):
            open_sealed(key, bytes(tampered), ad)
    for wrong_ad in (associated_data(7, 3, 12), associated_data(3, 8, 12), associated_data(3, 7, 13),
                     associated_data(3, 7, 12, b"other")):
        with pytest.raises(SecAggError, match="authentication"):
            open_sealed(key, sealed, wrong_ad)
    with pytest.raises(SecAggError, match="authentication"):
        open_sealed(other, sealed, ad)
    with pytest.raises(SecAggError, match="authentication"):
        open_sealed(key, sealed[:-1], ad)
    with pytest.raises(SecAggError, match="too short"):
        open_sealed(key, sealed[:27], ad)
    with pytest.raises(SecAggError, match="32 bytes"):
        seal(key[:16], b"x", ad)


# ------------------------------------------------------------------------------------------ Shamir


@pytest.mark.parametrize("t", [3, 4, 5, 6, 7])
def test_any_t_shares_rebuild_the_secret_and_fewer_do_not(t):
    rng = random.Random(t)
    ids = [0] + rng.sample(range(1, 500), 19)  # id 0 is evaluated at x = 1, never at 0
    secret = b"\x00\x07" + secrets.token_bytes(30)  # leading zero bytes survive
    shares = share(secret, t, ids)
    assert set(shares) == set(ids) and all(len(s) == SHARE_BYTES for s in shares.values())
    for size in (t, t, t, t + 1, len(ids)):
        subset = {i: shares[i] for i in rng.sample(ids, size)}
        assert reconstruct(subset, t, 32) == secret
    few = {i: shares[i] for i in rng.sample(ids, t - 1)}
    with pytest.raises(SecAggError, match="cannot rebuild"):
        reconstruct(few, t, 32)
    with pytest.raises(SecAggError, match="does not fit"):  # t - 1 points give a random field element
        reconstruct(few, t - 1, 32)
    short = share(b"\x05\x06\x07", t, ids)
    assert reconstruct({i: short[i] for i in ids[:t]}, t, 3) == b"\x05\x06\x07"


def test_shares_are_fresh_and_malformed_shares_are_refused():
    ids = list(range(10))
    secret = secrets.token_bytes(32)
    first, second = share(secret, 4, ids), share(secret, 4, ids)
    assert all(first[i] != second[i] for i in ids)
    good = {i: first[i] for i in range(4)}
    assert reconstruct(good, 4, 32) == secret
    mixed = {**good, 3: second[3]}  # a share of another polynomial
    with pytest.raises(SecAggError, match="does not fit"):
        reconstruct(mixed, 4, 32)
    for bad in ({**good, 0: good[0][:-1]}, {**good, 0: good[0] + b"\x00"}, {**good, 0: "text"}):
        with pytest.raises(SecAggError, match=f"{SHARE_BYTES} bytes"):
            reconstruct(bad, 4, 32)
    with pytest.raises(SecAggError, match="field"):
        reconstruct({**good, 0: PRIME.to_bytes(SHARE_BYTES, "big")}, 4, 32)
    with pytest.raises(SecAggError, match="client id"):
        reconstruct({**{k: v for k, v in good.items() if k}, -1: good[0]}, 4, 32)
    with pytest.raises(ValueError):
        share(secrets.token_bytes(33), 2, ids)
    with pytest.raises(ValueError):
        share(secret, 11, ids)
    with pytest.raises(ValueError):
        share(secret, 2, [1, 1, 2])


def test_a_dropped_clients_mask_key_rebuilt_from_shares_agrees_like_the_original():
    d, d_pub = generate_keypair()
    u, u_pub = generate_keypair()
    shares = share(private_to_bytes(d), 3, list(range(6)))
    rebuilt = private_from_bytes(reconstruct({i: shares[i] for i in (5, 1, 3)}, 3, 32))
    assert agree(rebuilt, u_pub, MASK_INFO) == agree(u, d_pub, MASK_INFO)


# ------------------------------------------------------------------------------------------ PRG


def test_expand_is_deterministic_in_range_and_keystream_exact():
    seed, other = secrets.token_bytes(32), secrets.token_bytes(32)
    for bits, dtype in ((1, np.uint32), (8, np.uint32), (20, np.uint32), (32, np.uint32), (33, np.uint64),
                        (48, np.uint64), (64, np.uint64)):
        v = expand(seed, 5000, bits)
        assert v.dtype == dtype and v.shape == (5000,)
        assert np.array_equal(v, expand(seed, 5000, bits))
        assert not np.array_equal(v, expand(other, 5000, bits))
        assert int(v.max()) < 2**bits
        assert np.array_equal(expand(seed, 10, bits), v[:10])  # a prefix does not depend on n
    # AES-256 of the zero block under the zero key (the first keystream block), as little-endian words
    assert expand(bytes(32), 4, 32).tolist() == [0x78C095DC, 0x898940A2, 0x14A248AD, 0x87208492]
    assert expand(bytes(32), 2, 64).tolist() == [0x898940A278C095DC, 0x8720849214A248AD]
    assert expand(seed, 0, 32).shape == (0,)
    with pytest.raises(ValueError):
        expand(seed[:16], 4, 32)
    with pytest.raises(ValueError):
        expand(seed, 4, 65)


def test_expanded_bytes_look_uniform():
    n = 200_000
    v = expand(secrets.token_bytes(32), n, 8).astype(np.float64)
    se = np.sqrt((256**2 - 1) / 12) / np.sqrt(n)
    assert abs(v.mean() - 127.5) < 5 * se
    counts = np.bincount(v.astype(np.int64), minlength=256)
    assert counts.min() > 0.8 * n / 256 and counts.max() < 1.2 * n / 256
    bits = expand(secrets.token_bytes(32), n, 1)
    assert abs(bits.mean() - 0.5) < 5 * 0.5 / np.sqrt(n)


# ------------------------------------------------------------------------------------------ arithmetic


@pytest.mark.parametrize("bits", [8, 20, 32, 33, 64])
def test_add_and_sub_are_arithmetic_modulo_2_to_the_bits(bits):
    a, b = expand(secrets.token_bytes(32), 1000, bits), expand(secrets.token_bytes(32), 1000, bits)
    total = add_mod(a, b, bits)
    exact = [(int(x) + int(y)) % 2**bits for x, y in zip(a, b)]
    assert total.tolist() == exact
    assert sub_mod(a, b, bits).tolist() == [(int(x) - int(y)) % 2**bits for x, y in zip(a, b)]
    assert np.array_equal(sub_mod(total, b, bits), a)
    keep = a.copy()
    assert add_mod(a, b, bits, out=a) is a and np.array_equal(a, total)
    assert sub_mod(a, b, bits, out=a) is a and np.array_equal(a, keep)
    with pytest.raises(TypeError):
        add_mod(a.astype(np.int64), b, bits)


# ------------------------------------------------------------------------------------------ fixed point


def _sum_of_copies(word, count, bits):
    """``count`` copies of one encoding summed with add_mod, as the server would."""
    total = np.zeros_like(word)
    for _ in range(count):
        add_mod(total, word, bits, out=total)
    return total


@pytest.mark.parametrize("bits", [16, 20, 32, 33, 64])
@pytest.mark.parametrize("num_clients", [1, 2, 3, 5, 8, 64, 1000])
def test_the_sum_of_num_clients_encodings_of_plus_bound_never_wraps(bits, num_clients):
    bound = 2.5
    levels = levels_for(bits, num_clients)
    assert num_clients * levels <= 2 ** (bits - 1) - 1  # the extreme sum fits the signed range
    capped = levels == 2**52  # float64 stays exact
    if not capped:
        assert num_clients * (levels + 1) > 2 ** (bits - 1) - 1  # and no more levels would
    step = quantization_step(bound, levels)
    assert step == bound / levels
    x = np.array([bound, 10 * bound, -bound, -10 * bound], np.float32)
    for rng in (None, np.random.default_rng(0)):  # a value at +-bound is exactly a level: no rounding either way
        enc = to_field(x, bound, levels, bits, rng)
        assert enc.dtype == (np.uint32 if bits <= 32 else np.uint64) and enc.shape == (4,)
        assert [int(v) for v in enc] == [levels, levels, 2**bits - levels, 2**bits - levels]  # two's complement
    enc = to_field(x, bound, levels, bits)
    total = _sum_of_copies(enc, num_clients, bits)
    assert [int(v) for v in total] == [num_clients * levels] * 2 + [2**bits - num_clients * levels] * 2
    decoded = from_field(total, bound, levels, bits)
    assert decoded.dtype == np.float64
    extreme = num_clients * bound
    assert decoded.tolist() == pytest.approx([extreme, extreme, -extreme, -extreme], rel=1e-12)

    # bits_for is the smallest width that holds the extreme sum: one bit fewer wraps it
    width = bits_for(levels, num_clients)
    assert width <= bits and (capped or width == bits)
    for w in (width, width - 1):
        total = _sum_of_copies(to_field(x[:1], bound, levels, w), num_clients, w)
        wraps = from_field(total, bound, levels, w)[0] != pytest.approx(extreme, rel=1e-12)
        assert wraps == (w < width)
    if not capped:  # one level more than levels_for gives wraps too
        total = _sum_of_copies(to_field(x[:1], bound, levels + 1, bits), num_clients, bits)
        assert from_field(total, bound, levels + 1, bits)[0] < 0


@pytest.mark.parametrize("bits", range(2, 65))
def test_from_field_reads_a_total_of_any_width_as_twos_complement(bits):
    half = 2 ** (bits - 1)
    total = np.array([0, 1, half - 1, half, 2**bits - 1], np.uint32 if bits <= 32 else np.uint64)
    assert from_field(total, 2.0, 4, bits).tolist() == [0.0, 0.5, (half - 1) / 2, -half / 2, -0.5]  # step 1/2


def test_levels_and_bits_agree_on_small_cases():
    assert levels_for(16, 1) == 2**15 - 1 and levels_for(16, 3) == (2**15 - 1) // 3
    assert levels_for(64, 1) == 2**52 and levels_for(32, 1000) == (2**31 - 1) // 1000
    assert bits_for(1, 1) == 2 and bits_for(127, 1) == 8 and bits_for(128, 1) == 9 and bits_for(10, 100) == 11
    for levels in range(1, 40):
        for n in range(1, 12):
            width = bits_for(levels, n)
            assert n * levels <= 2 ** (width - 1) - 1 < 2 ** (width - 1) <= 2 * n * levels + 1
            assert levels_for(width, n) >= levels


def test_rounding_is_to_the_nearest_level_or_unbiased_stochastic():
    bound, bits = 1.0, 16
    levels = levels_for(bits, 4)
    step = quantization_step(bound, levels)
    x = np.random.default_rng(1).uniform(-1, 1, 10_000).astype(np.float32)
    nearest = from_field(to_field(x, bound, levels, bits), bound, levels, bits)
    assert np.abs(nearest - x).max() <= step / 2 * (1 + 1e-9)
    assert np.abs(nearest - x).max() > step / 4  # it really is quantized at this step
    value = np.full(200_000, -bound + 0.3 * step, np.float32)
    value64 = float(value[0])
    stochastic = from_field(to_field(value, bound, levels, bits, np.random.default_rng(2)), bound, levels, bits)
    assert np.abs(stochastic - value64).max() < step  # one of the two neighbouring levels
    frac = (value64 + bound) / step
    se = step * np.sqrt(frac * (1 - frac)) / np.sqrt(value.size)
    assert abs(stochastic.mean() - value64) < 5 * se
    assert abs(float(from_field(to_field(value[:1], bound, levels, bits), bound, levels, bits)[0]) - value64) > 100 * se
    positive = from_field(to_field(-value, bound, levels, bits, np.random.default_rng(3)), bound, levels, bits)
    assert abs(positive.mean() + value64) < 5 * se
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError):
            to_field(np.array([0.5, bad], np.float32), bound, levels, bits)
        with pytest.raises(ValueError):
            to_field(np.array([bad], np.float32), bound, levels, bits, np.random.default_rng(4))


# ------------------------------------------------------------------------------------------ packing


def _reference_pack(words, bits):
    """Value i in bits i*bits .. i*bits + bits - 1 of one little-endian bit stream."""
    stream = 0
    for i, w in enumerate(words.tolist()):
        stream |= w << (i * bits)
    return stream.to_bytes((len(words) * bits + 7) // 8, "little")


@pytest.mark.parametrize("bits", range(1, 33))
def test_pack_words_round_trips_densely_and_checks_the_length(bits):
    rng = np.random.default_rng(bits)
    for count in (0, 1, 7, 1001):
        words = rng.integers(0, 2**bits, count, dtype=np.uint64).astype(np.uint32)
        if count == 1001:
            words[:2] = (0, 2**bits - 1)  # both extremes
        packed = pack_words(words, bits)
        assert isinstance(packed, bytes) and len(packed) == (count * bits + 7) // 8
        assert packed == _reference_pack(words, bits)
        back = unpack_words(packed, bits, count)
        assert back.dtype == np.uint32 and back.shape == (count,)
        assert np.array_equal(back, words)
        wrong = [packed + b"\x00"] + ([packed[:-1]] if packed else [])
        for data in wrong:
            with pytest.raises(ValueError):
                unpack_words(data, bits, count)
        if count:
            with pytest.raises(ValueError):
                unpack_words(packed, bits, count + 8)  # 8 more values always need more bytes


# ------------------------------------------------------------------------------------------ masking


def _mask(i, x_enc, self_seed, pair_seeds, bits):
    """Bonawitz's y_i = x_i + PRG(b_i) + sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ij)."""
    y = add_mod(x_enc, expand(self_seed, x_enc.size, bits), bits)
    for j, s in pair_seeds.items():
        (add_mod if i < j else sub_mod)(y, expand(s, x_enc.size, bits), bits, out=y)
    return y


@pytest.mark.parametrize("bits", [20, 32, 64])
def test_masks_cancel_in_the_sum_and_a_dropped_clients_are_recovered(bits):
    n_clients, size, clip = 5, 1000, 1.0
    levels = levels_for(bits, n_clients)
    rng = np.random.default_rng(bits)
    keys = [generate_keypair() for _ in range(n_clients)]
    pair = {i: {j: agree(keys[i][0], keys[j][1], MASK_INFO) for j in range(n_clients) if j != i}
            for i in range(n_clients)}
    self_seeds = [secrets.token_bytes(32) for _ in range(n_clients)]
    xs = [rng.uniform(-1.2, 1.2, size).astype(np.float32) for _ in range(n_clients)]  # some clipped
    encoded = [to_field(x, clip, levels, bits) for x in xs]
    masked = [_mask(i, encoded[i], self_seeds[i], pair[i], bits) for i in range(n_clients)]
    assert all(np.mean(masked[i] == encoded[i]) < 0.01 for i in range(n_clients))
    step = quantization_step(clip, levels)

    def expected_sum(members):
        return np.sum([np.clip(xs[i].astype(np.float64), -clip, clip) for i in members], axis=0)

    def close(decoded, expected, count):  # nearest rounding: each value off by at most step / 2
        return np.all(np.abs(decoded - expected) <= count * (step / 2 + 4 * np.spacing(clip)))

    total = np.zeros(size, masked[0].dtype)
    for i in range(n_clients):
        add_mod(total, masked[i], bits, out=total)
    masked_sum = from_field(total, clip, levels, bits)  # the self masks are still in: noise over the whole range
    assert np.mean(np.abs(masked_sum - expected_sum(range(n_clients))) > n_clients * step) > 0.95
    for i in range(n_clients):
        sub_mod(total, expand(self_seeds[i], size, bits), bits, out=total)
    plain = np.zeros(size, masked[0].dtype)
    for e in encoded:
        add_mod(plain, e, bits, out=plain)
    assert np.array_equal(total, plain)
    assert close(from_field(total, clip, levels, bits), expected_sum(range(n_clients)), n_clients)

    dropped = 2
    survivors = [i for i in range(n_clients) if i != dropped]
    total = np.zeros(size, masked[0].dtype)
    for i in survivors:
        add_mod(total, masked[i], bits, out=total)
        sub_mod(total, expand(self_seeds[i], size, bits), bits, out=total)
    # the server rebuilds the dropped client's mask key from the survivors' shares and recomputes s_ij
    shares = share(private_to_bytes(keys[dropped][0]), 3, survivors)
    rebuilt = private_from_bytes(reconstruct({i: shares[i] for i in survivors[1:]}, 3, 32))
    for i in survivors:
        s = agree(rebuilt, keys[i][1], MASK_INFO)
        assert s == pair[i][dropped]
        (sub_mod if i < dropped else add_mod)(total, expand(s, size, bits), bits, out=total)
    plain = np.zeros(size, masked[0].dtype)
    for i in survivors:
        add_mod(plain, encoded[i], bits, out=plain)
    assert np.array_equal(total, plain)
    decoded = from_field(total, clip, levels, bits)
    assert close(decoded, expected_sum(survivors), len(survivors))


# ------------------------------------------------------------------------------------------ SecAgg+ graph


def test_the_graph_is_k_regular_symmetric_and_seeded():
    ids = random.Random(3).sample(range(10_000), 40)
    seed = b"s" * 32
    for k in (2, 4, 10, 38):
        graph = neighbours(ids, k, seed)
        assert set(graph) == set(ids)
        assert all(len(graph[i]) == k and i not in graph[i] for i in ids)
        assert all(i in graph[j] for i in ids for j in graph[i])
        assert neighbours(list(reversed(ids)), k, seed) == graph
        assert neighbours(ids, k, b"t" * 32) != graph
    complete = neighbours(ids, 39, seed)
    assert complete == neighbours(ids, 100, b"t" * 32)
    assert all(complete[i] == set(ids) - {i} for i in ids)
    with pytest.raises(ValueError):
        neighbours(ids, 5, seed)
    with pytest.raises(ValueError):
        neighbours(ids, 4, b"short")


def test_secagg_plus_parameters_match_the_reference_finder():
    # Published (k, t) of the Harary-graph parameter finder (semi-honest, sigma = 40, eta = 20) of the
    # open-source SecAgg+ implementation by Bell et al.'s team (fcp/secagg). Counting neighbours among
    # n - 1 others (here) instead of n is slightly stricter: at n = 1000, 0.45 / 0.45 it gives 824, not 822.
    for n, corrupt, dropout, expected in ((100, 0.33, 0.33, (68, 34)), (1000, 0.33, 0.33, (286, 150)),
                                          (10**6, 0.33, 0.33, (518, 270)), (1000, 0.05, 0.33, (72, 24)),
                                          (1000, 0.33, 0.05, (78, 60)), (100, 0.45, 0.45, (92, 46))):
        assert secagg_plus_parameters(n, corrupt, dropout, 40, 20) == expected
    previous = 0
    for n in (100, 1000, 10**4, 10**6):
        k, t = secagg_plus_parameters(n)
        assert k % 2 == 0 and k < n - 1 and 2 <= t <= k and k >= previous
        t_min, t_max = thresholds(n, k)
        assert t == t_min <= t_max
        previous = k
    assert secagg_plus_parameters(3) == (2, 2)  # the complete graph
    with pytest.raises(ValueError):
        secagg_plus_parameters(2)
    with pytest.raises(ValueError):
        secagg_plus_parameters(100, 0.6, 0.5)


def test_every_pair_of_the_graph_is_an_agreed_key_pair():
    ids = list(range(12))
    keys = {i: generate_keypair() for i in ids}
    graph = neighbours(ids, 4, b"round-7-graph-seed-0123456789abc")
    for i, j in itertools.combinations(ids, 2):
        if j in graph[i]:
            assert agree(keys[i][0], keys[j][1], MASK_INFO) == agree(keys[j][0], keys[i][1], MASK_INFO)
