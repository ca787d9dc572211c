"""`fedloom dashboard` without a browser: what it reads from run folders and server state, and how it is served."""

import hashlib
import http.client
import json
import re
import sqlite3
import ssl
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedloom.config import load_config
from fedloom.dashboard.serve import check_bind, is_loopback
from fedloom.dashboard.sources import Watched
from fedloom.deploy.certs import make_dev_pki
from fedloom.deploy.state import ServerState as StateStore
from fedloom.errors import ConfigError, DataError
from fedloom.simulation.runner import simulate
from fedloom.transport.dispatch import Measured

PRIVATE = ["data.dataset=\"synthetic\"", "data.num_clients=20", "model.name=\"logreg\"", "server.clients_per_round=5",
           "run.rounds=4", "run.client_metrics=true", "privacy.noise_multiplier=1.5", "privacy.clip=1.0",
           "privacy.epsilon_budget=30.0", "aggregation.weighting=\"uniform\""]


def test_a_run_folder_shows_progress_privacy_clients_and_traffic(tmp_path):
    run = simulate(load_config(None, [*PRIVATE, f"run.out_dir=\"{tmp_path}\""]), progress=False).run_dir
    (view,) = [r.view() for r in Watched([tmp_path]).runs()]  # the folder of runs stands for the run in it
    s = view["summary"]
    assert view["kind"] == "simulation" and view["status"] == "finished" and view["where"] == str(run)
    assert (s["rounds_done"], s["rounds_planned"]) == (4, 4) and len(view["rows"]) == 4
    assert 0 < s["epsilon"] < s["epsilon_budget"] == 30.0 and s["delta"] == 1e-5
    assert s["measurements"]["dp_noise.epsilon"] == s["epsilon"] and "clip.clip_bound" in s["measurements"]
    assert s["accepted"] == 20 and s["refused"] == 0 and s["bytes_up"] > 0
    assert 0.5 < s["compression_ratio"] < 1.0  # no codec: the envelopes make the wire a little heavier than dense
    assert sum(c["asked"] for c in view["clients"]) == 20 and all(c["state"] == "accepted" for c in view["clients"])
    assert [r["round"] for r in Watched([run]).runs()[0].view(since=2)["rows"]] == [3, 4]  # only what is new


def test_runs_side_by_side_with_the_simulated_clock_and_clients_read_as_they_grow(tmp_path):
    plain = simulate(load_config(None, [*PRIVATE, f"run.out_dir=\"{tmp_path}\"", "run.name=\"plain\""]),
                     progress=False).run_dir
    simulate(load_config(None, [*PRIVATE, f"run.out_dir=\"{tmp_path}\"", "run.name=\"phones\"",
                                "hetero.population=\"mobile\""]), progress=False)
    watched = Watched([tmp_path])
    views = {r.name: r.view() for r in watched.runs()}
    assert set(views) == {"plain", "phones"} and len({v["key"] for v in views.values()}) == 2
    assert views["plain"]["summary"]["sim_time_s"] is None
    assert views["phones"]["summary"]["sim_time_s"] > 0 and views["phones"]["summary"]["trips"] >= 20
    assert all(r["sim_time_s"] > 0 for r in views["phones"]["rows"])
    timed = [c for c in views["phones"]["clients"] if c["accepted"]]
    assert timed and all(c["mean_s"] > 0 for c in timed)  # each client's round trips on the simulated clock
    assert all(c["mean_s"] is None for c in views["plain"]["clients"])  # no clock, no seconds

    with open(plain / "clients.csv", "a") as f:  # the next round's rows, the last one half-written
        f.write("5,3,accepted,0.25,,10,1,\n5,4,invalid_upd")
    (view,) = [r.view() for r in watched.runs() if r.name == "plain"]
    clients = {c["client_id"]: c for c in view["clients"]}
    assert clients[3]["last_round"] == 5 and clients[3]["loss"] == 0.25
    assert sum(c["asked"] for c in view["clients"]) == 20 + 1  # the half-written row waits for the next look
    (plain / "clients.csv").write_text("round,client,status,loss,loss_sq,examples,steps,seconds\n1,7,no_reply,,,,,\n")
    (view,) = [r.view() for r in watched.runs() if r.name == "plain"]
    assert [(c["client_id"], c["state"]) for c in view["clients"]] == [(7, "no_reply")]  # rewritten: read anew


def test_a_folder_of_runs_shows_new_ones_as_they_appear_and_nothing_is_an_error(tmp_path):
    watched = Watched([tmp_path])
    assert watched.runs() == []
    half = tmp_path / "half-written"
    half.mkdir()
    (half / "config.toml").write_text("[run]\nrounds = 5\nname = 'half'\n")
    (half / "metrics.csv").write_text("round,train_loss\n1,0.5\n2,")  # a row being written
    (run,) = watched.runs()
    assert run.name == "half" and run.status in ("running", "waiting") and run.summary["rounds_planned"] == 5
    with pytest.raises(DataError, match="nothing at"):
        Watched([tmp_path / "missing"])


def test_a_long_client_list_shows_the_most_recent_and_says_of_how_many(tmp_path):
    (tmp_path / "config.toml").write_text("[run]\nrounds = 300\n")
    (tmp_path / "metrics.csv").write_text("round,train_loss\n1,0.5\n")
    rows = "".join(f"{i + 1},{i},accepted,0.5,,10,1,\n" for i in range(205))  # client i asked in round i + 1
    (tmp_path / "clients.csv").write_text("round,client,status,loss,loss_sq,examples,steps,seconds\n" + rows)
    view = Watched([tmp_path]).runs()[0].view()
    assert view["clients_total"] == 205 and len(view["clients"]) == 200
    assert [c["client_id"] for c in view["clients"][:2]] == [204, 203] and view["clients"][-1]["client_id"] == 5


def measured(cid, rnd, outcome="ok"):
    return Measured(cid, rnd, "TrainRequest", outcome, time.time(), 0.01, 0.5, 0.02, 1000, 400, 32.0)


def test_server_state_shows_clients_connection_refusals_and_is_read_without_blocking_the_server(tmp_path):
    db = tmp_path / "state" / "server.db"
    now = time.time()
    with StateStore(db) as store:
        run = store.start_run("hospitals", "[run]\nrounds = 10\n[privacy]\nepsilon_budget = 8.0\ndelta = 1e-6\n"
                                           "[deploy]\nheartbeat_s = 1.0\n")
        for name in ("st-mary", "general", "university", "gone"):
            store.enroll(name)
        store.revoke("gone")
        for rnd in (1, 2):
            store.open_round(run, rnd)
            store.complete_round(run, rnd, [np.zeros(3, np.float32)], ["w"],
                                 {"round": rnd, "train_loss": 0.5, "accepted": 2, "rejected": 1,
                                  "rejected.not_finite": 1, "clip.clip_bound": 1.0, "dp_noise.epsilon": rnd * 1.5,
                                  "round_s": 2.0})
            store.record_tasks(run, [measured(0, rnd), measured(1, rnd), measured(2, rnd, "not_finite")], 1.0,
                               {0: [(now - 60, now)], 1: [(now - 60, now - 30)]})
        store.open_round(run, 3)
        (view,) = [r.view() for r in Watched([tmp_path / "state"]).runs()]
        s = view["summary"]
        assert view["kind"] == "server" and view["status"] == "running" and view["name"] == "hospitals"
        assert (s["rounds_done"], s["open_round"], s["rejected"]) == (2, 3, {"not_finite": 2})
        assert (s["epsilon"], s["epsilon_budget"], s["delta"]) == (3.0, 8.0, 1e-6)
        assert s["eta_s"] == pytest.approx(8 * 2.0, rel=0.2)  # the rounds' own durations, from the rounds table
        assert view["clients_total"] == 4
        clients = {c["name"]: c for c in view["clients"]}
        assert [clients[n]["state"] for n in ("st-mary", "general", "university", "gone")] == [
            "connected", "disconnected", "never connected", "revoked"]
        assert (clients["st-mary"]["asked"], clients["st-mary"]["accepted"], clients["st-mary"]["bytes_up"]) == (
            2, 2, 800)
        assert clients["university"]["failure"] == "not_finite x2" and clients["university"]["accepted"] == 0
        assert clients["st-mary"]["work_s"] == pytest.approx(0.5)

        writer = sqlite3.connect(db, timeout=0.1)  # the server in the middle of a write transaction
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE clients SET last_seen = ? WHERE name = 'general'", (time.time(),))
        t0 = time.monotonic()
        (run_view,) = Watched([db]).runs()
        assert time.monotonic() - t0 < 1.0 and run_view.summary["rounds_done"] == 2  # the committed state
        writer.commit()  # and the dashboard's look held no lock that stops the commit
        writer.close()
        store.complete_round(run, 3, [np.zeros(3, np.float32)], ["w"], {"round": 3})
    assert Watched([db]).runs()[0].summary["rounds_done"] == 3
    bad = sqlite3.connect(db)
    bad.execute("UPDATE rounds SET metrics_json = '{not json' WHERE round = 3")
    bad.commit()
    bad.close()
    assert Watched([db]).runs() == []  # said in the log; the next look tries again, the page stays up


def test_binding_beyond_loopback_needs_tls_and_a_token():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    check_bind("127.0.0.1", None, None, None)
    with pytest.raises(ConfigError, match=r"--cert/--key \(TLS\) and --token-file"):
        check_bind("0.0.0.0", None, None, None)
    with pytest.raises(ConfigError, match="--token-file"):
        check_bind("0.0.0.0", "c.pem", "c.key", None)
    with pytest.raises(ConfigError, match="both --cert and --key"):
        check_bind("127.0.0.1", "c.pem", None, None)
    check_bind("0.0.0.0", "c.pem", "c.key", "token")


def dashboard(*args: str) -> tuple[subprocess.Popen, str]:
    """A real `fedloom dashboard` process and the URL its first line gives."""
    proc = subprocess.Popen([sys.executable, "-m", "fedloom.cli", "dashboard", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    found = re.search(r"(https?)://([\d.]+):(\d+)/", line)
    assert found, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, found.group(0)


def ask(url: str, method: str = "GET", path: str = "/", context=None, headers=None):
    scheme, host, port = re.match(r"(https?)://([\d.]+):(\d+)/", url).groups()
    conn = http.client.HTTPSConnection(host, int(port), context=context) if scheme == "https" else \
        http.client.HTTPConnection(host, int(port))
    conn.request(method, path, body=b"{}" if method != "GET" else None, headers=headers or {})
    answer = conn.getresponse()
    return answer.status, dict(answer.getheaders()), answer.read()


def test_the_served_page_is_read_only_and_loads_nothing_from_elsewhere(tmp_path):
    run = simulate(load_config(None, [*PRIVATE, f"run.out_dir=\"{tmp_path}\""]), progress=False).run_dir
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.iterdir() if p.is_file()}
    proc, url = dashboard(str(run))
    try:
        status, headers, page = ask(url)
        assert status == 200 and "default-src 'self'" in headers["content-security-policy"]
        assert not re.search(rb"(src|href)=\"(https?:)?//", page)  # every script and style is served from here
        assert ask(url, headers={"Host": "rebound.example"})[0] == 400  # loopback: only its own names
        status, _, body = ask(url, path="/static/plotly.min.js")
        assert status == 200 and len(body) > 1_000_000
        status, _, body = ask(url, path="/api/state")
        assert status == 200 and json.loads(body)["runs"][0]["summary"]["rounds_done"] == 4
        status, _, body = ask(url, path="/api/state?since=x:y,:,k:-1,k:" + "9" * 5000)  # garbage is ignored
        assert status == 200 and len(json.loads(body)["runs"][0]["rows"]) == 4
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            for path in ("/", "/api/state", "/static/dashboard.js"):
                status, headers, _ = ask(url, method, path)
                assert status == 405 and headers["allow"] == "GET, HEAD"
    finally:
        proc.kill()
        proc.wait()
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.iterdir() if p.is_file()} == before


def test_beyond_loopback_it_is_refused_without_a_token_and_over_tls_asks_for_it(tmp_path):
    refused = subprocess.run([sys.executable, "-m", "fedloom.cli", "dashboard", str(tmp_path), "--host", "0.0.0.0"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "needs --cert/--key (TLS) and --token-file" in refused.stderr
    pki = tmp_path / "pki"
    make_dev_pki(pki)
    token_file = tmp_path / "dashboard.token"
    proc, url = dashboard(str(tmp_path), "--cert", str(pki / "server.pem"), "--key", str(pki / "server.key"),
                          "--token-file", str(token_file))
    try:
        assert url.startswith("https://") and token_file.stat().st_mode & 0o077 == 0
        token = token_file.read_text().strip()
        tls = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        assert ask(url, context=tls)[0] == 401
        assert ask(url, path="/api/state?token=wrong", context=tls)[0] == 401
        status, headers, _ = ask(url, path=f"/?token={token}", context=tls)
        assert status == 303 and headers["location"] == "/"
        cookie = headers["set-cookie"]
        assert "HttpOnly" in cookie and "Secure" in cookie and "SameSite=strict" in cookie
        assert ask(url, path="/api/state", context=tls, headers={"Cookie": cookie.split(";")[0]})[0] == 200
        assert ask(url, path="/api/state", context=tls, headers={"Authorization": f"Bearer {token}"})[0] == 200
        with pytest.raises(ssl.SSLError):  # only a client that trusts its certificate talks to it
            ask(url, context=ssl.create_default_context())
    finally:
        proc.kill()
        proc.wait()
    assert Path(token_file).read_text().strip() == token  # kept for the next start


def test_the_dashboard_benchmark_watches_a_real_load_run_to_its_end():
    from benchmarks.dashboard import Watcher
    from benchmarks.load import run_load

    record = run_load("sync", clients=4, rounds=3, timeout_s=180.0, watcher=Watcher(every_s=0.05))
    assert record["lost"] == 0 and record["rounds_seen"] == 3  # the last look saw every round
    assert record["polls"] > 0 and record["poll_errors"] == 0 and record["poll_ms_median"] > 0
    assert record["dashboard_rss_mb"] > 10
