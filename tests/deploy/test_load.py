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
