"""FedBuff over gRPC: updates journaled before they are accepted, and a server killed mid-buffer."""

import asyncio
import os
import re
import signal
import sqlite3
import time

import numpy as np
import pytest
from test_e2e import BASE, client_args, federation, fedloom, free_port, wait_for
from test_service import MODEL, Running
from test_trace import SLOW_MODEL

from fedloom.deploy.buffered import journal_entry
from fedloom.deploy.certs import make_dev_pki
from fedloom.deploy.journal import Journal
from fedloom.deploy.service import TASK_KEY
from fedloom.deploy.state import ServerState as StateStore
from fedloom.errors import StateError
from fedloom.messages import TrainConfig, TrainReply, TrainRequest, Update
from fedloom.params import ParamSpec

SENT = [np.full(3, 2.0, np.float32)]


@pytest.fixture
def served(tmp_path):
    r = Running(tmp_path)
    yield r
    r.close()


def _journaling(r: Running, folder):
    run_id = r.store.start_run("async", "")
    journal = Journal(r.store, run_id, folder)
    r.service.dispatcher.journal = lambda task, reply: asyncio.wrap_future(
        journal.write(journal_entry(task.task_id, task.version, reply)))
    return run_id, journal


def _arrivals(r: Running, n: int, timeout: float = 10.0):
    out, end = [], time.monotonic() + timeout
    while len(out) < n and time.monotonic() < end:
        out += r.transport.arrivals(0.2)
    return out


def test_an_update_is_journaled_as_its_delta_before_it_is_accepted_and_a_push_again_adds_nothing(served, tmp_path):
    r = served
    run_id, journal = _journaling(r, tmp_path / "journal")
    session, meta = r.join()
    (task,) = r.transport.submit([TrainRequest(0, 7, SENT, TrainConfig(round=7))], version=4)
    task_id, request = r.pull(session, meta)
    assert task_id == task.task_id and request.round == 7
    new = TrainReply(0, 7, update=Update([np.full(3, 5.0, np.float32)], 3.0, "params", {"loss": 0.5}))
    tagged = (*meta, (TASK_KEY, task_id))
    assert r.push(new, task_id, tagged).accepted
    rows = r.store.buffered(run_id)  # durable when the push was answered
    assert [(x["task_id"], x["client_id"], x["dispatch"], x["version_sent"], x["weight"]) for x in rows] == [
        (task_id, 0, 7, 4, 3.0)]
    assert r.push(new, task_id, tagged).accepted  # its answer was lost, say: accepted again, nothing added
    assert len(r.store.buffered(run_id)) == 1
    untagged = r.push(new, task_id, meta)  # without naming its task it is an unawaited reply
    assert not untagged.accepted and untagged.error.code == "not_awaited"
    (got,) = _arrivals(r, 1)
    assert got[0].task_id == task_id and got[1].update.kind == "delta"
    np.testing.assert_array_equal(got[1].update.values[0], np.full(3, 3.0))  # 5 - 2: the change it stands for
    assert got[2].outcome == "ok" and got[2].up_bytes > 0
    (entry,) = journal.buffered(ParamSpec.of(SENT))  # what a restarted server reads back
    assert (entry.task_id, entry.version_sent, entry.update.metrics) == (task_id, 4, {"loss": 0.5})
    np.testing.assert_array_equal(entry.update.values[0], np.full(3, 3.0))

    (bad,) = r.transport.submit([TrainRequest(0, 8, SENT, TrainConfig(round=8))], version=4)
    task_id, _ = r.pull(session, meta)
    nan = r.push(TrainReply(0, 8, update=Update([np.full(3, np.nan, np.float32)], 1.0)), task_id, meta)
    assert not nan.accepted and nan.error.code == "invalid_update"
    (got,) = _arrivals(r, 1)
    assert got[1].error.code == "invalid_update" and len(r.store.buffered(run_id)) == 1  # refused: not journaled
    journal.close()


def test_an_update_the_journal_cannot_keep_is_refused_and_its_task_ends_with_why(served, tmp_path):
    r = served
    (tmp_path / "journal").write_text("a file where the journal's folder should be")
    run_id, journal = _journaling(r, tmp_path / "journal")
    session, meta = r.join()
    r.transport.submit([TrainRequest(0, 1, MODEL, TrainConfig(round=1))], version=0)
    task_id, _ = r.pull(session, meta)
    answer = r.push(TrainReply(0, 1, update=Update([np.ones(3, np.float32)], 1.0)), task_id, meta)
    assert not answer.accepted and answer.error.code == "server_error" and "could not keep" in answer.error.reason
    (got,) = _arrivals(r, 1)
    assert got[1].error.code == "server_error" and r.store.buffered(run_id) == []
    journal.close()


def test_a_round_can_only_use_updates_the_journal_holds_unused(served, tmp_path):
    r = served
    run_id, journal = _journaling(r, tmp_path / "journal")
    r.store.open_round(run_id, 1)
    with pytest.raises(StateError, match="used 1 journaled updates but only 0"):
        r.store.complete_round(run_id, 1, MODEL, ["w"], {}, applied=["never-journaled"])
    assert r.store.last_completed_round(run_id) == 0  # nothing marked
    journal.close()


def _sql(db, query):
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        return conn.execute(query).fetchall()


def test_fedbuff_over_tls_survives_a_kill_mid_buffer_losing_and_repeating_nothing(tmp_path):
    """Three real clients over mutual TLS, the server killed with SIGKILL while its buffer holds accepted updates:
    restarted, it adds them first, and every update a client was told was accepted is used by exactly one version."""
    (tmp_path / "slow_model.py").write_text(SLOW_MODEL)
    pki = tmp_path / "pki"
    make_dev_pki(pki, clients=["c0", "c1", "c2"])
    config = tmp_path / "run.toml"
    state = tmp_path / "state"
    config.write_text(BASE.format(port=free_port(), state=state, pki=pki)
                      .replace('[model]\nname = "mlp"', '[model]\nfactory = "slow_model:make"')
                      .replace("rounds = 3", "rounds = 6").replace("every = 1", "every = 3")
                      .replace("[server]\n", '[server]\naggregation = "fedbuff"\nbuffer_size = 4\nconcurrency = 2\n'))
    db = state / "server.db"
    server_args = ["server", "--config", str(config), "--set", f'deploy.cert="{pki / "server.pem"}"',
                   "--set", f'deploy.key="{pki / "server.key"}"']
    env = {**os.environ, "SLOW_S": "0.03"}  # 10 steps a task: 0.3 s each
    server = fedloom(*server_args, cwd=tmp_path)
    clients = []
    try:
        wait_for(state / "tokens" / "c2.token")
        clients = [fedloom(*client_args(config, pki, state, f"c{i}", i), cwd=tmp_path, env=env) for i in range(3)]
        end = time.monotonic() + 120
        while True:  # mid-buffer: some accepted updates wait in the buffer of the version after the second
            assert time.monotonic() < end and server.poll() is None, server.stderr.read() if server.poll() else ""
            if db.exists():
                try:
                    done = _sql(db, "SELECT MAX(round) FROM rounds WHERE status = 'done'")[0][0] or 0
                    waiting = _sql(db, "SELECT COUNT(*) FROM updates WHERE applied IS NULL")[0][0]
                except sqlite3.OperationalError:  # the tables are being created
                    done = waiting = 0
                if done >= 2 and waiting >= 1:
                    break
            time.sleep(0.02)
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
        killed_at = _sql(db, "SELECT MAX(round) FROM rounds WHERE status = 'done'")[0][0]
        in_buffer = [t for (t,) in _sql(db, "SELECT task_id FROM updates WHERE applied IS NULL ORDER BY rowid")]
        journaled = {t for (t,) in _sql(db, "SELECT task_id FROM updates")}
        assert in_buffer  # accepted, and used by no done version

        server = fedloom(*server_args, cwd=tmp_path)  # the same command: it resumes
        out, err = server.communicate(timeout=180)
        assert server.returncode == 0, err
        logs = []
        for c in clients:
            _, cerr = c.communicate(timeout=60)
            assert c.returncode == 0, cerr
            logs.append(cerr)
    finally:
        for p in [server, *clients]:
            if p.poll() is None:
                p.kill()
    assert f"resuming after round {killed_at}" in err
    assert f"the journal holds {len(in_buffer)} accepted updates no version used" in err
    assert [int(x) for x in re.findall(r"^round (\d+):", out, re.M)] == list(range(killed_at + 1, 7))

    used = dict(_sql(db, "SELECT task_id, applied FROM updates"))
    assert journaled <= used.keys()  # nothing journaled before the kill was lost
    # the buffer at the kill went into the next version (and any arrival beyond it into the one after), in order
    assert [used[t] for t in in_buffer] == [killed_at + 1 + i // 4 for i in range(len(in_buffer))]
    per_version = dict(_sql(db, "SELECT applied, COUNT(*) FROM updates WHERE applied IS NOT NULL GROUP BY applied"))
    assert per_version == {v: 4 for v in range(1, 7)}  # each update used once: every version used exactly 4
    accepted = {t for log in logs for t in re.findall(r"task ([0-9a-f]{32}): TrainReply accepted", log)}
    assert accepted and accepted <= used.keys()  # every update a client was told was accepted is in the journal
    assert len(_sql(db, "SELECT 1 FROM rounds WHERE status = 'done'")) == 6
    leftover = {f for (f,) in _sql(db, "SELECT DISTINCT file FROM updates WHERE applied IS NULL")}
    assert {p.name for p in (state / "journal" / "run-0001").iterdir()} == leftover  # used files are deleted


def test_fedasync_over_grpc_applies_each_update_alone_with_the_staleness_of_the_version_it_trained_on(tmp_path):
    """FedAsync (a buffer of one) with three real clients training at once, their updates compressed to 8 bits: every
    version uses one update, decoded at the door and journaled as the change it stands for, and an update that
    arrives after others were applied counts the versions since the one it was sent."""
    (tmp_path / "slow_model.py").write_text(SLOW_MODEL)  # tasks of 0.5 s: the three clients' tasks overlap
    pki = tmp_path / "pki"
    make_dev_pki(pki, clients=["c0", "c1", "c2"])
    config = tmp_path / "run.toml"
    state = tmp_path / "state"
    config.write_text(BASE.format(port=free_port(), state=state, pki=pki).replace("rounds = 3", "rounds = 9")
                      .replace("every = 1", "every = 9")
                      .replace('[model]\nname = "mlp"', '[model]\nfactory = "slow_model:make"')
                      .replace("[server]\n", '[server]\naggregation = "fedasync"\nconcurrency = 3\n')
                      + '\n[compression]\nuplink = "uniform8"\n')
    federation(config, pki, state, [client_args(config, pki, state, f"c{i}", i) for i in range(3)],
               envs=[{**os.environ, "SLOW_S": "0.05"}] * 3, cwd=tmp_path)
    rows = _sql(state / "server.db", "SELECT applied, version_sent FROM updates WHERE applied IS NOT NULL "
                                     "ORDER BY applied")
    assert [v for v, _ in rows] == list(range(1, 10))  # one update per version
    staleness = [v - 1 - sent for v, sent in rows]  # versions applied between its model and its own
    assert min(staleness) >= 0 and max(staleness) >= 1, staleness
    done = StateStore(state / "server.db")
    run_id = done.resume_run("hospitals")
    history, tasks = done.history(run_id), done.tasks(run_id)
    done.close()
    assert [h["metrics"]["accepted"] for h in history] == [1] * 9
    assert history[-1]["metrics"]["test_accuracy"] > 0.8
    sent = [t["up_bytes"] for t in tasks if t["kind"] == "TrainRequest" and t["outcome"] == "ok"]
    values = 30 * 16 + 16 + 16 * 2 + 2  # the MLP's
    assert len(sent) >= 9 and all(n < 2 * values for n in sent), sent  # 8 bits and scales, not 4 bytes a value


def test_the_journal_clears_what_a_crash_mid_commit_left_and_refuses_a_database_that_lost_rows(tmp_path):
    store = StateStore(tmp_path / "server.db")
    run_id = store.start_run("async", "")
    folder = tmp_path / "journal"
    journal = Journal(store, run_id, folder)
    for i in range(2):
        update = Update([np.full(3, float(i), np.float32)], 1.0, "delta", {"loss": 0.1})
        journal.write(journal_entry(f"task{i}", 0, TrainReply(i, i + 1, update=update))).result(timeout=10)
    journal.close()
    indexed = {r["file"] for r in store.buffered(run_id)}
    assert {p.name for p in folder.iterdir()} == indexed
    (folder / "batch-99999999999999999999-cafe.npy").write_bytes(b"written, never indexed: never acknowledged")
    (folder / "batch-99999999999999999999-beef.tmp-1-2.npy").write_bytes(b"half")
    journal = Journal(store, run_id, folder)  # a restart: the unindexed newest file and the temp file go
    assert {p.name for p in folder.iterdir()} == indexed
    assert [e.task_id for e in journal.buffered(ParamSpec.of([np.zeros(3, np.float32)]))] == ["task0", "task1"]
    journal.close()
    (folder / "batch-00000000000000000001-dead.npy").write_bytes(b"older than what the index knows")
    with pytest.raises(StateError, match="lost accepted updates"):
        Journal(store, run_id, folder)
    store.close()
