"""10,000 virtual clients, 1,000 per round, stay within 2 GB of resident memory."""

import json
import subprocess
import sys

SCRIPT = """
import json, resource
from fedloom.config import load_config
from fedloom.simulation.runner import simulate
cfg = load_config(None, ['data.dataset="synthetic"', 'data.num_clients=10000', 'model.name="logreg"',
                         'client.lr=0.01', 'server.clients_per_round=1000', 'run.rounds=3', 'eval.every=1',
                         'engine.executor="vectorized"'])
r = simulate(cfg, progress=False, write=False)
print(json.dumps({"accepted": [h["accepted"] for h in r.history], "acc": [h["test_accuracy"] for h in r.history],
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def test_ten_thousand_clients_in_two_gigabytes():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["accepted"] == [1000, 1000, 1000]
    assert out["acc"][-1] > out["acc"][0]
    assert out["peak_mb"] < 2048, out
