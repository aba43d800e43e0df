"""`hybridnas cache`: what the latency cache holds (machines, quality, age) and clearing it."""

from __future__ import annotations

import json
import math

import pytest

from hybridnas.runners.cache import CacheError, cache_report, clear_cache
from hybridnas.runners.calibration import NoiseLimits, calibrate_latency, space_marker
from hybridnas.runners.cli import main as cli
from hybridnas.runners.latency import LatencyContext
from hybridnas.runners.latency_table import LatencyTable
from hybridnas.search_space import Experiment

ANY_MACHINE = NoiseLimits(noise=math.inf, tail=math.inf, refit=0.0)  # not about noise: no machine fails these

SPACE = """
name: {name}
data: {{dataset: digits}}
space:
  stem: {{channels: [4, 8]}}
  stages:
    - {{mixer: conv, depth: 1, channels: 8, downsample: none}}
    - {{mixer: conv, depth: 1, channels: [{width}], downsample: conv}}
latency: {{device: cpu, batch_size: 1, threads: 1}}
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache dir holding two calibrated spaces that share their first stage's units."""
    monkeypatch.setenv("HYBRIDNAS_CACHE_DIR", str(tmp_path / "cache"))
    spaces = {}
    for name, width in (("alpha", "8, 16"), ("beta", "24")):
        path = tmp_path / f"{name}.yaml"
        path.write_text(SPACE.format(name=name, width=width))
        exp = Experiment.from_yaml(path)
        ctx = LatencyContext.from_config(exp.latency)
        calibrate_latency(exp.space, exp.input, ctx, name=name, limits=ANY_MACHINE)
        spaces[name] = (exp, ctx)
    return tmp_path / "cache" / "latency.json", spaces


def test_report_lists_each_machine_context_with_its_spaces_quality_and_age(cache):
    path, spaces = cache
    report = cache_report()
    assert report["path"] == str(path) and report["bytes"] == path.stat().st_size > 0
    [ctx] = report["contexts"]
    assert ctx["machine"].startswith("cpu:") and (ctx["threads"], ctx["batch"], ctx["clock"]) == (
        "1",
        "1",
        "cpu",
    )
    assert ctx["current"] and ctx["units"] > 0 and ctx["archs"] > 0 and ctx["noisy"] == 0
    assert 0 <= ctx["age_s"] < 600
    assert {s["name"] for s in ctx["spaces"]} == {"alpha", "beta"}
    for s in ctx["spaces"]:
        assert s["calibrated"] and s["quality"]["noise"] is not None and 0 <= s["age_s"] < 600


def test_cli_cache_prints_the_table_and_each_space(cache, capsys):
    assert cli(["cache"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("latency cache: ") and out[1].split()[:5] == [
        "machine",
        "threads",
        "batch",
        "dtype",
        "clock",
    ]
    spaces = [ln.strip() for ln in out if ln.strip().startswith("space ")]
    assert len(spaces) == 2 and all(": calibrated (noise " in ln and ln.endswith(" ago") for ln in spaces)


def test_clearing_one_space_drops_its_record_and_entries_and_keeps_the_others(cache):
    path, spaces = cache
    exp_a, ctx = spaces["alpha"]
    exp_b, _ = spaces["beta"]
    before = {k for k, _ in LatencyTable(path).items()}
    res = clear_cache(space="alpha")
    after = {k for k, _ in LatencyTable(path).items()}
    assert res["spaces"][0] == "alpha" and res["entries"] == len(before - after) > 1
    assert space_marker(exp_a.space, exp_a.input, ctx) not in after
    # alpha's wide second stage is gone; beta (which shares the first stage) lost its record too
    # when a shared entry went, so its next search measures what is missing.
    assert not any("c=16" in k for k in after)
    assert ("beta" in res["spaces"]) == (space_marker(exp_b.space, exp_b.input, ctx) not in after)
    rerun = calibrate_latency(exp_a.space, exp_a.input, ctx, name="alpha", limits=ANY_MACHINE)
    assert rerun["measured"] > 0  # measured again after the clear


def test_clearing_everything_removes_the_file_and_set_aside_copies(cache, capsys):
    path, _ = cache
    (path.parent / "latency.json.bad-20260101-000000-1").write_text("{")
    assert cli(["cache", "clear"]) == 0
    assert "removed the latency cache" in capsys.readouterr().out
    assert {p.name for p in path.parent.iterdir()} <= {"latency.json.lock"}  # the empty lock file may stay
    assert cli(["cache", "clear"]) == 0 and "empty" in capsys.readouterr().out


def test_an_unknown_space_name_exits_2_naming_the_spaces_held(cache, capsys):
    assert cli(["cache", "clear", "--space", "alpah"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no calibrated space named 'alpah'" in err
    assert "alpha, beta" in err and "did you mean 'alpha'" in err
    with pytest.raises(CacheError):
        clear_cache(space="gamma")


def test_a_corrupt_cache_file_is_reported_once_and_set_aside(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HYBRIDNAS_CACHE_DIR", str(tmp_path))
    (tmp_path / "latency.json").write_text(json.dumps({"format": 1, "entries": {}}))
    assert cli(["cache"]) == 0
    captured = capsys.readouterr()
    [warning] = captured.err.strip().splitlines()
    assert warning.startswith("hybridnas: warning: latency table ") and "format 1" in warning
    assert "set aside" in captured.out and "(empty)" in captured.out.splitlines()[0]
    assert not (tmp_path / "latency.json").exists() and len(list(tmp_path.glob("latency.json.bad-*"))) == 1
