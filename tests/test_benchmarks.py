"""fedloom does exactly the work of the plain PyTorch loop the benchmarks compare it with."""

from dataclasses import replace

import numpy as np
import pytest

from benchmarks.workloads import WORKLOADS, load, plain_fedavg
from fedloom.simulation.runner import simulate


@pytest.mark.parametrize("name", ["wa", "wb"])
def test_fedloom_matches_the_plain_loop(name):
    wl = WORKLOADS[name]
    cfg = wl.config
    cfg = replace(cfg, run=replace(cfg.run, rounds=2), server=replace(cfg.server, clients_per_round=5))
    plain = plain_fedavg(cfg, load(wl))
    fed = simulate(cfg, progress=False, write=False)
    assert fed.final_accuracy == pytest.approx(plain.accuracy, abs=1e-3)
    assert sum(r["examples"] for r in fed.history) == plain.examples
    assert np.isfinite(fed.params[0]).all()
