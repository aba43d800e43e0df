"""Export and pareto against a real MLflow store (sqlite + file artifacts) laid out as a search leaves it:
a parent run tagged hybridnas.kind=search and nested child runs with final metrics and arch.yaml."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from PIL import Image

from hybridnas.runners import cli
from hybridnas.runners.export import (
    COLUMNS,
    ExportError,
    export_arch,
    load_runs,
    parse_budget,
    select,
)
from hybridnas.runners.files import atomic_write
from hybridnas.runners.macs import profile_spec
from hybridnas.runners.pareto import knee, non_dominated
from hybridnas.runners.store import redact
from hybridnas.search_space.spec import ArchSpec

OBJECTIVES = [["val_acc", "max"], ["macs", "min"], ["params", "min"]]


def _spec(stages: list[dict], stem: int = 8) -> ArchSpec:
    return ArchSpec.from_dict(
        {"input": {"channels": 1, "size": 12, "classes": 10}, "stem": {"channels": stem}, "stages": stages}
    )


@pytest.fixture(scope="module")
def archs() -> list[tuple[ArchSpec, float]]:
    """Real, small architectures with the val_acc each trial logs (chosen so the selections differ)."""
    return [
        (_spec([{"mixer": "conv", "depth": 1, "channels": 8}]), 0.62),
        (_spec([{"mixer": "conv", "depth": 2, "channels": 16}]), 0.80),
        (_spec([{"mixer": "shifted_window", "depth": 1, "channels": 16, "addon": "ca"}]), 0.86),
        (
            _spec(
                [
                    {"mixer": "window", "depth": 1, "channels": 16, "options": {"window": 4, "heads": 2}},
                    {"mixer": "deform", "depth": 1, "channels": 32, "downsample": "spd"},
                ]
            ),
            0.91,
        ),
        (_spec([{"mixer": "axial", "depth": 2, "channels": 32, "addon": "gc"}], stem=16), 0.90),
        (_spec([{"mixer": "conv", "depth": 1, "channels": 16, "options": {"kernel": 5}}]), 0.70),
    ]


def _log_trial(client, exp_id, parent_id, trial, spec, acc, status="ok"):
    run = client.create_run(
        exp_id,
        run_name=f"trial_{trial}",
        tags={
            "mlflow.parentRunId": parent_id,
            "hybridnas.kind": "trial",
            "hybridnas.trial": str(trial),
            "hybridnas.status": status,
            "hybridnas.arch_hash": spec.arch_hash(),
            **({"hybridnas.error": "RuntimeError: boom"} if status == "failed" else {}),
        },
    )
    rid = run.info.run_id
    params = [Param(k, str(v)) for k, v in spec.flat_params().items()]
    metrics = []
    if status == "ok":
        prof = profile_spec(spec)
        for epoch in (1, 2):
            metrics += [
                Metric("train_loss", 2.0 / epoch, 0, epoch),
                Metric("val_acc", acc - 0.1 / epoch, 0, epoch),
            ]
        final = {
            "val_acc": acc,
            "macs": prof["macs"],
            "flops": prof["flops"],
            "params": prof["params"],
            "latency_ms": prof["macs"] / 1e6,
            "train_time_s": 3.0,
            "imgs_per_s": 900.0,
        }
        metrics += [Metric(k, float(v), 0, 2) for k, v in final.items()]
    elif status == "infeasible":
        prof = profile_spec(spec)
        metrics += [Metric("macs", float(prof["macs"]), 0, 0)]
    client.log_batch(rid, metrics=metrics, params=params, tags=[RunTag("dummy", "1")])
    client.log_text(rid, spec.to_yaml(), "arch.yaml")
    client.set_terminated(rid, "FAILED" if status == "failed" else "FINISHED")
    return rid


def _parent(client, exp_id, name, start_time=None):
    run = client.create_run(
        exp_id,
        run_name=name,
        start_time=start_time,
        tags={"hybridnas.kind": "search", "hybridnas.objectives": json.dumps(OBJECTIVES)},
    )
    client.log_param(run.info.run_id, "sampler", "nsga2")
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory, archs):
    """A tracking store with experiment 'demo' (an older and a newer search) and 'broken' (nothing ok)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("demo", artifact_location=(root / "artifacts").as_uri())
    old = _parent(client, exp_id, "demo", start_time=1_000)
    _log_trial(client, exp_id, old, 0, archs[0][0], 0.99)
    client.set_terminated(old)
    parent = _parent(client, exp_id, "demo")
    logged = {}
    for i, (spec, acc) in enumerate(archs):
        logged[str(i)] = _log_trial(client, exp_id, parent, i, spec, acc)
    _log_trial(client, exp_id, parent, 6, archs[1][0], 0.99, status="failed")
    _log_trial(client, exp_id, parent, 7, archs[4][0], 0.99, status="infeasible")
    client.create_run(exp_id, run_name="unrelated")  # a run that is not part of any search
    client.set_terminated(parent)
    broken = client.create_experiment("broken", artifact_location=(root / "artifacts2").as_uri())
    bp = _parent(client, broken, "broken")
    _log_trial(client, broken, bp, 0, archs[0][0], 0.5, status="failed")
    return {"uri": uri, "client": client, "parent": parent, "old": old, "runs": logged}


@pytest.fixture(scope="module")
def runs(store):
    return load_runs("demo", store["uri"])


def test_load_runs_reads_the_finished_trials_of_the_latest_search(store, runs, archs):
    assert list(runs.columns) == list(COLUMNS)
    assert runs["trial"].tolist() == [str(i) for i in range(len(archs))]  # no failed/infeasible/old trials
    assert (runs["parent_run_id"] == store["parent"]).all() and (runs["status"] == "ok").all()
    assert dict(zip(runs["trial"], runs["run_id"])) == store["runs"]
    for (spec, acc), row in zip(archs, runs.itertuples()):
        assert row.arch == spec and row.arch_hash == spec.arch_hash()
        assert row.val_acc == acc  # the final value, not an epoch's
        prof = profile_spec(spec)
        assert (row.macs, row.flops, row.params) == (prof["macs"], prof["flops"], prof["params"])
        assert math.isnan(row.latency_ms_measured)
    assert runs["macs"].dtype == np.int64
    assert runs.attrs["objectives"] == [tuple(o) for o in OBJECTIVES]
    assert runs.attrs["statuses"] == {"ok": len(archs), "failed": 1, "infeasible": 1}

    old = load_runs("demo", store["uri"], parent_run_id=store["old"])
    assert old["trial"].tolist() == ["0"] and old["val_acc"].tolist() == [0.99]


def test_load_runs_errors_name_what_exists(store, tmp_path):
    with pytest.raises(
        ExportError, match=r"no MLflow experiment 'dmeo'.*did you mean .demo.*broken, Default, demo"
    ):
        load_runs("dmeo", store["uri"])
    with pytest.raises(ExportError, match=r"no finished trials \(1 failed\)"):
        load_runs("broken", store["uri"])
    missing = tmp_path / "nothing.db"
    with pytest.raises(ExportError, match="no MLflow database"):
        load_runs("demo", f"sqlite:///{missing}")
    assert not missing.exists()  # looking must not create an empty store
    with pytest.raises(ExportError, match="cannot reach"):
        load_runs("demo", "http://127.0.0.1:9")


def test_parse_budget_accepts_suffixes_and_exponents():
    assert parse_budget("macs<=50M") == ("macs", 5e7)
    assert parse_budget(" macs <= 5e7 ") == ("macs", 5e7)
    assert parse_budget("flops<=1.2G") == ("flops", 1.2e9)
    assert parse_budget("params<=100k") == ("params", 1e5)
    assert parse_budget("latency_ms<=2.5") == ("latency_ms", 2.5)
    assert parse_budget("best_acc") is None and parse_budget("macs<50M") is None
    with pytest.raises(ExportError, match="budgets apply to"):
        parse_budget("val_acc<=3")


def test_select_each_way(runs):
    best = select(runs, "best_acc")
    assert len(best) == 1 and best["trial"].iloc[0] == "3"  # 0.91

    values = runs[["val_acc", "macs", "params"]].to_numpy(float)
    modes = ["max", "min", "min"]
    front = select(runs, "pareto")
    assert set(front["trial"]) == set(runs["trial"][non_dominated(values, modes)])
    assert front["pareto"].all() and (front["rank"] == 0).all()

    k = select(runs, "knee")
    assert k["trial"].iloc[0] == runs["trial"].iloc[knee(values, modes)]
    assert k["trial"].iloc[0] in set(front["trial"])

    macs = sorted(runs["macs"])
    under = select(runs, f"macs<={macs[2]}")
    cands = runs[runs["macs"] <= macs[2]]
    assert under["trial"].iloc[0] == cands.loc[cands["val_acc"].idxmax(), "trial"]
    assert under["macs"].iloc[0] <= macs[2]
    # The budget is inclusive, and unit suffixes work.
    assert select(runs, f"params<={runs['params'].min() / 1e3}K")["params"].iloc[0] == runs["params"].min()

    with pytest.raises(ExportError, match=r"smallest available is .* \(trial 0\)"):
        select(runs, "macs<=10")
    with pytest.raises(ExportError, match="expected best_acc, knee, pareto"):
        select(runs, "fastest")


def test_exported_yaml_rebuilds_the_logged_model(runs, store, tmp_path):
    for how in ("best_acc", "knee", "pareto", f"macs<={int(runs['macs'].median())}"):
        for i, row in enumerate(select(runs, how).to_dict("records")):
            path = export_arch(
                row, "demo", tmp_path / f"{how}_{i}.yaml", selection=how, tracking_uri=store["uri"]
            )
            spec = ArchSpec.from_yaml(path)
            assert spec == row["arch"]
            prof = profile_spec(spec)
            assert prof["macs"] == row["macs"] and prof["params"] == row["params"]
            assert spec.metrics == {
                "val_acc": row["val_acc"],
                "macs": row["macs"],
                "flops": row["flops"],
                "params": row["params"],
                "latency_ms": row["latency_ms"],
            }
            prov = spec.provenance
            assert prov["experiment"] == "demo" and prov["run_id"] == row["run_id"]
            assert prov["parent_run_id"] == store["parent"] and prov["trial"] == row["trial"]
            assert prov["selection"] == how and prov["tracking_uri"] == store["uri"]
            assert prov["hybridnas_version"] and prov["date"].endswith("+00:00")
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "arch.yaml"
    atomic_write(target, "old\n")
    with pytest.raises(TypeError):
        atomic_write(target, 12345)  # not str/bytes: fails after the temp file exists
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["arch.yaml"]


def test_redact_hides_passwords():
    assert redact("http://bob:secret@host:5000/x") == "http://bob:***@host:5000/x"
    assert redact("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


def test_cli_export_writes_default_paths_and_prints_metrics(
    store, runs, archs, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    budget = f"macs<={runs['macs'].max() / 1e6:.3f}M"
    assert (
        cli.main(["export", "--experiment", "demo", "--tracking-uri", store["uri"], "--select", budget]) == 0
    )
    out = capsys.readouterr().out
    path = tmp_path / f"demo_macs_le_{runs['macs'].max() / 1e6:.3f}M.yaml"
    assert path.exists() and f"wrote {path.name}" in out and "val_acc 91.00%" in out
    assert ArchSpec.from_yaml(path) == archs[3][0]

    assert (
        cli.main(["export", "--experiment", "demo", "--tracking-uri", store["uri"], "--select", "pareto"])
        == 0
    )
    written = sorted((tmp_path / "demo_front").glob("*.yaml"))
    assert len(written) == len(select(runs, "pareto")) and written[0].name.startswith("demo_trial")

    assert (
        cli.main(
            [
                "export",
                "--experiment",
                "demo",
                "--tracking-uri",
                store["uri"],
                "--out",
                "sub/k.yaml",
                "--select",
                "knee",
            ]
        )
        == 0
    )
    assert ArchSpec.from_yaml(tmp_path / "sub" / "k.yaml") == select(runs, "knee")["arch"].iloc[0]


def test_cli_errors_exit_2_with_one_line(store, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv, message in [
        (
            ["export", "--experiment", "nope", "--tracking-uri", store["uri"]],
            "experiments there: broken, Default, demo",
        ),
        (
            ["export", "--experiment", "demo", "--tracking-uri", store["uri"], "--select", "macs<50M"],
            "--select",
        ),
        (
            ["export", "--experiment", "demo", "--tracking-uri", store["uri"], "--select", "macs<=1"],
            "smallest",
        ),
        (["pareto", "--experiment", "nope", "--tracking-uri", store["uri"]], "no MLflow experiment 'nope'"),
        (["export", "--experiment", "demo"], "no MLflow database"),  # default sqlite:///mlflow.db is absent
    ]:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("hybridnas: error:") and message in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written, no mlflow.db created


def test_cli_pareto_prints_the_front_and_writes_plots(store, runs, archs, tmp_path, capsys):
    out_dir = tmp_path / "fronts"
    assert (
        cli.main(["pareto", "--experiment", "demo", "--tracking-uri", store["uri"], "--out", str(out_dir)])
        == 0
    )
    out = capsys.readouterr().out
    front = select(runs, "pareto")
    assert f"{len(front)} on the front of val_acc (max), macs (min), params (min)" in out
    for t in front["trial"]:
        assert any(line.split()[0] == t for line in out.splitlines()[2:] if line.strip())
    csv = pd.read_csv(out_dir / "pareto.csv")
    assert len(csv) == len(runs) and csv["pareto"].sum() == len(front)
    assert set(csv["arch_hash"]) == {s.arch_hash() for s, _ in archs}
    png = out_dir / "pareto_val_acc_vs_macs.png"
    assert np.asarray(Image.open(png).convert("L")).std() > 5
    html = (out_dir / "fronts.html").read_text()
    assert "shifted_window x1 c16 +ca" in html and store["runs"]["2"] in html
    assert {p.name for p in out_dir.iterdir()} == {
        "pareto.csv",
        "front.md",
        "fronts.html",
        *(
            f"pareto_{a}_vs_{b}.png"
            for a, b in [("val_acc", "macs"), ("val_acc", "params"), ("macs", "params")]
        ),
    }


def test_export_arch_refuses_a_row_without_an_architecture(tmp_path):
    with pytest.raises(ExportError, match="no architecture"):
        export_arch({"trial": "3", "val_acc": 0.5}, "demo", tmp_path / "x.yaml")
    assert not Path(tmp_path / "x.yaml").exists()


def test_an_exported_measured_member_carries_its_measured_latency_and_the_prediction(runs, tmp_path):
    row = dict(runs.iloc[0])
    row["latency_ms_measured"] = 1.25 * row["latency_ms"]
    spec = ArchSpec.from_yaml(export_arch(row, "demo", tmp_path / "measured.yaml"))
    assert spec.metrics["latency_ms"] == pytest.approx(row["latency_ms_measured"])
    assert spec.metrics["latency_ms_measured"] == pytest.approx(row["latency_ms_measured"])
    assert spec.metrics["latency_ms_predicted"] == pytest.approx(row["latency_ms"])
