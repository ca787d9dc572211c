"""Adaptive selection and round deadlines with real `fedloom server` and `fedloom client` processes over mutual TLS.

One or more clients are slowed on purpose (their training steps sleep, ``test_trace.SLOW_MODEL``); the
server measures each task's round trip (``transport/dispatch.py``) and keeps it in its state.
"""

import os

from test_e2e import BASE, client_args, federation, free_port
from test_trace import SLOW_MODEL

from fedloom.build import build_clients, build_strategy
from fedloom.client.torch_work import param_names
from fedloom.config import load_config
from fedloom.deploy.certs import make_dev_pki
from fedloom.deploy.server import _resume
from fedloom.deploy.state import ServerState as StateStore
from fedloom.server import SyncServer


def run(tmp_path, n: int, slow: dict[int, float], settings: list[str], rounds: int):
    """A deployed run of ``n`` clients (client i's training steps ``slow[i]`` seconds slower) with the server's
    ``settings``; returns its store, run id and the server's config."""
    (tmp_path / "slow_model.py").write_text(SLOW_MODEL)
    names = [f"c{i}" for i in range(n)]
    pki = tmp_path / "pki"
    make_dev_pki(pki, clients=names)
    config = tmp_path / "run.toml"
    config.write_text(BASE.format(port=free_port(), state=tmp_path / "state", pki=pki)
                      .replace('[model]\nname = "mlp"', '[model]\nfactory = "slow_model:make"'))
    state = tmp_path / "state"
    common = [f"data.num_clients={n}", f"deploy.clients={names}".replace("'", '"'), f"deploy.min_clients={n}",
              f"run.rounds={rounds}", "eval.federated_clients=0"]
    sets = [a for s in [*common, *settings] for a in ("--set", s)]
    federation(config, pki, state, [[*client_args(config, pki, state, f"c{i}", i), *sets[:4]] for i in range(n)],
               *sets, cwd=tmp_path, envs=[{**os.environ, "SLOW_S": str(slow.get(i, 0))} for i in range(n)])
    store = StateStore(state / "server.db")
    return store, store.resume_run("hospitals"), load_config(config, [*common, *settings])


def trained(store, run_id) -> dict[int, list[tuple[int, str]]]:
    """Each round's training tasks as (client, outcome), leaving out the late replies measured afterwards."""
    out: dict[int, list[tuple[int, str]]] = {}
    for t in store.tasks(run_id):
        if t["kind"] == "TrainRequest" and t["outcome"] != "late":
            out.setdefault(t["round"], []).append((t["client_id"], t["outcome"]))
    return {r: sorted(v) for r, v in sorted(out.items())}


def test_oort_over_grpc_learns_from_measured_round_trips_to_choose_the_fast_clients(tmp_path, monkeypatch):
    store, run_id, cfg = run(tmp_path, 4, {2: 0.1, 3: 0.1},
                             ['server.selection="oort"', "server.clients_per_round=2"], rounds=7)
    rounds = trained(store, run_id)
    assert len(rounds) == 7 and all(len(r) == 2 for r in rounds.values())
    assert {c for r in list(rounds.values())[:3] for c, _ in r} == {0, 1, 2, 3}  # it explores every client first
    assert all({c for c, _ in r} == {0, 1} for r in list(rounds.values())[4:]), rounds  # then keeps to the fast
    done, names, _ = store.load_checkpoint(run_id)
    assert done == 7 and any(n.startswith("selection/") for n in names)  # Oort's learnt state is checkpointed
    # and a restarted server resumes it, what it learnt of the slow clients included
    monkeypatch.chdir(tmp_path)  # where slow_model.py is
    work, _ = build_clients(cfg)
    server = SyncServer(build_strategy(cfg, 4, deployed=True), 4)
    fresh = server.init(work.initial_params(cfg.run.seed))
    resumed = _resume(store, run_id, fresh, param_names(work.model))
    assert resumed.round == 7 and fresh.selection.selections == 0 and resumed.selection.selections == 7
    durations = resumed.selection.duration
    assert min(durations[2], durations[3]) > max(durations[0], durations[1]), durations
    store.close()


def test_a_deadline_drops_the_slowed_client_records_its_late_reply_and_partial_work_brings_it_back(tmp_path):
    # 10 local steps (2 epochs of 5 batches); the slowed client's take 0.4 s more each (at least 4 s), the others'
    # well under 1 s
    store, run_id, _ = run(tmp_path, 3, {1: 0.4}, ["hetero.deadline_s=2.0", 'hetero.stragglers="partial"'], rounds=4)
    rounds = trained(store, run_id)
    # round 1: it is asked for its full work, which it cannot finish in time; not kept, its reply comes late
    assert rounds[1] == [(0, "ok"), (1, "not_kept"), (2, "ok")], rounds
    tasks = store.tasks(run_id)
    late = [t for t in tasks if t["outcome"] == "late"]
    assert [(t["client_id"], t["round"]) for t in late] == [(1, 1)] and late[0]["work_s"] > 4.0
    # round 2 waits for it to finish that task, then asks it for the steps that fit at its measured speed: kept
    assert all(r == [(0, "ok"), (1, "ok"), (2, "ok")] for r in list(rounds.values())[1:]), rounds
    partial = [t["examples"] for t in tasks if t["client_id"] == 1 and t["round"] > 1 and t["kind"] == "TrainRequest"]
    full = [t["examples"] for t in tasks if t["client_id"] == 0 and t["kind"] == "TrainRequest"]
    assert max(partial) < min(full) / 2, (partial, full)
    history = store.history(run_id)
    assert history[0]["metrics"]["rejected.not_kept"] == 1 and [h["metrics"]["accepted"] for h in history] == [
        2, 3, 3, 3]
    store.close()
