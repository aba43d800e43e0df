import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

# Two cores on CI: keep each test process to one intra-op thread so that tests are deterministic
# and Ray trials started by tests do not oversubscribe the machine.
torch.set_num_threads(1)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def pytest_sessionstart(session):
    """The machine line first (CPU model, native bf16 or not, torch's CPU capability), also under
    ``-q``: a red run says which kind of machine it ran on. Once, from the controller under xdist."""
    if hasattr(session.config, "workerinput"):
        return
    from hybridnas.runners.machine import machine_line

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(machine_line())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def latency_cache(tmp_path_factory):
    """A private latency-table cache, shared by the modules a test process runs: the search tests'
    spaces are calibrated once, not once per module."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def ray_local(latency_cache):
    """One local Ray per test module (started like a search starts it), and a private
    latency-table cache."""
    from hybridnas.runners.ray_runtime import init_ray

    os.environ["HYBRIDNAS_CACHE_DIR"] = str(latency_cache)
    import ray

    if not ray.is_initialized():
        init_ray()
    yield ray
    ray.shutdown()


TINY_ARCH = """
input: {channels: 1, size: 8, classes: 3}
stem: {channels: 4}
stages:
  - {mixer: conv, depth: 1, channels: 4}
  - {mixer: shifted_window, depth: 2, channels: 8, downsample: conv, addon: gc, options: {heads: 2, window: 2}}
"""


@pytest.fixture
def tiny_spec():
    """A two-stage architecture on 8x8 inputs: every kind of latency unit, fast to time."""
    from hybridnas.search_space.spec import ArchSpec

    return ArchSpec.from_yaml(TINY_ARCH)


@pytest.fixture
def killed_search():
    """`search_killed_after`: a search whose driver is killed part-way (the resume tests)."""
    return search_killed_after


def search_killed_after(ray, exp, cwd, n: int, statuses=("ok",), timeout: float = 300) -> dict:
    """Run ``hybridnas search`` on ``exp`` in a second driver that joins this module's Ray (so only
    the driver dies), and kill it with SIGKILL, no chance to save anything, once ``n`` of its trials
    have one of ``statuses`` in MLflow. Returns ``{run_id: (arch_hash, status)}`` of those trials."""
    from mlflow import MlflowClient

    from hybridnas.runners.store import child_runs

    client = MlflowClient(exp.tracking.uri)
    client.search_experiments()  # create the store now: two processes migrating a new SQLite file race
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from hybridnas.runners.cli import main; sys.exit(main(sys.argv[1:]))",
         "search", exp.path, "--address", address],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    before: dict = {}
    while len(before) < n:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, f"the first driver did not finish {n} trials in time"
        time.sleep(0.2)
        found = client.get_experiment_by_name(exp.tracking.experiment)
        parents = found and client.search_runs([found.experiment_id], "tags.`hybridnas.kind` = 'search'")
        if parents:
            before = {
                r.info.run_id: (r.data.tags["hybridnas.arch_hash"], r.data.tags["hybridnas.status"])
                for r in child_runs(client, found.experiment_id, parents[0].info.run_id)
                if r.data.tags["hybridnas.status"] in statuses
            }
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return before


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on a loopback port, SQLite store and artifacts in ``root``; stopped and
    started again on the same port and store (the fault tests take it away mid-search).

    Its own process group (the server forks uvicorn), killed as a whole; no job runner (MLflow 3's
    background jobs are not needed and would add processes and SQLite writers).
    """

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root, self.port = Path(root), port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> str:
        mlflow_bin = Path(sys.executable).parent / "mlflow"
        log = open(self.root / "server.log", "ab")  # a file, not a pipe: the forked children inherit it
        self.proc = subprocess.Popen(
            [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{self.root}/server.db",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout  # minutes on a loaded 2-core machine
        while True:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=5).close()
                return self.url
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(
                        f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}"
                    )
                time.sleep(0.5)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)  # the group this started: server and uvicorn
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@pytest.fixture
def mlflow_server_process(tmp_path):
    """A started `MlflowServer` in tmp_path, stopped at the end."""
    server = MlflowServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_server(mlflow_server_process):
    """The URL of a started `mlflow server` on loopback (`MlflowServer`)."""
    return mlflow_server_process.url
