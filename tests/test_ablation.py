"""`hybridnas ablate` end to end: real Ray Tune trials, a real MLflow store, tiny synthetic data."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from scipy import stats

from hybridnas.runners import cli
from hybridnas.runners.ablation import run_ablation
from hybridnas.runners.store import child_runs
from hybridnas.search_space.ablation import AblationStudy

pytestmark = pytest.mark.slow

BASE = {
    "input": {"channels": 1, "size": 8, "classes": 4},
    "stem": {"channels": 8},
    "stages": [
        {"mixer": "conv", "depth": 1, "channels": 8},
        {"mixer": "conv", "depth": 1, "channels": 8, "downsample": "conv"},
    ],
}


def _write(tmp: Path, name: str, **over) -> Path:
    d = {
        "name": name,
        "base": BASE,
        "data": {"dataset": "synthetic", "size": 8, "channels": 1, "classes": 4, "samples": 192, "seed": 0},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.003},
        "vary": {"stages.1.mixer": ["conv", "window"]},
        "seeds": [0, 1],
        "concurrency": 2,
        "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "experiment": name},
        "out_dir": str(tmp / "out" / name),
        **over,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def test_ablation_logs_parent_and_tagged_children_and_a_table_matching_scipy(tmp_path, ray_local, capsys):
    study = AblationStudy.from_yaml(_write(tmp_path, "abl"))
    res = run_ablation(study, progress=print)
    assert res.trained == 4 and res.skipped == 0

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("abl")
    parent = client.get_run(res.parent_run_id)
    assert parent.data.tags["hybridnas.kind"] == "ablation" and parent.info.status == "FINISHED"
    assert parent.data.params["mode"] == "one_at_a_time" and parent.data.params["seeds"] == "0,1"
    arts = {a.path for a in client.list_artifacts(res.parent_run_id)}
    assert {"ablation.md", "ablation.csv", "ablation.tex", "ablation.png", "ablation.yaml"} <= arts

    kids = child_runs(client, exp.experiment_id, res.parent_run_id)
    assert len(kids) == 4
    seen = {(k.data.tags["variant"], k.data.tags["seed"]) for k in kids}
    assert seen == {
        ("base", "0"),
        ("base", "1"),
        ("stages.1.mixer=window", "0"),
        ("stages.1.mixer=window", "1"),
    }
    for k in kids:
        assert k.data.tags["mlflow.parentRunId"] == res.parent_run_id
        assert k.data.tags["hybridnas.status"] == "ok"
        assert k.data.tags["factor"] in ("base", "stages.1.mixer")
        assert {"val_acc", "macs", "params", "latency_ms"} <= set(k.data.metrics)
        assert k.data.params["stages.1.mixer"] == ("window" if "window" in k.data.tags["variant"] else "conv")

    # The table's statistics are the ones scipy computes on the logged numbers.
    acc = {}
    for k in kids:
        acc.setdefault(k.data.tags["variant"], []).append(k.data.metrics["val_acc"])
    row = res.rows[1]
    assert row.variant == "stages.1.mixer=window" and row.n == 2
    assert row.mean == pytest.approx(np.mean(acc[row.variant]))
    assert row.diff == pytest.approx(np.mean(acc[row.variant]) - np.mean(acc["base"]))
    if np.std(acc[row.variant]) + np.std(acc["base"]) > 0:
        t = stats.ttest_ind(acc[row.variant], acc["base"], equal_var=False)
        assert row.p_value == pytest.approx(t.pvalue)
        assert (row.ci_low, row.ci_high) == pytest.approx(tuple(t.confidence_interval(0.95)))
    assert (res.out_dir / "ablation.md").read_text().count("\n|") >= 3
    # Readable in MLflow: children named after variant and seed, the table as the parent's
    # description and as per-variant metrics.
    assert {k.info.run_name for k in kids} == {
        "base seed0",
        "base seed1",
        "s1.mixer=window seed0",
        "s1.mixer=window seed1",
    }
    parent = client.get_run(res.parent_run_id)
    assert parent.data.metrics["mean/base"] == pytest.approx(np.mean(acc["base"]))
    assert parent.data.metrics["diff/s1.mixer_window"] == pytest.approx(row.diff)
    assert (res.out_dir / "ablation.md").read_text() in parent.data.tags["mlflow.note.content"]
    assert parent.data.tags["hybridnas.search_id"] == kids[0].data.tags["hybridnas.search_id"]
    assert res.runs_url.endswith(f"/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning")
    assert (
        res.parent_url == f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs/{res.parent_run_id}"
    )
    assert "stages.1.mixer=window" in capsys.readouterr().out

    # Resume: nothing finished is trained again; new seeds train only themselves.
    again = run_ablation(study, resume=True)
    assert again.trained == 0 and again.skipped == 4
    more = AblationStudy.from_yaml(_write(tmp_path, "abl"), seeds=[0, 1, 2])
    grown = run_ablation(more, resume=True)
    assert grown.trained == 2 and grown.skipped == 4
    kids = child_runs(client, exp.experiment_id, res.parent_run_id)
    keys = [(k.data.tags["variant"], k.data.tags["seed"]) for k in kids]
    assert len(keys) == len(set(keys)) == 6
    assert grown.rows[0].n == 3


def test_an_ablation_in_which_every_trial_failed_exits_1_and_writes_no_table(
    tmp_path, ray_local, capsys, monkeypatch
):
    trials = [f"{v}/seed{s}" for v in ("base", "stages.1.mixer=window") for s in (0, 1)]
    monkeypatch.setenv("HYBRIDNAS_FAULTS", ",".join(f"{t}:raise" for t in trials))
    path = _write(tmp_path, "allfail", vary={"stages.1.mixer": ["window"]})
    assert cli.main(["ablate", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    # The injected errors name their trial (base/seed0, ...): two per variant name are alike.
    assert re.match(
        r"hybridnas: error: no trial trained: 4 of 4 failed; the most common error \(2 of 4\): "
        r"RuntimeError: fault injected by HYBRIDNAS_FAULTS into trial \S+/seed\d$",
        err[-1],
    ), err[-1]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("allfail")
    parent = client.search_runs([exp.experiment_id], "tags.`hybridnas.kind` = 'ablation'")[0]
    assert parent.info.status == "FAILED" and parent.data.tags["hybridnas.error"].startswith(
        "no trial trained"
    )
    assert not (tmp_path / "out" / "allfail" / "ablation.md").exists()


def test_grid_and_one_at_a_time_sizes(tmp_path):
    vary = {"stages.1.mixer": ["conv", "window", "slide"], "stages.0.addon": ["none", "gc"]}
    one = AblationStudy.from_yaml(_write(tmp_path, "one", vary=vary))
    grid = AblationStudy.from_yaml(_write(tmp_path, "grid", vary=vary, mode="grid"))
    assert len(one.variants) == 1 + 2 + 1  # the base, plus each non-base value alone
    assert len(grid.variants) == 3 * 2  # every combination; the base is one of them
    assert len(grid.trials()) == 6 * 2


def test_cli_rejects_bad_factor_before_training_and_existing_output(tmp_path, capsys):
    bad = _write(tmp_path, "bad", vary={"stages.3.mixer": ["window"]})
    assert cli.main(["ablate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "vary.stages.3.mixer" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "bad").exists()
    assert (
        cli.main(["ablate", str(_write(tmp_path, "s", vary={"stages.1.mixer": ["window"]})), "--seeds", "x"])
        == 2
    )
    (tmp_path / "out" / "taken").mkdir(parents=True)
    (tmp_path / "out" / "taken" / "ablation_state.json").write_text('{"parent_run_id": "r"}')
    assert cli.main(["ablate", str(_write(tmp_path, "taken", vary={"stages.1.mixer": ["window"]}))]) == 2
    assert "--resume" in capsys.readouterr().err


def test_a_crashed_ablation_leaves_its_parent_failed_and_resume_refuses_a_changed_file(
    tmp_path, ray_local, monkeypatch
):
    import hybridnas.runners.ablation as ablation
    from hybridnas.runners.resume import SearchError

    path = _write(tmp_path, "crash", seeds=[0], vary={"stages.1.mixer": ["window"]})

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ablation, "write_outputs", broken)
    with pytest.raises(OSError, match="disk full"):
        run_ablation(AblationStudy.from_yaml(path))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("crash").experiment_id], "tags.`hybridnas.kind` = 'ablation'"
    )
    assert parent.info.status == "FAILED" and "disk full" in parent.data.tags["hybridnas.error"]
    # The file changes (another learning rate): its results would not be comparable.
    changed = _write(
        tmp_path, "crash", seeds=[0], vary={"stages.1.mixer": ["window"]}, train={"epochs": 1, "lr": 0.01}
    )
    with pytest.raises(SearchError, match="changed since"):
        run_ablation(AblationStudy.from_yaml(changed), resume=True)
