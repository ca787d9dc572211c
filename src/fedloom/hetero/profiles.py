"""Device profiles, simulated task durations, and mobile / cross-silo populations.

Simulated time is separate from host time (DESIGN.md, "House rules"): a client's work takes
:func:`task_duration` simulated seconds, computed from its :class:`DeviceProfile` and the real
sizes of the task, never from how long the host took.

Compute speed is given in *reference samples per second*: samples of a reference model costing
``REFERENCE_FLOPS`` = 1 MFLOP per training sample (forward + backward pass). A task whose model
costs ``f`` FLOPs per sample therefore runs ``f / REFERENCE_FLOPS`` times slower than the
reference; a device with ``compute_sps = 1000`` sustains 1 GFLOP/s of training. This follows
FedScale's model (Lai et al., "FedScale: Benchmarking Model and System Performance of Federated
Learning at Scale", ICML 2022, ``fedscale/cloud/internal/client_metadata.py``): compute time =
samples x a per-device measured per-sample latency (training counted as 3x inference), plus
(upload + download size) / bandwidth; here the per-sample cost is scaled by the model's FLOPs.

Sources of the population parameters. Each says whether it is a published measurement (quoted
from the source) or an ASSUMPTION, and why:

* Compute speed: FedScale draws per-device speeds from AI Benchmark (Ignatov et al., "AI
  Benchmark: All About Deep Learning on Smartphones in 2019", ICCVW 2019), restricted to phones
  with > 2 GB RAM as in Bonawitz et al. 2019; its trace is distributed only as a pickle, which we
  do not open. The spread, lognormal sigma = 0.6, is FedScale's own synthetic device model
  (``fedscale/cloud/internal/client_metadata.py``: per-sample latency ``lognormal(1, 0.6)``).
  The median, 2 GFLOP/s of sustained fp32 training (2000 reference samples/s), is an ASSUMPTION:
  on-device training runs far below a phone SoC's peak inference throughput.
* Bandwidth: the FLASH measurement release (Yang et al., "Characterizing Impacts of Heterogeneity
  in Federated Learning upon Large-Scale Smartphone Data", WWW 2021; github.com/PKU-Chengxu/FLASH,
  ``models/speed_distri.json``) gives mean down/up throughput for 19 network profiles of the
  studied phones, in kb/s: medians 4318 down and 3286 up, ranges 2370-17333 down and 431-6635 up.
  We read the unit as kbit/s: medians 4.3 Mbit/s down and 3.3 Mbit/s up, and lognormal sigmas
  0.47 (down) and 0.68 (up), the standard deviations of the logs of the 19 profile means (so the
  spread is between network profiles, not within one).
* Latency: median 50 ms, sigma 0.5: ASSUMPTION (a WiFi + WAN round trip to a cloud region).
* Dropout: Bonawitz et al., "Towards Federated Learning at Scale: System Design", SysML 2019,
  section 9: "the portion of devices that drop out due to computation errors, network failures,
  or changes in eligibility varies between 6% and 10%". Each device draws its dropout_p uniformly
  from [0.06, 0.10] (the per-device spread is an ASSUMPTION). The same section's over-selection,
  "the server typically selects 130% of the target number of devices", is ``hetero.over_select``.
* Availability: devices train only while idle, charging and on an unmetered network (Bonawitz et
  al. 2019, section 11), and FLASH and FedScale count a device as available while it charges.
  Bonawitz et al. 2019, section 9: "Devices are more likely idle and charging at night" with "a 4x
  difference between low and high numbers of participating devices over a 24 hours period". We
  model one daily on-window per device, duty fraction uniform in [0.1, 0.5] (2.4 h to 12 h a day:
  ASSUMPTION), starting at ~ 22:00 with a normal spread of 5.2 h, the spread calibrated so that the
  population's online fraction swings 4x over a day (about 50% at 02:00, 12% at 14:00; tested).
* Silos: cross-silo clients are few (typically 2-100) and "almost always available" (Kairouz et
  al., "Advances and Open Problems in Federated Learning", FnTML 2021, Table 1). Their speeds
  (median 1 TFLOP/s effective training, 1 Gbit/s both ways, 20 ms latency, sigma 0.2-0.3, no
  dropout) are an ASSUMPTION: a data-centre GPU server on a datacentre uplink.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedloom.errors import ConfigError, DataError

REFERENCE_FLOPS = 1e6
"""FLOPs per training sample (forward + backward) of the reference model that ``compute_sps`` counts."""

DAY_S = 86400.0
"""Period of the diurnal availability model, in simulated seconds."""

_NUMERIC_FIELDS = ("compute_sps", "down_bps", "up_bps", "latency_s", "dropout_p")
_REQUIRED_COLUMNS = ("client_id", *_NUMERIC_FIELDS)


# ---------------------------------------------------------------------------------------- checks


def _number(key: str, value: Any) -> float:
    """``value`` as a finite float, or ConfigError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, f"must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(key, f"must be finite, got {value!r}")
    return value


def _positive(key: str, value: Any) -> float:
    value = _number(key, value)
    if value <= 0:
        raise ConfigError(key, f"must be > 0, got {value!r}")
    return value


def _non_negative(key: str, value: Any) -> float:
    value = _number(key, value)
    if value < 0:
        raise ConfigError(key, f"must be >= 0, got {value!r}")
    return value


def _check_intervals(key: str, intervals: Any) -> tuple[tuple[float, float], ...]:
    """Sorted, non-overlapping, finite ``(start_s, end_s)`` pairs with ``0 <= start < end``."""
    if not isinstance(intervals, list | tuple):
        raise ConfigError(key, f"must be a list of (start_s, end_s) pairs, got {intervals!r}")
    out: list[tuple[float, float]] = []
    for i, pair in enumerate(intervals):
        k = f"{key}[{i}]"
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise ConfigError(k, f"must be a (start_s, end_s) pair, got {pair!r}")
        start, end = _non_negative(k, pair[0]), _number(k, pair[1])
        if end <= start:
            raise ConfigError(k, f"end must be after start, got {start!r}-{end!r}")
        if out and start < out[-1][1]:
            prev = out[-1]
            raise ConfigError(k, f"{start!r}-{end!r} overlaps or precedes {prev[0]!r}-{prev[1]!r}; "
                                 "intervals must be sorted and non-overlapping")
        out.append((start, end))
    return tuple(out)


# ---------------------------------------------------------------------------------- availability


@dataclass(frozen=True)
class Availability:
    """When a device is online, in simulated seconds from the start of the run.

    Either a trace of on-intervals (``intervals`` set: half-open ``[start_s, end_s)`` pairs, the
    device being off before, between and after them), or a diurnal model (``intervals`` is None):
    on during ``[phase_s, phase_s + duty * period_s)`` modulo ``period_s``. ``duty = 1`` is always on.
    """

    intervals: tuple[tuple[float, float], ...] | None = None
    phase_s: float = 0.0
    duty: float = 1.0
    period_s: float = DAY_S
    _starts: tuple[float, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.intervals is not None:
            intervals = _check_intervals("availability.intervals", self.intervals)
            object.__setattr__(self, "intervals", intervals)
            object.__setattr__(self, "_starts", tuple(s for s, _ in intervals))
        check_availability(self, "availability")

    @classmethod
    def always(cls) -> Availability:
        return cls()

    @classmethod
    def from_intervals(cls, intervals: Any) -> Availability:
        return cls(intervals=intervals)

    @classmethod
    def diurnal(cls, phase_s: float, duty: float, period_s: float = DAY_S) -> Availability:
        return cls(phase_s=phase_s, duty=duty, period_s=period_s)

    @property
    def always_on(self) -> bool:
        return self.intervals is None and self.duty >= 1.0

    def is_available(self, t: float) -> bool:
        """Whether the device is online at simulated time ``t``."""
        if self.intervals is not None:
            i = bisect.bisect_right(self._starts, t) - 1
            return i >= 0 and t < self.intervals[i][1]
        return self.always_on or (t - self.phase_s) % self.period_s < self.duty * self.period_s

    def next_available(self, t: float) -> float:
        """The earliest time ``>= t`` at which the device is online (``math.inf`` if never again)."""
        if self.is_available(t):
            return t
        if self.intervals is not None:
            j = bisect.bisect_right(self._starts, t)
            return self.intervals[j][0] if j < len(self.intervals) else math.inf
        return t + self.period_s - (t - self.phase_s) % self.period_s


def check_availability(a: Availability, key: str) -> None:
    """Raise ConfigError (keys under ``key``) unless ``a`` is well-formed."""
    if a.intervals is not None:
        _check_intervals(f"{key}.intervals", a.intervals)
        return
    _check_diurnal(key, a.phase_s, a.duty, a.period_s)


def _check_diurnal(key: str, phase_s: Any, duty: Any, period_s: Any) -> None:
    _number(f"{key}.phase_s", phase_s)
    d = _number(f"{key}.duty", duty)
    if not 0 < d <= 1:
        raise ConfigError(f"{key}.duty", f"must be in (0, 1], got {d!r}")
    _positive(f"{key}.period_s", period_s)


# -------------------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class DeviceProfile:
    """One virtual client's device.

    compute_sps: training samples per second of the reference model (``REFERENCE_FLOPS`` per sample).
    down_bps, up_bps: download / upload bandwidth in bits per second.
    latency_s: fixed per-task cost (connection set-up and round trip), in seconds.
    dropout_p: probability of dropping out during a task, in [0, 1).
    availability: when the device is online.
    """

    compute_sps: float
    down_bps: float
    up_bps: float
    latency_s: float = 0.0
    dropout_p: float = 0.0
    availability: Availability = Availability()

    def __post_init__(self) -> None:
        check_profile_values(vars(self), "profile")


def check_profile_values(values: dict[str, Any], key: str) -> None:
    """Raise ConfigError naming ``key.field`` unless the profile's values are in range."""
    for name in ("compute_sps", "down_bps", "up_bps"):
        _positive(f"{key}.{name}", values[name])
    _non_negative(f"{key}.latency_s", values["latency_s"])
    p = _number(f"{key}.dropout_p", values["dropout_p"])
    if not 0 <= p < 1:
        raise ConfigError(f"{key}.dropout_p", f"must be in [0, 1), got {p!r}")
    if not isinstance(values["availability"], Availability):
        raise ConfigError(f"{key}.availability", f"must be an Availability, got {values['availability']!r}")


def task_duration(profile: DeviceProfile, flops_per_sample: float, samples: int | float,
                  down_bytes: int | float, up_bytes: int | float) -> float:
    """Simulated seconds for one task: latency + download + local training + upload.

    ``samples * flops_per_sample / REFERENCE_FLOPS / compute_sps`` seconds of compute, and
    ``8 * bytes / bps`` for each transfer. A pure function of its arguments: host speed never enters.
    """
    flops = _positive("task.flops_per_sample", flops_per_sample)
    n = _non_negative("task.samples", samples)
    down = _non_negative("task.down_bytes", down_bytes)
    up = _non_negative("task.up_bytes", up_bytes)
    compute_s = n * flops / REFERENCE_FLOPS / profile.compute_sps
    return profile.latency_s + 8 * down / profile.down_bps + compute_s + 8 * up / profile.up_bps


# ----------------------------------------------------------------------------------- populations


def _check_population_args(n: int, seed: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError("population.n", f"must be an integer >= 1, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError("population.seed", f"must be an integer >= 0, got {seed!r}")


def _lognormal(rng: np.random.RandomState, median: float, sigma: float, n: int) -> np.ndarray:
    return median * np.exp(sigma * rng.standard_normal(n))


def mobile(n: int, seed: int) -> list[DeviceProfile]:
    """``n`` smartphones: long-tailed (lognormal) speeds and bandwidths, daily on-windows.

    Parameters and their sources are listed in the module docstring. Same ``(n, seed)``, same
    population; client ``i`` is entry ``i``.
    """
    _check_population_args(n, seed)
    rng = np.random.RandomState([seed, 1])
    compute = _lognormal(rng, 2000.0, 0.6, n)
    down = _lognormal(rng, 4.3e6, 0.47, n)
    up = _lognormal(rng, 3.3e6, 0.68, n)
    latency = _lognormal(rng, 0.05, 0.5, n)
    dropout = rng.uniform(0.06, 0.10, n)
    phase = (22 * 3600.0 + rng.normal(0.0, 5.2 * 3600.0, n)) % DAY_S
    duty = rng.uniform(0.1, 0.5, n)
    return [DeviceProfile(float(compute[i]), float(down[i]), float(up[i]), float(latency[i]),
                          float(dropout[i]), Availability.diurnal(float(phase[i]), float(duty[i])))
            for i in range(n)]


def silo(n: int, seed: int) -> list[DeviceProfile]:
    """``n`` cross-silo servers: fast, well connected, always available, no dropout (see module docstring)."""
    _check_population_args(n, seed)
    rng = np.random.RandomState([seed, 2])
    compute = _lognormal(rng, 1e6, 0.2, n)
    down = _lognormal(rng, 1e9, 0.3, n)
    up = _lognormal(rng, 1e9, 0.3, n)
    latency = _lognormal(rng, 0.02, 0.3, n)
    return [DeviceProfile(float(compute[i]), float(down[i]), float(up[i]), float(latency[i]), 0.0)
            for i in range(n)]


# ------------------------------------------------------------------------------------ trace files

_NUM = r"\d+(?:\.\d*)?(?:[eE][+-]?\d+)?"
_INTERVAL = re.compile(rf"^\s*({_NUM})\s*-\s*({_NUM})\s*$")


def load_population(path: str | Path) -> list[DeviceProfile]:
    """Profiles from a CSV or JSON trace (by suffix), ordered by client id; ids must be 0..n-1, each once.

    CSV: header ``client_id, compute_sps, down_bps, up_bps, latency_s, dropout_p`` and an optional
    ``available`` column of on-intervals ``"0-3600;7200-10800"`` (empty: always available).
    JSON: a list of objects with the same fields; ``availability`` (optional) is a list of
    ``[start, end]`` pairs or ``{"diurnal": {"phase_s": ..., "duty": ..., "period_s": ...}}``.
    A bad value raises ConfigError keyed ``population[i].field`` (``i`` = the i-th entry, 0-based);
    an unreadable file raises DataError. Nothing is unpickled.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read population trace {path}: {exc}") from None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        entries = _csv_entries(text, path)
    elif suffix == ".json":
        entries = _json_entries(text, path)
    else:
        raise DataError(f"population trace {path} must end in .csv or .json")
    return _order_by_id(entries)


def _csv_entries(text: str, path: Path) -> list[tuple[int, DeviceProfile]]:
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in reader.fieldnames or []]
    if not header:
        raise DataError(f"population trace {path} is empty")
    reader.fieldnames = header
    for col in _REQUIRED_COLUMNS:
        if col not in header:
            raise ConfigError(f"population.{col}", f"column missing from the header of {path}")
    unknown = [h for h in header if h not in (*_REQUIRED_COLUMNS, "available")]
    if unknown:
        raise ConfigError(f"population.{unknown[0]}", f"unknown column in {path}; known: "
                                                      f"{', '.join(_REQUIRED_COLUMNS)}, available")
    entries = []
    for i, row in enumerate(reader):
        key = f"population[{i}]"
        if None in row or any(row[c] is None for c in header):
            raise ConfigError(key, f"line {reader.line_num} of {path} has {len(header)} columns in its header "
                                   "but not in this row")
        values: dict[str, Any] = {c: _parse_float(f"{key}.{c}", row[c]) for c in _NUMERIC_FIELDS}
        values["availability"] = _parse_available(f"{key}.available", row.get("available") or "")
        entries.append((_parse_id(f"{key}.client_id", row["client_id"]), _profile(key, values)))
    return entries


def _parse_float(key: str, text: str) -> float:
    try:
        return _number(key, float(text))
    except ValueError:
        raise ConfigError(key, f"must be a number, got {text!r}") from None


def _parse_id(key: str, raw: Any) -> int:
    if isinstance(raw, str):
        try:
            raw = int(raw.strip())
        except ValueError:
            raise ConfigError(key, f"must be an integer, got {raw!r}") from None
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise ConfigError(key, f"must be an integer >= 0, got {raw!r}")
    return raw


def _parse_available(key: str, text: str) -> Availability:
    if not text.strip():
        return Availability.always()
    pairs = []
    for part in text.split(";"):
        m = _INTERVAL.match(part)
        if m is None:
            raise ConfigError(key, f"intervals look like \"0-3600;7200-10800\", got {part!r}")
        pairs.append((float(m.group(1)), float(m.group(2))))
    return Availability(intervals=_check_intervals(key, pairs))


def _json_entries(text: str, path: Path) -> list[tuple[int, DeviceProfile]]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"population trace {path} is not valid JSON: {exc}") from None
    if not isinstance(raw, list):
        raise DataError(f"population trace {path} must hold a JSON list of objects")
    entries = []
    for i, obj in enumerate(raw):
        key = f"population[{i}]"
        if not isinstance(obj, dict):
            raise ConfigError(key, f"must be an object, got {obj!r}")
        unknown = [k for k in obj if k not in (*_REQUIRED_COLUMNS, "availability")]
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}", "unknown field")
        for name in _REQUIRED_COLUMNS:
            if name not in obj:
                raise ConfigError(f"{key}.{name}", "missing")
        values: dict[str, Any] = {c: _number(f"{key}.{c}", obj[c]) for c in _NUMERIC_FIELDS}
        values["availability"] = _json_availability(f"{key}.availability", obj.get("availability"))
        entries.append((_parse_id(f"{key}.client_id", obj["client_id"]), _profile(key, values)))
    return entries


def _json_availability(key: str, raw: Any) -> Availability:
    if raw is None:
        return Availability.always()
    if isinstance(raw, list):
        return Availability(intervals=_check_intervals(key, raw))
    if isinstance(raw, dict) and set(raw) == {"diurnal"} and isinstance(raw["diurnal"], dict):
        d = raw["diurnal"]
        unknown = [k for k in d if k not in ("phase_s", "duty", "period_s")]
        if unknown:
            raise ConfigError(f"{key}.diurnal.{unknown[0]}", "unknown field; known: phase_s, duty, period_s")
        values = {"phase_s": d.get("phase_s", 0.0), "duty": d.get("duty", 1.0), "period_s": d.get("period_s", DAY_S)}
        _check_diurnal(f"{key}.diurnal", **values)
        return Availability(**{k: float(v) for k, v in values.items()})
    raise ConfigError(key, f"must be a list of [start, end] pairs or {{\"diurnal\": {{...}}}}, got {raw!r}")


def _profile(key: str, values: dict[str, Any]) -> DeviceProfile:
    check_profile_values(values, key)
    return DeviceProfile(**values)


def _order_by_id(entries: list[tuple[int, DeviceProfile]]) -> list[DeviceProfile]:
    seen: dict[int, int] = {}
    for i, (cid, _) in enumerate(entries):
        if cid in seen:
            raise ConfigError(f"population[{i}].client_id", f"duplicate id {cid} (also entry {seen[cid]})")
        seen[cid] = i
    n = len(entries)
    if n == 0:
        raise ConfigError("population", "holds no clients")
    bad = sorted(c for c in seen if c >= n)
    if bad:
        i = seen[bad[0]]
        raise ConfigError(f"population[{i}].client_id", f"ids must be 0..{n - 1}, got {bad[0]}")
    return [profile for _, profile in sorted(entries, key=lambda e: e[0])]
