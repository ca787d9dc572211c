"""Many concurrent clients against one real server process: no update is lost (benchmarks/load.py, smaller)."""

from __future__ import annotations

import threading

from benchmarks.load import run_load

CLIENTS, ROUNDS = 50, 3


def test_fifty_threaded_clients_lose_no_update() -> None:
    before = {t.ident for t in threading.enumerate()}
    record = run_load(clients=CLIENTS, rounds=ROUNDS, tls=True, timeout_s=120.0)
    assert record["clients"] == CLIENTS and record["rounds"] == ROUNDS
    assert record["updates_expected"] == CLIENTS * ROUNDS
    assert record["updates_received"] == record["updates_expected"], record
    assert record["server_rss_mb"] > 0, record
    assert record["rounds_per_s"] is not None and record["rounds_per_s"] > 0, record
    leftover = [t.name for t in threading.enumerate() if t.ident not in before and t.name.startswith("load-c")]
    assert not leftover, f"client threads still running: {leftover[:5]}"


def test_asynchronous_load_loses_no_accepted_update() -> None:
    """FedBuff on a model of a million values, clients in their own processes: every update a client was told was
    accepted is in the server's journal, and the server used a buffer's worth per version."""
    record = run_load("async", clients=20, rounds=3, concurrency=10, buffer_size=5, timeout_s=240.0)
    assert (record["mode"], record["clients"], record["values"]) == ("async", 20, 1_000_010)
    assert record["versions"] == 3 and record["accepted"] >= 15, record
    assert record["lost"] == 0 and record["journaled"] == record["accepted"], record
    assert record["journaled"] - record["left_in_buffer"] == 15, record  # 3 versions of 5
    assert record["updates_per_s"] > 0 and record["server_rss_mb"] > 0, record
