"""`hybridnas search` end to end: Ray Tune + Optuna + MLflow on tiny synthetic data (8x8, 1-2 epochs).

One local Ray (2 CPUs) is shared by the whole module; the cluster test, last, replaces it with a
simulated two-node cluster. Everything is read back through `MlflowClient`, the way a user (or
`hybridnas export`) sees it.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from tiny_search import tiny_search_file

from hybridnas.runners import cli
from hybridnas.runners.front_report import front_text
from hybridnas.runners.pareto import non_dominated
from hybridnas.runners.search import SearchError, run_search
from hybridnas.runners.store import child_runs
from hybridnas.search_space.experiment import Experiment
from hybridnas.search_space.spec import ArchSpec

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _experiment(tmp: Path, name: str, search: dict, **over) -> Experiment:
    """A tiny experiment: 8x8 synthetic images, conv/window stages a few thousand MACs wide."""
    return Experiment.from_yaml(tiny_search_file(tmp, name, search=search, **over))


def _children(client: MlflowClient, exp_name: str, parent: str) -> list:
    exp = client.get_experiment_by_name(exp_name)
    return child_runs(client, exp.experiment_id, parent)


def _status(run) -> str:
    return run.data.tags["hybridnas.status"]


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grid_search(ray_local, tmp_path_factory):
    """A grid search over every architecture of a small space, some of them over the MACs budget."""
    from hybridnas.runners.macs import profile_spec

    tmp = tmp_path_factory.mktemp("grid")
    space = {
        "stem": {"channels": 8},
        "stages": [
            {"mixer": "conv", "depth": 1, "channels": 8},
            {"mixer": ["conv", "window"], "depth": 1, "channels": [8, 16], "downsample": "conv"},
        ],
        "mixer_options": {"window": {"window": [2, 4], "heads": [2]}},
    }
    search = {"sampler": "grid", "trials": 6, "concurrency": 2, "seed": 0}
    probe = _experiment(tmp, "grid", search, space=space)
    macs = [profile_spec(s)["macs"] for s in probe.space.enumerate(probe.input)]
    budget = (min(macs) + max(macs)) / 2
    exp = _experiment(tmp, "grid", search, space=space, constraints={"macs": {"max": float(budget)}})
    res = run_search(exp, progress=False)
    return exp, res, MlflowClient(res.tracking_uri), budget


def test_grid_search_runs_every_architecture_once_and_skips_infeasible_ones(grid_search):
    exp, res, client, budget = grid_search
    n = exp.space.size(exp.input)
    children = _children(client, exp.tracking.experiment, res.parent_run_id)
    assert len(children) == n == sum(res.counts.values())
    assert len({c.data.tags["hybridnas.arch_hash"] for c in children}) == n
    infeasible = [c for c in children if _status(c) == "infeasible"]
    ok = [c for c in children if _status(c) == "ok"]
    assert infeasible and ok and len(infeasible) + len(ok) == n
    for c in infeasible:  # never trained: no training metrics at all, the excess recorded
        assert c.data.metrics["macs"] > budget
        assert not {"val_acc", "train_loss", "train_time_s", "imgs_per_s"} & set(c.data.metrics)
        assert "macs" in c.data.tags["hybridnas.violations"]
        assert c.info.status == "KILLED" and c.info.run_name.endswith(" [infeasible]")
        assert not c.inputs.dataset_inputs  # it never saw the data
    for c in ok:
        assert c.data.metrics["macs"] <= budget
    # Every trial found its process with the imports done (Ray's preloaded workers), and the two
    # slots kept their processes from trial to trial (reuse_actors).
    assert all(t["warm_start"] for t in res.trials)
    assert len({t["pid"] for t in res.trials}) <= exp.search.concurrency


def test_tunes_trial_actors_carry_no_runtime_env_only_on_a_ray_started_here():
    # Ray hands an actor a prestarted (preloaded) worker only if their runtime environments match;
    # Tune's class cache gives trial actors a few environment variables, which the search lifts for
    # a Ray whose workers inherit them anyway. Checked against the installed Ray's class cache.
    from ray.tune.execution.class_cache import _ActorClassCache

    from hybridnas.runners.ray_runtime import trial_actors_on_prestarted_workers

    def env(cls: type) -> dict:
        return _ActorClassCache().get(cls)._default_options.get("runtime_env") or {}

    assert env(type("Before", (), {}))["env_vars"]["PL_DISABLE_FORK"] == "1"
    with trial_actors_on_prestarted_workers(local=True):
        assert env(type("Local", (), {})) == {}
    with trial_actors_on_prestarted_workers(local=False):  # a cluster: workers do not inherit them
        assert env(type("Cluster", (), {}))["env_vars"]["PL_DISABLE_FORK"] == "1"
    assert env(type("After", (), {}))["env_vars"]["PL_DISABLE_FORK"] == "1"


_PRESTART_PROBE = """
import json, os, sys, time
from pathlib import Path

from ray import tune

from hybridnas.runners.ray_runtime import WORKER_PRELOAD, init_ray, trial_actors_on_prestarted_workers


def idle_workers():
    pids = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::IDLE"):
                pids.add(int(proc.name))
        except OSError:
            pass
    return pids


def probe(config):
    tune.report({"pid": os.getpid(), "warm": all(m in sys.modules for m in WORKER_PRELOAD)})


init_ray()
deadline = time.time() + 60
while len(idle_workers()) < 2 and time.time() < deadline:
    time.sleep(0.1)
prestarted = idle_workers()
with trial_actors_on_prestarted_workers():
    grid = tune.Tuner(
        tune.with_resources(probe, {"cpu": 1}),
        param_space={"i": tune.grid_search([0, 1])},
        tune_config=tune.TuneConfig(max_concurrent_trials=2, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=sys.argv[1], verbose=0),
    ).fit()
print(json.dumps({"prestarted": sorted(prestarted), "trials": [r.metrics for r in grid]}))
"""


@pytest.mark.skipif(
    not Path("/proc/self/cmdline").exists() or (os.cpu_count() or 1) < 2, reason="reads /proc"
)
def test_trials_run_on_the_workers_ray_prestarted_with_their_imports_done(tmp_path):
    import json

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    out = subprocess.run(
        [sys.executable, "-c", _PRESTART_PROBE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(got["prestarted"]) >= 2
    assert all(t["warm"] for t in got["trials"])
    assert {t["pid"] for t in got["trials"]} <= set(got["prestarted"])


def test_parent_and_child_runs_nest_with_params_metrics_and_artifacts(grid_search):
    exp, res, client, _ = grid_search
    parent = client.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "grid"
    assert parent.data.tags["hybridnas.kind"] == "search"
    assert yaml.safe_load(parent.data.tags["hybridnas.objectives"]) == [["val_acc", "max"], ["macs", "min"]]
    assert parent.data.params["sampler"] == "grid" and parent.data.params["seed"] == "0"
    arts = {a.path for a in client.list_artifacts(res.parent_run_id)}
    assert {"experiment.yaml", "resolved_config.json", "pareto.csv", "exported"} <= arts
    assert {"pareto_val_acc_vs_macs.png", "front.md", "fronts.html"} <= arts

    epochs = exp.train.epochs
    for c in _children(client, exp.tracking.experiment, res.parent_run_id):
        assert c.data.tags["mlflow.parentRunId"] == res.parent_run_id
        assert c.data.tags["hybridnas.kind"] == "trial"
        local = client.download_artifacts(c.info.run_id, "arch.yaml")
        spec = ArchSpec.from_yaml(Path(local))
        assert spec.arch_hash() == c.data.tags["hybridnas.arch_hash"]
        assert c.data.params == {k: str(v) for k, v in spec.flat_params().items()}
        for k in ("macs", "flops", "params", "latency_ms"):
            assert c.data.metrics[k] > 0
        assert c.data.metrics["flops"] == 2 * c.data.metrics["macs"]
        if _status(c) == "ok":
            for k in ("val_acc", "train_loss"):
                history = client.get_metric_history(c.info.run_id, k)
                assert [m.step for m in history] == list(range(1, epochs + 1))
            assert 0.0 <= c.data.metrics["val_acc"] <= 1.0
            assert c.data.metrics["train_time_s"] > 0 and c.data.metrics["imgs_per_s"] > 0


def test_child_runs_read_at_a_glance_names_tags_step0_metrics_statuses_and_data(grid_search):
    exp, res, client, _ = grid_search
    parent = client.get_run(res.parent_run_id)
    children = _children(client, exp.tracking.experiment, res.parent_run_id)
    names = [c.info.run_name for c in children]
    assert len(set(names)) == len(names)  # unique within the search
    for c in children:
        name, tags = c.info.run_name, c.data.tags
        number = int(tags["hybridnas.trial"])
        # Starts with the trial number, then what the space varies (stage 1's mixer and channels).
        assert name.startswith(f"t{number:02d} s1:{c.data.params['stages.1.mixer']}")
        assert f"c{c.data.params['stages.1.channels']}" in name and name.isascii()
        assert name.endswith(" [front]") == (tags.get("pareto") == "true")
        assert name.endswith(" [infeasible]") == (_status(c) == "infeasible")
        assert (
            tags["hybridnas.arch"].count("|") == 3 and "stem c8" in tags["hybridnas.arch"]
        )  # stem, 2 stages, norm
        for k in ("hybridnas.search_id", "hybridnas.version", "mlflow.source.name"):
            assert tags[k] == parent.data.tags[k]
        # Architecture and training metrics: one point at step 0; curves: step = epoch.
        for k in ("macs", "flops", "params", "latency_ms") + (
            ("train_time_s", "imgs_per_s") if _status(c) == "ok" else ()
        ):
            assert [m.step for m in client.get_metric_history(c.info.run_id, k)] == [0], k
        status = {"ok": "FINISHED", "infeasible": "KILLED"}[_status(c)]
        assert c.info.status == status
        if _status(c) == "ok":  # the data it trained on, as MLflow dataset inputs
            inputs = {i.tags[0].value: i.dataset for i in c.inputs.dataset_inputs}
            assert set(inputs) == {"training", "validation"}
            rows = {k: json.loads(d.profile)["num_rows"] for k, d in inputs.items()}
            assert rows == {"training": 204, "validation": 52} and inputs["training"].name == "synthetic"
            assert len({d.digest for d in inputs.values()}) == 2 and len(inputs["training"].digest) == 10
    digests = {i.dataset.digest for c in children for i in c.inputs.dataset_inputs}
    assert digests == {i.dataset.digest for i in parent.inputs.dataset_inputs}  # the same data everywhere


def test_parent_summarises_counts_front_hypervolume_and_links_to_the_runs_view(grid_search):
    exp, res, client, budget = grid_search
    parent = client.get_run(res.parent_run_id)
    m = parent.data.metrics
    assert (m["n_ok"], m["n_failed"], m["n_infeasible"]) == (res.counts["ok"], 0, res.counts["infeasible"])
    assert m["n_done"] == sum(res.counts.values()) and m["front_size"] == len(res.front)
    ok = [c for c in _children(client, exp.tracking.experiment, res.parent_run_id) if _status(c) == "ok"]
    assert m["best_val_acc"] == max(c.data.metrics["val_acc"] for c in ok)
    assert m["best_macs"] == min(c.data.metrics["macs"] for c in ok)
    # The reference box: val_acc from 0 to 1, macs from the budget to 0.
    assert 0 < m["hypervolume_norm"] <= 1 and m["hypervolume_norm"] == pytest.approx(
        m["hypervolume"] / budget
    )
    local = client.download_artifacts(res.parent_run_id, "front.md")
    table = [line for line in Path(local).read_text().splitlines() if line.startswith("| [t")]
    assert len(table) == len(res.front)
    for c in ok:  # a row per front member, named and linked like the runs table
        on_front = c.data.tags["pareto"] == "true"
        assert (
            f"[{c.info.run_name}](#/experiments/{res.experiment_id}/runs/{c.info.run_id})" in "".join(table)
        ) == on_front
    note = parent.data.tags["mlflow.note.content"]
    assert (
        note.startswith(f"hybridnas search `{exp.path}`")
        and "of its reference box" in note
        and table[0] in note
    )
    assert parent.data.tags["mlflow.source.name"] == str(Path(exp.path).resolve())
    assert parent.data.tags["hybridnas.search_id"].startswith("grid-")
    assert client.get_experiment(res.experiment_id).tags["mlflow.note.content"].startswith("Searches of")
    exp_id = client.get_experiment_by_name(exp.tracking.experiment).experiment_id
    assert res.runs_url == f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    assert res.parent_url == f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{res.parent_run_id}"


def test_pareto_tags_and_measured_latency_mark_exactly_the_front(grid_search):
    exp, res, client, _ = grid_search
    ok = [c for c in _children(client, exp.tracking.experiment, res.parent_run_id) if _status(c) == "ok"]
    points = [[c.data.metrics["val_acc"], c.data.metrics["macs"]] for c in ok]
    front = non_dominated(points, ["max", "min"])
    for c, on_front in zip(ok, front):
        assert c.data.tags["pareto"] == ("true" if on_front else "false")
        assert ("latency_ms_measured" in c.data.metrics) == bool(on_front)
    assert len(res.exported) == int(front.sum()) == len(res.front)
    for path in res.exported:  # the exported YAML rebuilds the logged model
        from hybridnas.runners.macs import profile_spec

        spec = ArchSpec.from_yaml(path)
        assert profile_spec(spec)["macs"] == spec.metrics["macs"]
        assert profile_spec(spec)["params"] == spec.metrics["params"]
        # What the user sees is the measured latency, with the prediction beside it.
        assert spec.metrics["latency_ms"] == spec.metrics["latency_ms_measured"]
        assert spec.metrics["latency_ms_predicted"] > 0
    assert (res.front["latency_ms"] == res.front["latency_ms_measured"]).all()
    header, *rows = front_text(res.front, res.objectives).splitlines()
    names = header.split()
    assert names[:5] == ["trial", "val_acc", "macs", "params", "latency_ms"] and names[5] == "predicted_ms"
    shown = {r.split()[0]: r.split()[4] for r in rows}
    assert shown == {str(r["trial"]): f"{r['latency_ms_measured']:.3f}" for r in res.front.to_dict("records")}
    csv = pd.read_csv(Path(exp.out_dir) / "pareto" / "pareto.csv", dtype={"trial": str})
    on = csv[csv["pareto"]]
    assert (on["latency_ms"] - on["latency_ms_measured"]).abs().max() < 1e-9
    # Logged after each finished trial from the first feasible one on, against a fixed reference.
    hv = sorted(client.get_metric_history(res.parent_run_id, "hypervolume"), key=lambda m: m.step)
    steps, values = [m.step for m in hv], [m.value for m in hv]
    assert steps == list(range(steps[0], sum(res.counts.values()) + 1))
    assert values == sorted(values) and values[-1] > 0


def test_exported_front_carries_the_search_recipe_and_retrains_with_it(grid_search, tmp_path, capsys):
    exp, res, _, _ = grid_search
    spec = ArchSpec.from_yaml(res.exported[0])
    prov = spec.provenance
    assert prov["data"] == {k: v for k, v in exp.data.__dict__.items() if v is not None}
    assert prov["train"]["batch_size"] == exp.train.batch_size == 32 and prov["train"]["lr"] == exp.train.lr
    assert "device" not in prov["train"] and "threads" not in prov["train"]  # the machine's, not the recipe's
    out = tmp_path / "again"
    assert cli.main(["train", str(res.exported[0]), "--epochs", "1", "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    again = ArchSpec.from_yaml(out / "arch.yaml").provenance
    assert again["train"]["batch_size"] == 32 and again["train"]["lr"] == exp.train.lr  # not the defaults
    assert again["train"]["epochs"] == 1 and again["data"]["samples"] == 256


def test_existing_output_directory_needs_resume(grid_search):
    exp, res, _, _ = grid_search
    with pytest.raises(SearchError, match="--resume"):
        run_search(exp, progress=False)


# ---------------------------------------------------------------------------------------------


def test_trials_that_raise_or_diverge_are_failed_and_the_search_goes_on(ray_local, tmp_path, monkeypatch):
    # Trial 3's worker process dies: Ray retries it (max_failures 1), it dies again, the trial errors.
    monkeypatch.setenv("HYBRIDNAS_FAULTS", "1:raise,2:diverge,3:crash")
    # Single-objective TPE: Optuna is told FAIL for the three, a value for the rest.
    exp = _experiment(
        tmp_path,
        "faults",
        {"sampler": "tpe", "trials": 5, "concurrency": 2, "seed": 1, "max_failures": 1},
        objectives=[{"metric": "val_acc", "mode": "max"}],
    )
    res = run_search(exp, progress=False)
    assert res.counts == {"ok": 2, "failed": 3, "infeasible": 0} and not res.interrupted
    client = MlflowClient(res.tracking_uri)
    by_trial = {c.data.tags["hybridnas.trial"]: c for c in _children(client, "faults", res.parent_run_id)}
    raised, diverged = by_trial["1"], by_trial["2"]
    for run in (raised, diverged):
        assert run.info.status == "FAILED" and _status(run) == "failed"
        assert "val_acc" not in run.data.metrics  # no made-up accuracy
    assert "RuntimeError: fault injected" in raised.data.tags["hybridnas.error"]
    assert "TrainingDiverged" in diverged.data.tags["hybridnas.error"]
    assert "error.txt" in {a.path for a in client.list_artifacts(raised.info.run_id)}
    crashed = by_trial["3"]
    assert crashed.info.status == "FAILED" and "died" in crashed.data.tags["hybridnas.error"].lower()
    assert all(_status(by_trial[t]) == "ok" for t in by_trial if t not in ("1", "2", "3"))


def test_a_search_in_which_every_trial_failed_exits_1_naming_the_most_common_error(
    ray_local, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("HYBRIDNAS_FAULTS", "0:raise,1:raise")
    exp = _experiment(tmp_path, "allfail", {"sampler": "random", "trials": 2, "concurrency": 2, "seed": 2})
    assert cli.main(["search", exp.path]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(
        "hybridnas: error: no trial trained: 2 of 2 failed; the most common error (2 of 2): "
        "RuntimeError: fault injected by HYBRIDNAS_FAULTS into trial"
    )
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = client.search_runs(
        [client.get_experiment_by_name("allfail").experiment_id], "tags.`hybridnas.kind` = 'search'"
    )[0]
    assert parent.info.status == "FAILED" and parent.data.tags["hybridnas.error"].startswith(
        "no trial trained"
    )
    assert not (Path(exp.out_dir) / "exported").exists()  # no front, nothing exported


def test_unreachable_tracking_server_fails_fast_with_exit_2(tmp_path, capsys):
    exp = _experiment(tmp_path, "dead", {"sampler": "random", "trials": 2})
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = cli.main(["search", exp.path, "--tracking-uri", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "cannot reach the MLflow tracking server" in err and len(err.strip().splitlines()) == 1
    assert not (Path(exp.out_dir) / "state.json").exists()  # nothing started


def test_a_cluster_that_cannot_be_joined_fails_with_exit_2_before_mlflow_has_a_run(tmp_path):
    # A fresh process: this module's Ray is already up, and a search in a process with Ray running
    # does not join anything. Port 1 on loopback: nothing listens (and without ray[client], Ray says so).
    exp = _experiment(tmp_path, "nocluster", {"sampler": "random", "trials": 2})
    proc = subprocess.run(
        [sys.executable, "-m", "hybridnas.runners.cli", "search", exp.path, "--address", "ray://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hybridnas: error: cannot join the Ray cluster at 'ray://127.0.0.1:1'")
    assert not (tmp_path / "mlflow.db").exists() or not MlflowClient(
        f"sqlite:///{tmp_path}/mlflow.db"
    ).search_runs(
        [e.experiment_id for e in MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_experiments()]
    )
    assert not (Path(exp.out_dir) / "state.json").exists()


def test_search_logs_to_a_real_mlflow_server(ray_local, tmp_path, mlflow_server, capsys):
    import re

    exp = _experiment(tmp_path, "served", {"sampler": "random", "trials": 3, "concurrency": 2, "seed": 2})
    res = run_search(exp, tracking_uri=mlflow_server, progress=False)
    assert res.tracking_uri == mlflow_server and res.ui_command.startswith("open http://127.0.0.1")
    # The printed URLs open this server's UI on this experiment's runs and on the search run.
    capsys.readouterr()  # what MLflow's client printed itself ("View run ... at: ...")
    cli._browse(res, "search run")
    printed = re.findall(r"(http://\S+)", capsys.readouterr().out)
    assert printed[-2:] == [res.runs_url, res.parent_url]  # after the `open <server>` line
    base, route = res.runs_url.split("/#", 1)
    assert base == mlflow_server and route.endswith("/runs?workflowType=machine_learning")
    with urllib.request.urlopen(
        base + "/", timeout=30
    ) as page:  # the UI's single page (its router reads the #)
        assert page.status == 200 and "<title>MLflow</title>" in page.read().decode()
    exp_id = re.fullmatch(r"/experiments/(\w+)/runs\?workflowType=machine_learning", route).group(1)
    api = f"{base}/api/2.0/mlflow"
    with urllib.request.urlopen(f"{api}/experiments/get?experiment_id={exp_id}", timeout=30) as r:
        assert json.load(r)["experiment"]["name"] == "served"
    run_id = res.parent_url.rsplit("/", 1)[1]
    with urllib.request.urlopen(f"{api}/runs/get?run_id={run_id}", timeout=30) as r:
        info = json.load(r)["run"]["info"]
    assert info["experiment_id"] == exp_id and info["run_id"] == res.parent_run_id
    client = MlflowClient(mlflow_server)
    children = _children(client, "served", res.parent_run_id)
    assert len(children) == 3 and all(_status(c) == "ok" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {res.parent_run_id}
    assert all("arch.yaml" in {a.path for a in client.list_artifacts(c.info.run_id)} for c in children)
    assert any(c.data.tags.get("pareto") == "true" for c in children)
    assert "pareto.csv" in {a.path for a in client.list_artifacts(res.parent_run_id)}


# ---------------------------------------------------------------------------------------------


def test_resume_after_a_killed_driver_keeps_finished_trials_and_the_count(ray_local, tmp_path, killed_search):
    exp = _experiment(
        tmp_path,
        "resumed",
        {"sampler": "nsga2", "trials": 6, "concurrency": 2, "seed": 3},
        train={"epochs": 3, "batch_size": 16, "lr": 0.003},
    )
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    before = killed_search(ray_local, exp, tmp_path, 2)  # SIGKILL once two trials are in MLflow
    assert len(before) < 6

    res = run_search(exp, resume=True, progress=False)
    assert not res.interrupted
    children = _children(client, "resumed", res.parent_run_id)
    finished = [c for c in children if _status(c) in ("ok", "failed", "infeasible")]
    assert len(finished) == len(children) == 6  # the number asked for, no half-finished leftovers
    hashes = [c.data.tags["hybridnas.arch_hash"] for c in finished]
    assert len(set(hashes)) == 6  # no architecture trained twice
    assert set(before) <= {c.info.run_id for c in finished}  # finished trials kept their runs
    assert client.get_run(res.parent_run_id).info.status == "FINISHED"
    state = yaml.safe_load((Path(exp.out_dir) / "state.json").read_text())
    assert state["parent_run_id"] == res.parent_run_id and state["finished"] is True


@pytest.mark.parametrize("name", ["tpe", "nsga2", "nsga3", "random"])
def test_every_sampler_pickles_as_the_tuner_needs_and_samples_on_after_unpickling(name):
    # Ray Tune pickles the searcher with its sampler when the Tuner is built; Optuna 5.1's NSGA-II/III
    # samplers hold a threading.Lock, which failed every nsga2/nsga3 search (the quickstart's too).
    import optuna

    from hybridnas.runners.searcher import make_sampler

    sampler = pickle.loads(pickle.dumps(make_sampler(name, seed=0, trials=12)))
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)), n_trials=10)
    assert len(study.trials) == 10  # population 4: two generations bred after the random one
    pickle.dumps(sampler)  # and it still pickles with its generation cache filled


def test_a_local_search_starts_its_own_ray_even_when_another_cluster_is_advertised():
    # Another process's cluster (ray.cluster_utils, `ray start`) is advertised in RAY_ADDRESS or
    # /tmp/ray/ray_current_cluster; a plain ray.init() joined it and then refused num_cpus.
    code = "import ray; from hybridnas.runners.ray_runtime import init_ray; assert init_ray(); print(ray.cluster_resources()['CPU'])"
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) == os.cpu_count()


def test_resume_without_state_is_refused(tmp_path):
    exp = _experiment(tmp_path, "nothing", {"sampler": "random", "trials": 2})
    with pytest.raises(SearchError, match="nothing to resume"):
        run_search(exp, resume=True, progress=False)


# ---------------------------------------------------------------------------------------------


def test_bench_search_splits_wall_time_into_training_and_overhead(ray_local, tmp_path, capsys, monkeypatch):
    import argparse
    import re

    from hybridnas.runners.bench import search as bench
    from hybridnas.runners.machine import machine_line

    monkeypatch.chdir(tmp_path)
    search = {"sampler": "random", "trials": 3, "concurrency": 2, "seed": 0}
    path = tmp_path / "bench.yaml"
    _experiment(tmp_path, "bench", search)  # writes bench.yaml
    assert bench.main(argparse.Namespace(experiment=str(path), trials=3, epochs=1, quick=False)) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == machine_line()  # which machine, before anything is measured
    wall = float(re.search(r"^  wall\s+([\d.]+)$", out, re.M).group(1))
    train = float(re.search(r"training time ([\d.]+) s in all", out).group(1))
    overhead = float(re.search(r"/ wall = ([\d.]+)%", out).group(1))
    assert re.search(r"trials: 3 \(3 ok\)", out)
    # wall and train are printed to 0.1 s: on a ~10 s search that rounding alone moves the share ~0.5 pp
    assert 0 < train / 2 < wall and overhead == pytest.approx(100 * (wall - train / 2) / wall, abs=1.5)
    first = float(re.search(r"first trial started ([\d.]+) s after", out).group(1))
    assert 0 < first < wall
    assert "one-time, before the clock" in out and "units measured" in out


def test_bench_search_by_default_runs_the_experiment_and_three_times_its_trials(
    ray_local, tmp_path, capsys, monkeypatch
):
    import argparse
    import re

    from hybridnas.runners.bench import search as bench

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bench2.yaml"
    _experiment(tmp_path, "bench2", {"sampler": "random", "trials": 1, "concurrency": 2, "seed": 1})
    assert bench.main(argparse.Namespace(experiment=str(path), trials=None, epochs=1, quick=False)) == 0
    out = capsys.readouterr().out
    assert [int(n) for n in re.findall(r"^bench search: bench2 on \S+, (\d+) trials", out, re.M)] == [1, 3]
    shares = [float(x) for x in re.findall(r"/ wall = ([\d.]+)%", out)]
    table = re.findall(r"^\s+(\d+)\s+(\d+)\s+[\d.]+\s+[\d.]+\s+([\d.]+)%", out, re.M)
    assert [int(t[0]) for t in table] == [1, 3] and [float(t[2]) for t in table] == shares
    fixed, per = map(
        float, re.search(r"= ([-\d.]+) s once per search \+ ([-\d.]+) s per trial", out).groups()
    )
    walls = [float(w) for w in re.findall(r"^  wall\s+([\d.]+)$", out, re.M)]
    # the fitted line goes through both searches' overhead seconds (to the printed precision)
    for n, share, wall in zip((1, 3), shares, walls):
        assert fixed + per * n == pytest.approx(share / 100 * wall, abs=0.3)


def test_trials_run_on_both_nodes_of_a_two_node_cluster(ray_local, tmp_path):
    from ray.cluster_utils import Cluster

    ray_local.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        # Two trials at once, one CPU per node: one trial runs on each node.
        exp = _experiment(
            tmp_path, "cluster", {"sampler": "random", "trials": 2, "concurrency": 2, "seed": 4}
        )
        res = run_search(exp, address=cluster.address, progress=False)
        nodes = {t["node_id"] for t in res.trials}
        assert len(nodes) == 2 and nodes == {n["NodeID"] for n in ray_local.nodes() if n["Alive"]}
        client = MlflowClient(res.tracking_uri)
        tagged = {c.data.tags["hybridnas.node_id"] for c in _children(client, "cluster", res.parent_run_id)}
        assert tagged == nodes and res.counts["ok"] == 2
    finally:
        ray_local.shutdown()
        cluster.shutdown()
