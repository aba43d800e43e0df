"""Experiment files: every section validated with key paths, defaults filled; `hybridnas space` end to end."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hybridnas.runners.cli import main as cli
from hybridnas.search_space import Bound, Experiment, InputSpec, Objective, SpecError, known_input
from hybridnas.search_space.config import DataConfig

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT_FILES = [
    p for p in sorted((ROOT / "experiments").glob("*.yaml")) if "space" in yaml.safe_load(p.read_text())
]
SPACE = {"stages": [{"mixer": ["conv", "window"], "depth": [1, 2], "channels": 16, "downsample": "conv"}]}


def exp(**sections) -> dict:
    return {"name": "t", "space": SPACE, **sections}


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=lambda p: p.name)
def test_shipped_experiment_files_are_valid_and_resolve_to_json(path):
    e = Experiment.from_yaml(path)
    resolved = e.to_resolved_dict()
    assert json.loads(json.dumps(resolved)) == resolved
    assert resolved["space_size"] == e.space.size() > 1
    assert e.source_text == path.read_text() and e.path == str(path)
    assert e.tracking.experiment and e.out_dir


def test_quickstart_stays_within_the_ten_minute_budget_it_was_sized_for():
    e = Experiment.from_yaml(ROOT / "experiments" / "quickstart.yaml")
    assert e.data.dataset == "mnist5k" and e.input == InputSpec(1, 28, 10)
    s, epochs = e.search, e.train.epochs
    assert s.scheduler == "moasha" and s.repeats >= 1  # the README shows stopped trials and error bars
    # Epochs trained, counting every trial as feasible: all to the first rung; from each rung about
    # 1/eta + ln(n)/n go on (decided on arrival, early trials go on more readily); then the front's
    # repeats, at most as many members as trials that reach the end, at the full budget.
    # ~2.5 s per epoch per trial on a 2-core machine, 2 in parallel.
    points = [*s.rungs(epochs), epochs]
    share, trained = 1.0, s.trials * points[0]
    for a, b in zip(points, points[1:]):
        share *= 1 / s.reduction_factor + math.log(s.trials) / s.trials
        trained += s.trials * share * (b - a)
    trained += s.trials * share * s.repeats * epochs
    assert trained * 2.5 / s.concurrency <= 6 * 60, trained
    assert "macs" in e.constraints and e.constraints["macs"].max is not None


def test_defaults_are_filled():
    e = Experiment.from_dict({"name": "mini", "space": SPACE})
    assert e.objectives == (Objective("val_acc", "max"),)
    assert e.constraints == {}
    assert (
        e.search.sampler,
        e.search.trials,
        e.search.concurrency,
        e.search.seed,
        e.search.max_failures,
    ) == (
        "tpe",
        20,
        1,
        0,
        1,
    )
    assert (e.resources.cpu, e.resources.gpu) == (1.0, 0.0)
    assert (e.latency.device, e.latency.batch_size, e.latency.threads, e.latency.clock) == (
        "cpu",
        1,
        1,
        "auto",
    )
    assert e.tracking.uri is None and e.tracking.experiment == "mini"
    assert e.out_dir == "hybridnas_runs/mini"
    assert e.data.dataset == "mnist5k" and e.train.epochs == 3
    assert e.input == InputSpec(1, 28, 10)
    s = e.search
    assert (s.scheduler, s.min_epochs, s.reduction_factor, s.repeats) == ("fifo", 1, 3, 0)
    assert s.rungs(e.train.epochs) == ()  # fifo: every trial trains to the end


def test_name_defaults_to_the_file_stem(tmp_path):
    f = tmp_path / "my-search.yaml"
    f.write_text(yaml.safe_dump({"space": SPACE}))
    assert Experiment.from_yaml(f).name == "my-search"


def test_objectives_shorthand_and_constraint_numbers():
    e = Experiment.from_dict(
        exp(
            objectives=["val_acc", "macs", {"metric": "latency_ms"}],
            constraints={
                "macs": {"max": "20M"},
                "params": {"min": "1e3", "max": 1.5e6},
                "flops": {"max": "1.5G"},
            },
        )
    )
    assert [(o.metric, o.mode) for o in e.objectives] == [
        ("val_acc", "max"),
        ("macs", "min"),
        ("latency_ms", "min"),
    ]
    assert e.constraints["macs"] == Bound(max=20e6)
    assert e.constraints["params"] == Bound(min=1e3, max=1.5e6)
    assert e.constraints["flops"].max == 1.5e9


def test_bound_violation_is_zero_inside_and_the_distance_outside():
    b = Bound(min=10.0, max=20.0)
    assert b.violation(15) == 0.0 and b.contains(10) and b.contains(20)
    assert b.violation(25) == 5.0 and b.violation(4) == 6.0
    assert Bound(max=1.0).violation(-100) == 0.0


def test_input_comes_from_the_dataset():
    assert known_input(DataConfig(dataset="cifar100")) == InputSpec(3, 32, 100)
    assert known_input(DataConfig(dataset="digits")) == InputSpec(1, 8, 10)
    assert known_input(DataConfig(dataset="synthetic", size=12, channels=2, classes=3)) == InputSpec(2, 12, 3)
    assert known_input(DataConfig(dataset="imagefolder", root="x")) is None
    e = Experiment.from_dict(exp(data={"dataset": "cifar10", "root": "data"}))
    assert e.input == e.space.input == InputSpec(3, 32, 10)


def test_grid_with_more_trials_than_architectures_warns():
    with pytest.warns(UserWarning, match="search.trials"):
        Experiment.from_dict(exp(search={"sampler": "grid", "trials": 1000}))


TWO = [{"metric": "val_acc"}, {"metric": "macs"}]


def test_rungs_grow_by_the_reduction_factor_and_stay_below_the_training_length():
    e = Experiment.from_dict(
        exp(train={"epochs": 9}, objectives=TWO, search={"scheduler": "moasha", "reduction_factor": 3})
    )
    assert e.search.rungs(9) == (1, 3)
    assert e.search.rungs(10) == (1, 3, 9)
    e = Experiment.from_dict(
        exp(
            train={"epochs": 16},
            objectives=TWO,
            search={"scheduler": "moasha", "min_epochs": 2, "reduction_factor": 2},
        )
    )
    assert e.search.rungs(16) == (2, 4, 8)
    assert e.to_resolved_dict()["search"]["scheduler"] == "moasha"


def test_asha_on_several_objectives_warns_that_only_val_acc_decides():
    with pytest.warns(UserWarning, match="asha stops trials by val_acc alone"):
        Experiment.from_dict(exp(train={"epochs": 4}, objectives=TWO, search={"scheduler": "asha"}))


def test_fifo_with_a_rung_key_warns_that_it_has_no_effect():
    with pytest.warns(UserWarning, match="search.min_epochs: has no effect with scheduler: fifo"):
        Experiment.from_dict(exp(search={"min_epochs": 2}))


def sched(scheduler: str = "moasha", epochs: int = 4, objectives=TWO, **search) -> dict:
    return exp(train={"epochs": epochs}, objectives=objectives, search={"scheduler": scheduler, **search})


ERRORS = [
    (sched("mosha"), "search.scheduler", ["'mosha'", "fifo, asha, moasha", "did you mean 'moasha'"]),
    (sched(objectives=["val_acc"]), "search.scheduler", ["one (val_acc)", "use scheduler: asha"]),
    (sched(min_epochs=4), "search.min_epochs", ["not below train.epochs (4)"]),
    (sched("asha", min_epochs=5), "search.min_epochs", ["not below train.epochs (4)"]),
    (sched(reduction_factor=1), "search.reduction_factor", [">= 2"]),
    (sched(reduction_factor=2.5), "search.reduction_factor", ["integer"]),
    (sched(repeats=-1), "search.repeats", [">= 0"]),
    (sched(min_epochs=0), "search.min_epochs", [">= 1"]),
    (sched(objectives=["macs", "params"]), "search.scheduler", ["val_acc is not an objective"]),
    (sched("asha", objectives=["macs", "val_acc"]), "search.scheduler", ["put val_acc first"]),
    (exp(search={"sampler": "nsga_2"}), "search.sampler", ["'nsga_2'", "tpe, nsga2", "did you mean 'nsga2'"]),
    (exp(search={"trials": 0}), "search.trials", [">= 1"]),
    (exp(search={"concurency": 2}), "search.concurency", ["did you mean 'concurrency'"]),
    (
        exp(objectives=[{"metric": "val_acc"}, {"metric": "mac"}]),
        "objectives[1].metric",
        ["did you mean 'macs'"],
    ),
    (exp(objectives=[{"metric": "val_acc", "mode": "maximize"}]), "objectives[0].mode", ["min, max"]),
    (exp(objectives=["macs", "macs"]), "objectives[1].metric", ["already"]),
    (exp(objectives=["macs", "flops"]), "objectives[1].metric", ["flops = 2 * macs"]),
    (exp(objectives=[]), "objectives", ["non-empty"]),
    (exp(constraints={"macs": {"max": "lots"}}), "constraints.macs.max", ["'lots'"]),
    (exp(constraints={"macs": {"max": -1}}), "constraints.macs.max", [">= 0"]),
    (exp(constraints={"mac": {"max": 1}}), "constraints.mac", ["did you mean 'macs'"]),
    (exp(constraints={"val_acc": {"min": 0.9}}), "constraints.val_acc", ["macs, flops, params, latency_ms"]),
    (exp(constraints={"macs": {"min": 5, "max": 1}}), "constraints.macs.min", ["above max"]),
    (exp(constraints={"macs": {}}), "constraints.macs", ["max and/or min"]),
    (exp(resources={"cpu": 0}), "resources.cpu", ["> 0"]),
    (exp(resources={"gpus": 1}), "resources.gpus", ["did you mean 'gpu'"]),
    (exp(latency={"device": "tpu"}), "latency.device", ["cpu, cuda"]),
    (exp(latency={"threads": 0}), "latency.threads", [">= 1"]),
    (exp(latency={"clock": "wal"}), "latency.clock", ["auto, wall, cpu", "did you mean 'wall'"]),
    (exp(latency={"clock": "cpu", "threads": 2}), "latency.clock", ["threads 1", "wall or auto"]),
    (exp(tracking={"uri": 5}), "tracking.uri", ["URI"]),
    (exp(serach={}), "serach", ["did you mean 'search'"]),
    ({"name": "t"}, "space", ["required"]),
    (exp(name="a b/c"), "name", ["letters"]),
    (exp(data={"dataset": "mnist"}), "data.dataset", ["mnist5k"]),
    (exp(train={"epochs": 0}), "train.epochs", [">= 1"]),
    # values checked for meaning, not only type
    (exp(train={"lr": float("nan")}), "train.lr", ["finite"]),
    (exp(train={"lr": float("inf")}), "train.lr", ["finite"]),
    (exp(train={"lr": 0}), "train.lr", ["> 0"]),
    (exp(train={"label_smoothing": 2.0}), "train.label_smoothing", ["< 1", "probability"]),
    (exp(train={"label_smoothing": -0.1}), "train.label_smoothing", [">= 0"]),
    (exp(train={"weight_decay": -0.01}), "train.weight_decay", [">= 0"]),
    (exp(train={"momentum": 1.0}), "train.momentum", ["< 1"]),
    (exp(train={"warmup_epochs": float("nan")}), "train.warmup_epochs", ["finite"]),
    (exp(train={"epochs": 10**12}), "train.epochs", ["<= 10,000"]),
    (exp(train={"batch_size": 10**7}), "train.batch_size", ["<= 65,536"]),
    (exp(train={"threads": -1}), "train.threads", [">= 0", "0 = from the trial's CPUs"]),
    (exp(train={"seed": -1}), "train.seed", [">= 0"]),
    (exp(train={"seed": 2**40}), "train.seed", ["<= 4,294,967,295"]),
    (exp(train={"crop_padding": -2}), "train.crop_padding", [">= 0"]),
    (exp(train={"max_train_batches": -1}), "train.max_train_batches", [">= 0"]),
    (exp(train={"lr": "fast"}), "train.lr", ["expected a number"]),
    (exp(data={"seed": -1}), "data.seed", [">= 0"]),
    (exp(data={"val_fraction": float("nan")}), "data.val_fraction", ["finite"]),
    (exp(data={"val_fraction": 1.0}), "data.val_fraction", ["< 1"]),
    (exp(data={"samples": 10**9}), "data.samples", ["<= 10,000,000"]),
    (exp(data={"root": 5}), "data.root", ["a string"]),
    (exp(data={"dataset": "synthetic", "classes": 1}), "data.classes", [">= 2"]),
    (
        exp(data={"dataset": "synthetic", "samples": 10**6, "size": 64}),
        "data.samples",
        ["at most 268,435,456"],
    ),
    (exp(data={"dataset": "synthetic", "samples": 10, "classes": 10}), "data.samples", ["at least 20"]),
    (exp(search={"concurrency": 10**6}), "search.concurrency", ["<= 4,096"]),
    (exp(out_dir=3), "out_dir", ["directory"]),
    (
        exp(space={"stages": [{"mixer": "conv", "depth": 1, "channels": 8, "addon": "sе"}]}),
        "space.stages[0].addon",
        ["none, gc, ca"],
    ),
    (
        exp(space={**SPACE, "input": {"channels": 3, "size": 32, "classes": 10}}),
        "space.input",
        ["mnist5k", "1x28x28"],
    ),
    (
        exp(
            search={"sampler": "grid"},
            space={
                "stages": [
                    {
                        "mixer": "conv",
                        "depth": list(range(1, 41)),
                        "channels": list(range(8, 48)),
                        "addon": ["none", "gc", "ca"],
                    }
                ]
                * 2
            },
        ),
        "search.sampler",
        ["grid over", "at most"],
    ),
]


@pytest.mark.parametrize("d, path, words", ERRORS, ids=[e[1] for e in ERRORS])
def test_invalid_experiments_raise_spec_error_with_key_path(d, path, words):
    with pytest.raises(SpecError) as e:
        Experiment.from_dict(d)
    assert e.value.path == path, str(e.value)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_malformed_experiment_yaml_reports_the_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("name: x\nspace:\n  stages: [\n    {mixer: conv\n")
    with pytest.raises(SpecError) as e:
        Experiment.from_yaml(f)
    assert str(f) in str(e.value) and "line" in str(e.value)


# ---- hybridnas space --------------------------------------------------------------------------------------------


def test_hybridnas_space_prints_size_parameters_and_sampled_architectures(capsys):
    rc = cli(["space", str(ROOT / "experiments" / "quickstart.yaml"), "--samples", "2", "--seed", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    e = Experiment.from_yaml(ROOT / "experiments" / "quickstart.yaml")
    assert f"{e.space.size():,} distinct architectures" in out
    assert "stages.1.mixer" in out
    assert out.count("\n#") == 2  # two sampled architectures
    assert "MACs" in out and "res" in out
    again = cli(["space", str(ROOT / "experiments" / "quickstart.yaml"), "--samples", "2", "--seed", "3"])
    assert again == 0 and capsys.readouterr().out == out  # seeded: the same samples


def test_hybridnas_space_on_a_bad_file_exits_2_with_one_line(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(exp(search={"sampler": "nsga"})))
    assert cli(["space", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("hybridnas: error: search.sampler: 'nsga' is not one of")


def test_hybridnas_space_on_moasha_with_one_objective_exits_2_naming_the_key(tmp_path, capsys):
    f = tmp_path / "one.yaml"
    f.write_text(yaml.safe_dump(sched(objectives=["val_acc"])))
    assert cli(["space", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("hybridnas: error: search.scheduler: moasha ranks") and "use scheduler: asha" in err


def test_console_script_reports_a_bad_stage_without_traceback(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("name: x\nspace:\n  stages:\n    - {mixer: [conv, windw], depth: 1, channels: 8}\n")
    # The installed entry point (pip install -e .), next to this interpreter or on PATH.
    exe = str(Path(sys.executable).parent / "hybridnas")
    if not os.path.exists(exe):
        exe = shutil.which("hybridnas")
    out = subprocess.run(
        [exe, "space", str(f)], capture_output=True, text=True, env=os.environ.copy(), cwd=tmp_path
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip() == (
        "hybridnas: error: space.stages[0].mixer[1]: 'windw' is not one of conv, acmix, window, shifted_window, "
        "slide, axial, deform (did you mean 'window'?)"
    )


def test_experiments_spaces_and_specs_survive_pickling_for_ray_workers():
    import pickle

    import optuna

    e = Experiment.from_yaml(ROOT / "experiments" / "quickstart.yaml")
    again = pickle.loads(pickle.dumps(e))
    assert again == e and again.space.size() == e.space.size()
    spec = e.space.suggest(optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask())
    copy = pickle.loads(pickle.dumps(spec))
    assert copy == spec and copy.arch_hash() == spec.arch_hash()
