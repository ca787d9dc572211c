"""The dashboard in a real browser (Debian's headless Chromium, driven by Selenium) against a real deployment:
`fedloom server` and three `fedloom client` processes over mutual TLS, the server killed and restarted mid-run.

The screenshot is kept as ``test-output/dashboard.png`` under the repository (and in the test's tmp_path).
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.attacks import free_port
from fedloom.config import load_config
from fedloom.deploy.certs import make_dev_pki
from fedloom.simulation.runner import simulate

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    if os.environ.get("CI"):  # .ci/run installs both: a CI without them must not pass by skipping
        pytest.fail("the dashboard's browser test needs Debian's chromium and chromium-driver", pytrace=False)
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402

OUTPUT = Path(__file__).resolve().parents[2] / "test-output"
ROUNDS = 40
PHONES = ["run.name=\"phones\"", "run.rounds=5", "data.dataset=\"synthetic\"", "data.num_clients=20",
          "model.name=\"logreg\"", "server.clients_per_round=5", "hetero.population=\"mobile\""]
CONFIG = """
[run]
name = "hospitals"
rounds = {rounds}
seed = 0

[data]
dataset = "breast_cancer"
partition = "iid"
num_clients = 3

[model]
name = "mlp"
hidden = [16]

[client]
lr = 0.1
local_epochs = 2

[server]
clients_per_round = 3
optimizer = "adam"
lr = 0.01

[eval]
every = 1
federated_clients = 3

[engine]
executor = "sequential"

[deploy]
address = "127.0.0.1:{port}"
state_dir = "{state}"
clients = ["st-mary", "general", "university"]
min_clients = 3
heartbeat_s = 1.0
round_timeout_s = 60.0
mutual_tls = true
ca = "{pki}/ca.pem"
cert = "{pki}/server.pem"
key = "{pki}/server.key"
"""


LOOK = """const c = document.querySelector('article.card'); if (!c) return null;
const d = document.getElementById('chart-accuracy').data || [];
return {round: +c.dataset.round, status: c.dataset.status, text: c.innerText,
        points: d.reduce((n, t) => n + t.x.length, 0),
        connected: [...c.querySelectorAll('tr.client.connected')].map(r => r.dataset.client)}"""


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedloom.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


def dashboard(*args: str) -> tuple[subprocess.Popen, str]:
    proc = start("dashboard", "--port", "0", "--refresh", "0.5", *args)
    found = re.search(r"http://127\.0\.0\.1:\d+/", proc.stdout.readline())
    assert found, "the dashboard did not say where it listens"
    return proc, found.group(0)


def until(check, what: str, timeout: float = 120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"the page never showed {what}")


@pytest.fixture
def browser():
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1700"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_follows_a_deployed_run_through_a_server_restart(tmp_path, browser):
    pki, state = tmp_path / "pki", tmp_path / "state"
    make_dev_pki(pki, clients=["st-mary", "general", "university"])
    config = tmp_path / "hospitals.toml"
    config.write_text(CONFIG.format(rounds=ROUNDS, port=free_port(), state=state, pki=pki))
    phones = simulate(load_config(None, PHONES + [f'run.out_dir="{tmp_path / "runs"}"']), progress=False).run_dir
    server = start("server", "--config", str(config))
    procs = [server]
    try:
        until(lambda: (state / "tokens" / "university.token").exists(), "the server's tokens", 60)
        view, url = dashboard(str(state), str(phones))  # the deployment and a simulation, side by side
        procs.append(view)
        for name in ("st-mary", "general", "university"):
            procs.append(start("client", "--config", str(config), "--set", f'deploy.name="{name}"',
                               "--set", f'deploy.token_file="{state / "tokens" / f"{name}.token"}"',
                               "--set", f'deploy.cert="{pki / "clients" / f"{name}.pem"}"',
                               "--set", f'deploy.key="{pki / "clients" / f"{name}.key"}"'))
        browser.get(url)
        browser.execute_script("window.sameLoad = true")  # gone if the page were ever reloaded

        def page() -> dict:
            """What the page shows now, read in one go (it redraws its cards at every look)."""
            return browser.execute_script(LOOK) or {"round": 0, "status": "", "connected": [], "points": 0, "text": ""}

        until(lambda: page()["round"] >= 2, "round 2")
        connected = until(lambda: len(page()["connected"]) == 3 and page()["connected"], "three connected clients")
        assert set(connected) == {"st-mary", "general", "university"}
        before = page()
        assert before["points"] >= 2 and before["status"] == "running"

        os.kill(server.pid, signal.SIGKILL)  # the server dies mid-run; the page is left open
        server.wait()
        until(lambda: page()["status"] == "stopped", "the run stopped", 30)
        stopped = page()
        assert not stopped["connected"] and stopped["round"] < ROUNDS

        server = start("server", "--config", str(config))  # resumes; the clients find it again by themselves
        procs.append(server)
        bystander, _ = dashboard(str(state))  # a second dashboard, killed mid-run: the run never notices
        procs.append(bystander)
        until(lambda: page()["status"] == "running" and page()["round"] > stopped["round"],
              "the run going on after the restart", 120)
        bystander.kill()
        until(lambda: page()["status"] == "finished", "the run finished", 180)
        end = page()
        assert end["round"] == ROUNDS and end["points"] > before["points"]
        assert browser.execute_script("return window.sameLoad")
        assert server.wait(timeout=60) == 0
        assert f"rounds: {ROUNDS} of {ROUNDS}" in end["text"] and "refused updates by reason" in end["text"]

        both = browser.execute_script(
            "const clock = document.getElementById('chart-clock');"
            "return {cards: [...document.querySelectorAll('article.card')].map(c => c.dataset.status),"
            " traces: document.getElementById('chart-accuracy').data.map(t => t.name),"
            " clock: clock.hidden ? 0 : clock.data.length}")
        assert both["cards"] == ["finished", "finished"] and both["clock"] >= 1  # the simulation's clock, charted
        assert {"hospitals: federated accuracy", "phones: central accuracy"} <= set(both["traces"])

        # read-only from the page itself: nothing to submit, and the server refuses anything but GET
        assert browser.execute_script(  # (Plotly's own zoom and pan buttons aside)
            "return [...document.querySelectorAll('form, button, input:not([type=checkbox]), textarea, select')]"
            ".filter(e => !e.closest('.js-plotly-plot')).length") == 0
        assert browser.execute_async_script(
            "const done = arguments[0]; fetch('/api/state', {method: 'POST', body: '{}'}).then(r => done(r.status))"
        ) == 405

        OUTPUT.mkdir(exist_ok=True)
        browser.save_screenshot(str(tmp_path / "dashboard.png"))
        shutil.copy(tmp_path / "dashboard.png", OUTPUT / "dashboard.png")
        assert (OUTPUT / "dashboard.png").stat().st_size > 20_000
        for p in procs[2:5]:  # the clients: told the run is over, they end cleanly
            assert p.wait(timeout=60) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
