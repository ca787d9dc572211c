"""Update codecs' speed: encode + decode of one 10M-value float32 update on one thread.

    python -m benchmarks.run codecs

One JSON line per scheme on stdout: ``scheme`` (the :func:`fedloom.compression.codecs.parse` spec)
and ``mb_per_s`` (MB = 1e6 bytes of float32 input, per second of encode + decode). Each row's
``encode_s``, ``decode_s`` (of the fastest of 3 timed runs after one warm-up), ``bytes`` (the
payload), ``bits_per_value`` and ``relative_error`` (||decode(encode(x)) - x|| / ||x||) go to stderr.
The update is 10,000,000 values drawn from a standard normal distribution (seed 0); the codecs'
randomness comes from seed 1. The target is >= 200 MB/s for uniform8, uniform2+rotate and topk0.01.

It runs on one thread: the measuring runs in a child process started with ``OMP_NUM_THREADS``,
``OPENBLAS_NUM_THREADS`` and ``MKL_NUM_THREADS`` set to 1 (numpy is already loaded, with its thread
pools sized, in ``benchmarks.run``'s own process). Run it on an otherwise idle machine: the figures
are bound by one core's speed and memory bandwidth (the codecs make a dozen passes over 40 MB);
the reference figures in the report were taken on an AMD EPYC (Zen 3, AVX2) KVM guest with 2 vCPUs,
numpy 2.4 with its bundled OpenBLAS. The run takes about 10 s and peaks under 1 GB of memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.rows import emit

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
SCHEMES = ("uniform8", "uniform4", "uniform2+rotate", "qsgd", "topk0.01", "topk0.01+uniform8", "randk0.01")
FIELDS = ("scheme", "mb_per_s")
N = 10_000_000
REPEAT = 3


def measure(scheme: str, x: np.ndarray, rng: np.random.Generator) -> dict:
    """One scheme's record: the fastest of ``REPEAT`` encode + decode runs after a warm-up."""
    from fedloom.compression.codecs import parse

    codec = parse(scheme)
    data = codec.encode(x, rng)
    codec.decode(data, x.size)
    runs = []
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        data = codec.encode(x, rng)
        t1 = time.perf_counter()
        y = codec.decode(data, x.size)
        t2 = time.perf_counter()
        runs.append((t2 - t0, t1 - t0, t2 - t1))
    total, encode_s, decode_s = min(runs)
    error = np.linalg.norm((y - x).astype(np.float64)) / np.linalg.norm(x.astype(np.float64))
    return {"scheme": scheme, "mb_per_s": round(x.nbytes / 1e6 / total, 1), "encode_s": round(encode_s, 4),
            "decode_s": round(decode_s, 4), "bytes": len(data), "bits_per_value": round(len(data) * 8 / x.size, 4),
            "relative_error": round(float(error), 4)}


def measure_all(schemes: tuple[str, ...] = SCHEMES, n: int = N) -> list[dict]:
    """Measure in this process (started with one thread: see :func:`run_codecs`); print each row."""
    x = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    rng = np.random.default_rng(1)
    records = []
    for scheme in schemes:
        record = measure(scheme, x, rng)
        emit(record, FIELDS)
        records.append(record)
    return records


def run_codecs() -> None:
    """Run :func:`measure_all` in a child process whose BLAS and OpenMP pools have one thread."""
    env = {**os.environ, **dict.fromkeys(THREAD_VARS, "1")}
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "benchmarks.codecs"], env=env, cwd=root, check=True)


if __name__ == "__main__":
    if any(os.environ.get(v) != "1" for v in THREAD_VARS):
        sys.exit("start this through `python -m benchmarks.run codecs` (it sets one thread)")
    measure_all()
