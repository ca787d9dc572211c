"""Device profiles: hand-computed durations, availability, seeded populations, trace files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedloom.errors import ConfigError, DataError
from fedloom.hetero import (
    DAY_S,
    REFERENCE_FLOPS,
    Availability,
    DeviceProfile,
    load_population,
    mobile,
    silo,
    task_duration,
)

HEADER = "client_id,compute_sps,down_bps,up_bps,latency_s,dropout_p,available\n"


# ---------------------------------------------------------------------------------- durations


def test_task_duration_by_hand():
    p = DeviceProfile(compute_sps=100.0, down_bps=8e6, up_bps=1e6, latency_s=0.5, dropout_p=0.1)
    # 0.5 latency + 1 MB * 8 / 8 Mbit/s = 1 s + 50 samples * 2 MFLOP / 1 MFLOP / 100 sps = 1 s
    # + 250 kB * 8 / 1 Mbit/s = 2 s
    assert REFERENCE_FLOPS == 1e6
    assert task_duration(p, 2e6, 50, 1_000_000, 250_000) == pytest.approx(4.5)


def test_task_duration_parts_scale_independently():
    p = DeviceProfile(compute_sps=10.0, down_bps=1e3, up_bps=2e3, latency_s=0.0)
    assert task_duration(p, 1e6, 0, 0, 0) == 0.0
    assert task_duration(p, 1e6, 30, 0, 0) == pytest.approx(3.0)
    assert task_duration(p, 1e6, 0, 125, 0) == pytest.approx(1.0)
    assert task_duration(p, 1e6, 0, 0, 500) == pytest.approx(2.0)


@pytest.mark.parametrize("args,key", [((0.0, 1, 1, 1), "task.flops_per_sample"),
                                      ((1e6, -1, 1, 1), "task.samples"),
                                      ((1e6, 1, float("nan"), 1), "task.down_bytes")])
def test_task_duration_rejects_bad_sizes(args, key):
    p = DeviceProfile(1.0, 1.0, 1.0)
    with pytest.raises(ConfigError) as e:
        task_duration(p, *args)
    assert e.value.key == key


@pytest.mark.parametrize("field,value", [("compute_sps", 0.0), ("down_bps", -1.0), ("up_bps", math.inf),
                                         ("latency_s", -0.1), ("dropout_p", 1.0), ("dropout_p", -0.01),
                                         ("compute_sps", float("nan")), ("down_bps", "fast")])
def test_profile_validation_names_field(field, value):
    values = dict(compute_sps=1.0, down_bps=1.0, up_bps=1.0, latency_s=0.0, dropout_p=0.0)
    values[field] = value
    with pytest.raises(ConfigError) as e:
        DeviceProfile(**values)
    assert e.value.key == f"profile.{field}"


# ------------------------------------------------------------------------------- availability


def test_intervals_half_open_boundaries():
    a = Availability.from_intervals([(10, 20), (20, 30), (50, 60)])
    assert not a.is_available(0) and not a.is_available(9.999)
    assert a.is_available(10) and a.is_available(20) and a.is_available(29.9)
    assert not a.is_available(30) and not a.is_available(60)
    assert a.next_available(0) == 10
    assert a.next_available(15) == 15
    assert a.next_available(30) == 50
    assert a.next_available(60) == math.inf
    assert a.intervals == ((10.0, 20.0), (20.0, 30.0), (50.0, 60.0))


@pytest.mark.parametrize("intervals", [[(0, 10), (5, 20)], [(20, 30), (0, 10)], [(5, 5)], [(-1, 3)],
                                       [(0, math.inf)], [(1, 2, 3)]])
def test_bad_intervals(intervals):
    with pytest.raises(ConfigError) as e:
        Availability.from_intervals(intervals)
    assert e.value.key.startswith("availability.intervals[")


def test_diurnal_boundaries():
    a = Availability.diurnal(phase_s=3600.0, duty=0.25)  # on 01:00-07:00 each day
    on_end = 3600.0 + 0.25 * DAY_S
    assert not a.is_available(0.0) and not a.is_available(3599.0)
    assert a.is_available(3600.0) and a.is_available(on_end - 1)
    assert not a.is_available(on_end)
    assert a.is_available(DAY_S + 3600.0)
    assert a.next_available(0.0) == 3600.0
    assert a.next_available(4000.0) == 4000.0
    assert a.next_available(on_end) == pytest.approx(DAY_S + 3600.0)
    assert a.next_available(DAY_S + 7 * 3600.0) == pytest.approx(DAY_S + 3600.0 + DAY_S)


def test_diurnal_wraps_midnight_and_always():
    a = Availability.diurnal(phase_s=22 * 3600.0, duty=4 / 24)  # 22:00-02:00
    assert a.is_available(23 * 3600.0) and a.is_available(DAY_S + 3600.0)
    assert not a.is_available(DAY_S + 2 * 3600.0)
    assert a.next_available(DAY_S + 3 * 3600.0) == pytest.approx(DAY_S + 22 * 3600.0)
    always = Availability.always()
    assert always.always_on and always.is_available(1e9) and always.next_available(5.0) == 5.0


@pytest.mark.parametrize("kw,key", [({"duty": 0.0}, "availability.duty"), ({"duty": 1.5}, "availability.duty"),
                                    ({"period_s": -1.0}, "availability.period_s"),
                                    ({"phase_s": math.nan}, "availability.phase_s")])
def test_bad_diurnal(kw, key):
    with pytest.raises(ConfigError) as e:
        Availability(**kw)
    assert e.value.key == key


# -------------------------------------------------------------------------------- populations


def test_populations_are_seeded():
    assert mobile(50, 3) == mobile(50, 3)
    assert mobile(50, 3) != mobile(50, 4)
    assert silo(5, 3) == silo(5, 3)
    assert silo(5, 3) != silo(5, 4)


def test_mobile_is_long_tailed_and_intermittent():
    pop = mobile(4000, 0)
    compute = np.array([p.compute_sps for p in pop])
    down = np.array([p.down_bps for p in pop])
    up = np.array([p.up_bps for p in pop])
    # Lognormal sigma 0.6 gives p90/p10 = exp(2 * 1.2816 * 0.6) ~ 4.7; a homogeneous population gives 1.
    assert np.percentile(compute, 90) / np.percentile(compute, 10) > 4
    assert np.median(down) == pytest.approx(4.3e6, rel=0.05) and np.median(up) == pytest.approx(3.3e6, rel=0.05)
    assert compute.mean() > np.median(compute)  # right-skewed
    assert all(0.06 <= p.dropout_p <= 0.10 for p in pop)
    assert not any(p.availability.always_on for p in pop)
    hours = np.arange(0, 24, 0.25) * 3600.0
    online = np.array([np.mean([p.availability.is_available(t) for p in pop]) for t in hours])
    # Bonawitz et al. 2019: a 4x day/night swing in participating devices, more at night
    assert 3.0 < online.max() / online.min() < 5.5
    assert 0 <= hours[online.argmax()] / 3600 < 6 and 10 < hours[online.argmin()] / 3600 < 18


def test_silo_fast_and_always_available():
    pop = silo(8, 1)
    phones = mobile(8, 1)
    assert all(p.availability.always_on and p.dropout_p == 0.0 for p in pop)
    assert min(p.compute_sps for p in pop) > 10 * max(p.compute_sps for p in phones)
    assert min(task_duration(s, 1e6, 100, 1e6, 1e6) for s in pop) < min(
        task_duration(m, 1e6, 100, 1e6, 1e6) for m in phones)


@pytest.mark.parametrize("n,seed,key", [(0, 0, "population.n"), (3, -1, "population.seed"),
                                        (2.0, 0, "population.n")])
def test_population_args(n, seed, key):
    with pytest.raises(ConfigError) as e:
        mobile(n, seed)
    assert e.value.key == key


# -------------------------------------------------------------------------------- trace files


def test_load_csv(tmp_path):
    f = tmp_path / "pop.csv"
    f.write_text(HEADER + "1,200,1e6,5e5,0.1,0.05,0-3600;7200-10800\n"
                          "0,100,2e6,1e6,0.0,0,\n")
    pop = load_population(f)
    assert [p.compute_sps for p in pop] == [100.0, 200.0]
    assert pop[0].availability.always_on
    assert pop[1].availability.intervals == ((0.0, 3600.0), (7200.0, 10800.0))
    assert pop[1].latency_s == 0.1 and pop[1].dropout_p == 0.05


def test_load_csv_without_available_column(tmp_path):
    f = tmp_path / "pop.csv"
    f.write_text("client_id,compute_sps,down_bps,up_bps,latency_s,dropout_p\n0,1,2,3,0,0\n")
    (p,) = load_population(f)
    assert (p.compute_sps, p.down_bps, p.up_bps) == (1.0, 2.0, 3.0) and p.availability.always_on


def test_load_json(tmp_path):
    f = tmp_path / "pop.json"
    base = dict(compute_sps=10, down_bps=1e6, up_bps=1e6, latency_s=0.01, dropout_p=0.0)
    f.write_text(json.dumps([{**base, "client_id": 2, "availability": {"diurnal": {"phase_s": 100, "duty": 0.5}}},
                             {**base, "client_id": 0, "availability": [[0, 10], [20, 30]]},
                             {**base, "client_id": 1}]))
    pop = load_population(f)
    assert pop[0].availability.intervals == ((0.0, 10.0), (20.0, 30.0))
    assert pop[1].availability.always_on
    assert pop[2].availability == Availability.diurnal(100.0, 0.5)


@pytest.mark.parametrize("rows,key", [
    ("0,1,-5,1,0,0,\n", "population[0].down_bps"),
    ("0,1,1,1,0,0,\n1,1,1,1,0,0,0-10;5-20\n", "population[1].available[1]"),
    ("0,1,1,1,0,0,\n0,1,1,1,0,0,\n", "population[1].client_id"),
    ("0,1,1,1,0,0,\n1,1,1,abc,0,0,\n", "population[1].up_bps"),
    ("0,1,1,1,0,1.0,\n", "population[0].dropout_p"),
    ("0,1,1,1,0,0,\n2,1,1,1,0,0,\n", "population[1].client_id"),
    ("x,1,1,1,0,0,\n", "population[0].client_id"),
    ("0,1,1,1,0,0,ten-20\n", "population[0].available"),
    ("0,1,1,1,0\n", "population[0]"),
])
def test_bad_csv_names_row_and_field(tmp_path, rows, key):
    f = tmp_path / "pop.csv"
    f.write_text(HEADER + rows)
    with pytest.raises(ConfigError) as e:
        load_population(f)
    assert e.value.key == key


def test_csv_missing_column(tmp_path):
    f = tmp_path / "pop.csv"
    f.write_text("client_id,compute_sps,up_bps,latency_s,dropout_p\n0,1,1,0,0\n")
    with pytest.raises(ConfigError) as e:
        load_population(f)
    assert e.value.key == "population.down_bps"


@pytest.mark.parametrize("change,key", [
    ({"down_bps": -1}, "population[1].down_bps"),
    ({"up_bps": "1e6"}, "population[1].up_bps"),
    ({"client_id": 0}, "population[1].client_id"),
    ({"availability": [[0, 10], [5, 20]]}, "population[1].availability[1]"),
    ({"availability": {"diurnal": {"duty": 2}}}, "population[1].availability.diurnal.duty"),
    ({"speed": 3}, "population[1].speed"),
])
def test_bad_json_names_entry_and_field(tmp_path, change, key):
    base = dict(compute_sps=10, down_bps=1e6, up_bps=1e6, latency_s=0.01, dropout_p=0.0)
    f = tmp_path / "pop.json"
    f.write_text(json.dumps([{**base, "client_id": 0}, {**base, "client_id": 1, **change}]))
    with pytest.raises(ConfigError) as e:
        load_population(f)
    assert e.value.key == key


def test_json_missing_field(tmp_path):
    f = tmp_path / "pop.json"
    f.write_text(json.dumps([dict(client_id=0, compute_sps=1, down_bps=1, up_bps=1, latency_s=0)]))
    with pytest.raises(ConfigError) as e:
        load_population(f)
    assert e.value.key == "population[0].dropout_p"


def test_unreadable_files_are_data_errors(tmp_path):
    with pytest.raises(DataError):
        load_population(tmp_path / "missing.csv")
    bad = tmp_path / "pop.json"
    bad.write_text("[{not json")
    with pytest.raises(DataError):
        load_population(bad)
    other = tmp_path / "pop.pkl"
    other.write_bytes(b"\x80\x04")
    with pytest.raises(DataError):
        load_population(other)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError):
        load_population(empty)
