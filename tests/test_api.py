"""The public Python API: one import name, typed results, and calls that leave the caller's process
as they found it (threads, warning filters, loggers, environment, Ray)."""

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import yaml

import hybridnas

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "input": {"channels": 1, "size": 8, "classes": 4},
    "stem": {"channels": 8},
    "stages": [{"mixer": "conv", "depth": 1, "channels": 8}],
}


def test_import_hybridnas_is_light_and_exposes_the_api():
    code = "import sys, hybridnas; print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # the API is imported on first use
    for name in (
        "search",
        "ablate",
        "train",
        "profile",
        "build_model",
        "ArchSpec",
        "SearchSpace",
        "Experiment",
    ):
        assert callable(getattr(hybridnas, name)), name
    assert set(hybridnas.__all__) <= set(dir(hybridnas))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hybridnas.nope  # noqa: B018


def test_profile_matches_the_counter_and_takes_a_spec_or_a_path(tmp_path):
    from hybridnas.runners.macs import profile_spec

    spec = hybridnas.ArchSpec.from_dict(TINY)
    path = tmp_path / "a.yaml"
    path.write_text(spec.to_yaml())
    p = hybridnas.profile(spec)
    assert p["macs"] == profile_spec(spec)["macs"] > 0 and p["flops"] == 2 * p["macs"]
    assert hybridnas.profile(path)["params"] == p["params"] == hybridnas.profile(str(path))["params"]
    assert hybridnas.profile("arch_conv")["macs"] > 0  # a shipped example, by name


def test_calls_leave_the_process_as_they_found_it(tmp_path):
    """train and search in a fresh process: threads, warning filters, logger levels, the
    environment and Ray are the same after each call as before."""
    exp = {
        "name": "api",
        "data": {"dataset": "synthetic", "size": 8, "channels": 1, "classes": 4, "samples": 128, "seed": 0},
        "train": {"epochs": 1, "batch_size": 32},
        "space": {
            "stem": {"channels": 8},
            "stages": [{"mixer": ["conv", "window"], "depth": 1, "channels": 8}],
        },
        "objectives": [{"metric": "val_acc", "mode": "max"}, {"metric": "macs", "mode": "min"}],
        "search": {"sampler": "random", "trials": 2, "concurrency": 2, "seed": 0},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "api"},
        "out_dir": str(tmp_path / "out"),
    }
    (tmp_path / "api.yaml").write_text(yaml.safe_dump(exp))
    (tmp_path / "arch.yaml").write_text(yaml.safe_dump(TINY))
    script = textwrap.dedent(
        f"""
        import json, logging, os, sys, warnings
        import torch
        import hybridnas

        def state():
            import ray
            return {{
                "threads": torch.get_num_threads(),
                "filters": [repr(f) for f in warnings.filters],
                "levels": {{n: [lg.level, len(lg.handlers), lg.propagate]
                           for n, lg in logging.Logger.manager.loggerDict.items() if isinstance(lg, logging.Logger)}},
                "root": [logging.getLogger().level, len(logging.getLogger().handlers)],
                "env": dict(os.environ),
                "ray": ray.is_initialized(),
            }}

        import ray  # imported (not started) before: the search must shut down the Ray it starts
        logging.getLogger("ray").setLevel(logging.WARNING)
        torch.set_num_threads(2)
        warnings.simplefilter("error", ResourceWarning)
        logging.getLogger("mine").setLevel(logging.DEBUG)
        os.environ["MINE"] = "1"
        before = state()
        run = hybridnas.train({str(tmp_path / "arch.yaml")!r}, data="synthetic", epochs=1, out={str(tmp_path / "run")!r})
        after_train = state()
        res = hybridnas.search({str(tmp_path / "api.yaml")!r})
        after_search = state()
        for after in (after_train, after_search):  # loggers the calls' imports created are theirs
            after["levels"] = {{n: v for n, v in after["levels"].items() if n in before["levels"]}}
        print(json.dumps({{
            "train_same": before == after_train,
            "search_same": before == after_search,
            "diff": {{k: [before[k], after_search[k]] for k in before if before[k] != after_search[k]}},
            "acc": run.result.val_acc, "files": sorted(p.name for p in run.out.iterdir()),
            "counts": res.counts, "types": [type(run).__name__, type(res).__name__],
        }}, default=str))
        """
    )
    env = {**os.environ, "HYBRIDNAS_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["train_same"], out["diff"]
    assert out["search_same"], out["diff"]
    assert out["types"] == ["TrainRun", "SearchResult"]
    assert out["files"] == ["arch.yaml", "model.pt"] and 0 <= out["acc"] <= 1
    assert out["counts"]["ok"] == 2


def test_wheel_holds_one_top_level_package_with_the_examples_and_runs_outside_the_repo(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("hybridnas-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"hybridnas", f"hybridnas-{hybridnas.__version__}.dist-info"}
    assert "hybridnas/experiments/quickstart.yaml" in names and "hybridnas/runners/cli.py" in names
    assert "hybridnas/blocks/__init__.py" in names and "hybridnas/search_space/__init__.py" in names
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target), "HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "hybridnas.runners.cli"]
    space = subprocess.run(
        [*cmd, "space", "quickstart", "--samples", "1"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
    )
    assert space.returncode == 0, space.stderr
    assert space.stdout.startswith(f"{target / 'hybridnas' / 'experiments' / 'quickstart.yaml'}: valid")
    listed = subprocess.run([*cmd, "examples"], capture_output=True, text=True, cwd=elsewhere, env=env)
    assert listed.returncode == 0 and "quickstart" in listed.stdout and "ablation_mixer" in listed.stdout
    assert not any(elsewhere.iterdir())  # nothing written where it ran
