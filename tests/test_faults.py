"""Faults a long search meets, each in a real `hybridnas` process: SIGTERM and SIGINT, a kill -9
before the trials began, two searches creating one SQLite store at once, an `mlflow server` that
goes away mid-search and comes back, another calibration between a kill and a resume.

Trials sleep two seconds (``HYBRIDNAS_FAULTS=*:sleep2``) so that a signal sent after the first
finished trial lands while others run, whatever the machine's speed.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from tiny_search import tiny_search_file

from hybridnas.runners.store import child_runs, make_client

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BASE = {
    "input": {"channels": 1, "size": 8, "classes": 4},
    "stem": {"channels": 8},
    "stages": [
        {"mixer": "conv", "depth": 1, "channels": 8},
        {"mixer": "conv", "depth": 1, "channels": 8, "downsample": "conv"},
    ],
}
DATA = {"dataset": "synthetic", "size": 8, "channels": 1, "classes": 4, "samples": 128, "seed": 0}


def _search_file(tmp: Path, name: str, trials: int = 6) -> Path:
    search = {"sampler": "random", "trials": trials, "concurrency": 2, "seed": 0}
    return tiny_search_file(tmp, name, search=search, epochs=1, samples=128)


def _ablation_file(tmp: Path, name: str) -> Path:
    d = {
        "name": name,
        "base": BASE,
        "data": DATA,
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.003},
        "vary": {"stages.1.mixer": ["conv", "window"]},
        "seeds": [0, 1, 2],
        "concurrency": 2,
        "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "experiment": name},
        "out_dir": str(tmp / "out" / name),
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


CACHE: dict[str, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def _module_cache(tmp_path_factory):
    """One latency cache for the module's drivers (the space is calibrated once); the test that
    kills a driver during its calibration uses a fresh one of its own."""
    CACHE["dir"] = tmp_path_factory.mktemp("cache")
    yield


def _shared_table() -> Path:
    return CACHE["dir"] / "latency.json"


def _env(tmp: Path, **extra: str) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HYBRIDNAS_CACHE_DIR": str(CACHE["dir"]),
        "HYBRIDNAS_FAULTS": "*:sleep2",
        "RAY_ADDRESS": "local",  # a Ray of its own, whatever else runs on this machine
        **extra,
    }


def _start(argv: list[str], tmp: Path, **env: str) -> subprocess.Popen:
    if argv[0] == "hybridnas":
        argv = argv[1:]
    return subprocess.Popen(
        [sys.executable, "-m", "hybridnas.runners.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp,
        env=_env(tmp, **env),
    )


def _runs(tmp: Path, experiment: str, uri: str | None = None) -> tuple[list, list]:
    """(parents, children) of ``experiment`` in tmp's store (or ``uri``), ([], []) before it exists."""
    if uri is None and not (tmp / "mlflow.db").exists():
        return [], []
    # Under the store's lock: the driver may be creating the SQLite file right now.
    client = make_client(uri or f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return [], []
    parents = client.search_runs([exp.experiment_id], "tags.`hybridnas.kind` != 'trial'")
    kids = [k for p in parents for k in child_runs(client, exp.experiment_id, p.info.run_id)]
    return parents, kids


def _finished(kids: list) -> int:
    return sum(k.data.tags.get("hybridnas.status") in ("ok", "failed", "infeasible") for k in kids)


def _signal_after(proc: subprocess.Popen, tmp: Path, experiment: str, n: int, sig: int) -> tuple[int, str]:
    """Send ``sig`` once ``n`` trials are finished in MLflow; return (exit code, stdout + stderr)."""
    deadline = time.monotonic() + 400
    while _finished(_runs(tmp, experiment)[1]) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{n} trials did not finish in time"
        time.sleep(0.3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out + err


def _resume_line(output: str) -> list[str]:
    lines = [ln for ln in output.splitlines() if "continue with: " in ln]
    assert len(lines) == 1, output[-3000:]
    return shlex.split(lines[0].split("continue with: ", 1)[1])


def _nothing_running(tmp: Path, experiment: str) -> None:
    parents, kids = _runs(tmp, experiment)
    assert [p.info.status for p in parents] == ["KILLED"]
    assert all(k.info.status != "RUNNING" for k in kids)
    assert all(k.info.status == "KILLED" for k in kids if k.data.tags["hybridnas.status"] == "killed")


@pytest.mark.parametrize("command", ["search", "ablate"])
def test_sigterm_then_sigint_stop_cleanly_and_the_printed_command_resumes(tmp_path, command):
    name = f"sig{command}"
    path = _search_file(tmp_path, name) if command == "search" else _ablation_file(tmp_path, name)
    total = 6
    out = tmp_path / "elsewhere"
    argv = ["hybridnas", command, path.name, "--out", str(out)]
    rc, output = _signal_after(_start(argv, tmp_path), tmp_path, name, 1, signal.SIGTERM)
    assert rc == 143, output[-3000:]
    resume = _resume_line(output)
    assert resume == [*argv, "--resume"]
    _nothing_running(tmp_path, name)
    assert "Traceback" not in output
    if command == "ablate":
        assert not (out / "ablation.md").exists()  # no table that looks complete
    done = _finished(_runs(tmp_path, name)[1])
    assert done < total

    rc, output = _signal_after(_start(resume, tmp_path), tmp_path, name, done + 1, signal.SIGINT)
    assert rc == 130, output[-3000:]
    assert _resume_line(output) == resume
    _nothing_running(tmp_path, name)
    if command == "search":
        _another_calibration_moves_the_shared_table(path, tmp_path)

    started = time.time() * 1000
    proc = _start(resume, tmp_path)
    output = "".join(proc.communicate(timeout=400))
    assert proc.returncode == 0, output[-3000:]
    parents, kids = _runs(tmp_path, name)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert _finished(kids) == len(kids) == total  # cut-short runs were deleted, each trial ran once
    assert all(k.info.status in ("FINISHED", "FAILED") for k in kids)
    # The resume kept the concurrency: two of its trials (3 s each at least) ran at the same time.
    spans = sorted((k.info.start_time, k.info.end_time) for k in kids if k.info.start_time >= started)
    assert len(spans) >= 2 and any(b[0] < a[1] for a, b in zip(spans, spans[1:])), spans
    if command == "ablate":
        assert (out / "ablation.md").exists()
    else:  # every trial, before and after the resumes, predicted from the table the search started with
        assert "predictions from this search's own table" in output and "has changed" in output
        _predicted_from_the_snapshot(path, tmp_path, out / "latency_table.json", kids)


def _another_calibration_moves_the_shared_table(path: Path, tmp: Path) -> None:
    """What calibrating another space on this machine may do to the shared table: refit the entries
    this search uses (here: every unit entry of its context three times slower)."""
    from hybridnas.runners.latency import LatencyContext
    from hybridnas.runners.latency_table import ARCH, LatencyTable
    from hybridnas.search_space.experiment import Experiment

    prefix = LatencyContext.from_config(Experiment.from_yaml(path).latency).key() + "||"
    shared = LatencyTable(_shared_table())
    for key, entry in shared.items():
        if key.startswith(prefix) and ARCH not in key and "space|" not in key:
            shared.put(key, {**entry, "ms": entry["ms"] * 3})
    shared.save()


def _predicted_from_the_snapshot(path: Path, tmp: Path, snapshot: Path, kids: list) -> None:
    from hybridnas.runners.latency import LatencyContext
    from hybridnas.runners.latency_table import LatencyTable, predict_latency
    from hybridnas.search_space.experiment import Experiment
    from hybridnas.search_space.spec import ArchSpec

    ctx = LatencyContext.from_config(Experiment.from_yaml(path).latency)
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    kept, moved = LatencyTable(snapshot), LatencyTable(_shared_table())
    for k in kids:
        spec = ArchSpec.from_yaml(client.download_artifacts(k.info.run_id, "arch.yaml", str(tmp)))
        assert k.data.metrics["latency_ms"] == pytest.approx(predict_latency(spec, kept, ctx), rel=1e-9)
        assert k.data.metrics["latency_ms"] < 0.9 * predict_latency(spec, moved, ctx)


def test_a_search_killed_before_its_trials_began_is_continued_by_a_rerun(tmp_path):
    # A fresh latency cache: the driver is killed while it calibrates, before Tune has a state.
    name = "early"
    path = _search_file(tmp_path, name, trials=2)
    fresh = {"HYBRIDNAS_FAULTS": "", "HYBRIDNAS_CACHE_DIR": str(tmp_path / "cache")}
    proc = _start(["search", path.name], tmp_path, **fresh)
    state = tmp_path / "out" / name / "state.json"
    deadline = time.monotonic() + 300
    while not state.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    parents, _ = _runs(tmp_path, name)
    assert [p.info.status for p in parents] == ["RUNNING"]  # what kill -9 leaves
    assert not (tmp_path / "out" / name / "tune").exists()

    proc = _start(["search", path.name, "--resume"], tmp_path, **fresh)
    output = "".join(proc.communicate(timeout=400))
    assert proc.returncode == 0, output[-3000:]
    again, kids = _runs(tmp_path, name)
    assert [p.info.run_id for p in again] == [p.info.run_id for p in parents]  # the same parent, one
    assert again[0].info.status == "FINISHED" and _finished(kids) == 2


_CREATE = """
import sys
from hybridnas.runners.store import experiment_id, make_client
print(experiment_id(make_client(sys.argv[1]), "raced"))
"""


def test_two_processes_creating_a_new_sqlite_store_at_once_both_succeed(tmp_path):
    for i in range(2):
        uri = f"sqlite:///{tmp_path}/new{i}.db"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _CREATE, uri],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
            for _ in range(2)
        ]
        results = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
        assert results[0][0] == results[1][0]  # one experiment, found by both


def test_a_tracking_server_that_goes_away_mid_search_and_comes_back_loses_nothing(
    tmp_path, mlflow_server_process
):
    server = mlflow_server_process
    name = "away"
    total = 6
    path = _search_file(tmp_path, name, trials=total)
    out_dir = tmp_path / "out" / name
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hybridnas.runners.cli", "search", path.name,
         "--tracking-uri", server.url, "--store-timeout", "600"],
        stdout=log, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=_env(tmp_path),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 400
        while _finished(_runs(tmp_path, name, server.url)[1]) < 1:
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(0.5)
        server.stop(signal.SIGKILL)  # the store goes away, as a crashed server does
        buffer = out_dir / "mlflow_buffer.jsonl"
        # Training goes on: a trial finishes while the store is away, and its writes wait on disk.
        while not (buffer.exists() and '"set_terminated"' in buffer.read_text()):
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no write was buffered while the store was away"
            time.sleep(0.5)
        server.start()  # the same port and store
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    output = (tmp_path / "driver.log").read_text()
    assert proc.returncode == 0, output[-3000:]
    assert "is unreachable" in output and "answers again" in output
    assert "Traceback" not in output
    assert not buffer.exists()  # everything delivered
    parents, kids = _runs(tmp_path, name, server.url)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert _finished(kids) == len(kids) == total
    client = MlflowClient(server.url)
    for k in kids:  # every trial's record is whole: its status, its metrics, its architecture file
        assert k.info.status in ("FINISHED", "FAILED")
        if k.data.tags["hybridnas.status"] == "ok":
            assert {"val_acc", "macs", "latency_ms"} <= set(k.data.metrics)
        assert "arch.yaml" in {a.path for a in client.list_artifacts(k.info.run_id)}
