"""`hybridnas bench latency`: the latency table's predictions against end-to-end measurements.

These check what the benchmark computes and prints, never how fast anything is.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hybridnas.runners.bench import latency as bench
from hybridnas.runners.bench.load import MEMORY_BUFFER, busy_load
from hybridnas.runners.calibration import NoiseLimits
from hybridnas.runners.machine import machine_line
from hybridnas.search_space import Experiment
from hybridnas.search_space.errors import SpecError

REPO = Path(__file__).resolve().parents[1]
ANY_MACHINE = NoiseLimits(noise=math.inf, tail=math.inf, refit=0.0)  # this test is not about noise

TINY_EXPERIMENT = """
name: tiny_latency
data: {dataset: digits}
space:
  stem: {channels: [4, 8]}
  stages:
    - {mixer: [conv, window], depth: 1, channels: 8, downsample: none}
    - {mixer: conv, depth: 1, channels: [8, 16], downsample: conv}
  mixer_options:
    window: {window: [2], heads: [2]}
latency: {device: cpu, batch_size: 1, threads: 1}
"""


@pytest.fixture
def experiment_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_EXPERIMENT)
    return path


def test_sampled_architectures_are_distinct_and_respect_exclusions(experiment_file):
    exp = Experiment.from_yaml(experiment_file)
    first = bench.sample_architectures(exp.space, exp.input, 3, seed=0)
    hashes = [s.arch_hash() for s in first]
    assert len(set(hashes)) == 3
    rest = bench.sample_architectures(exp.space, exp.input, 50, seed=1, exclude=set(hashes))
    assert not {s.arch_hash() for s in rest} & set(hashes)
    assert len(rest) == exp.space.size() - 3  # a small space runs out instead of looping forever


def test_test_architectures_are_predicted_from_other_architectures_measurements(experiment_file):
    exp = Experiment.from_yaml(experiment_file)
    rows = bench.evaluate(exp, samples=2, runs=20, clock="wall", limits=ANY_MACHINE)
    assert len(rows) == 2
    for r in rows:
        # Every unit of this space also occurs in some other architecture, so nothing was measured in
        # the test architecture's own context: the prediction is a pure table lookup.
        assert r["lookup"]
        for key in ("predicted_ms", "measured_ms", "remeasured_ms"):
            assert math.isfinite(r[key]) and r[key] > 0
        assert r["error"] == pytest.approx((r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"])
        assert r["unfit_error"] == pytest.approx((r["unfit_ms"] - r["measured_ms"]) / r["measured_ms"])
    cal = rows[0]["calibration"]
    # The tiny space has 8 architectures: 2 under test, the other 6 calibrate (too few to refit).
    assert cal["timed"] == 6 and cal["fit"] == {"archs": 6} and cal["measured"] == cal["units"]
    s = bench.summarize(rows)
    assert s["n"] == 2 and s["n_lookup"] == 2 and 0.0 <= s["within_10"] <= 1.0


def test_summary_counts_errors_within_ten_percent():
    rows = [
        {"error": e, "lookup": look, "remeasure_diff": d}
        for e, look, d in [(0.05, True, 0.0), (-0.09, True, 0.2), (0.3, False, -0.01), (-0.2, True, 0.02)]
    ]
    s = bench.summarize(rows)
    assert s["within_10"] == 0.5 and s["median_error"] == pytest.approx(0.145)
    assert s["n_lookup"] == 3 and s["lookup_within_10"] == pytest.approx(2 / 3)
    assert s["remeasure_within_10"] == 0.75


def test_main_prints_share_within_10_percent_and_median_error_per_clock(experiment_file, capsys):
    rc = bench.main(argparse.Namespace(experiment=str(experiment_file), samples=1, quick=True, load=0))
    out = capsys.readouterr().out
    assert rc == 0
    assert out.splitlines()[0] == machine_line()  # which machine, before anything is measured
    summaries = re.findall(r"^(wall|cpu): (\d+)% of 1 within 10% .*median \|error\| ([\d.]+)%", out, re.M)
    assert [s[0] for s in summaries] == ["wall", "cpu"]
    assert "noise floor" in out


def test_default_experiment_is_the_quickstart(monkeypatch):
    monkeypatch.chdir(REPO)
    assert bench._experiment_path(None) == Path("experiments") / "quickstart.yaml"


def test_bad_sample_count_is_a_user_error(experiment_file):
    with pytest.raises(SpecError, match="samples"):
        bench.main(argparse.Namespace(experiment=str(experiment_file), samples=-1, quick=False))


def test_main_with_load_prints_quiet_and_loaded_scores_side_by_side_and_ends_the_load(
    experiment_file, capsys
):
    rc = bench.main(argparse.Namespace(experiment=str(experiment_file), samples=1, quick=True, load=1))
    out = capsys.readouterr().out
    assert rc == 0 and not multiprocessing.active_children()  # the busy processes are gone
    assert "under load: 1 busy processes (cpu) started" in out and "load ended (1 processes stopped)" in out
    assert re.search(r"^(wall|cpu) under load 1: \d+% of 1 within 10% of the quiet times", out, re.M)
    table = out[out.index("side by side") :].splitlines()[1:]
    assert table[0].split() == [
        "clock",
        "quiet",
        "noise",
        "floor",
        "calibration",
        "load",
        "1",
        "noise",
        "floor",
        "calibration",
    ]
    rows = {ln.split()[0]: ln for ln in table[1:] if ln.strip() and not ln.startswith("machine")}
    assert set(rows) == {"wall", "cpu"} and "(default)" in rows["cpu"]  # one CPU thread: cpu is the default
    for ln in rows.values():
        assert len(re.findall(r"\d+%", ln)) >= 4 and ln.count("calibrated") == 2


def test_bad_load_is_a_user_error(experiment_file):
    with pytest.raises(SpecError, match="load"):
        bench.main(argparse.Namespace(experiment=str(experiment_file), samples=1, quick=True, load=-1))


def test_bad_load_kind_is_a_user_error_naming_the_kinds(experiment_file):
    with pytest.raises(SpecError, match=r"--load-kind.*cpu, memory.*'disk'"):
        bench.main(
            argparse.Namespace(
                experiment=str(experiment_file), samples=1, quick=True, load=1, load_kind="disk"
            )
        )
    with pytest.raises(ValueError, match="kind"):
        with busy_load(1, 10, kind="disk"):
            pass
    assert not multiprocessing.active_children()


def test_memory_load_streams_through_a_buffer_beyond_the_caches_and_ends_with_the_block():
    with busy_load(2, 60, kind="memory") as procs:
        deadline = time.monotonic() + 20
        rss = [0, 0]
        while time.monotonic() < deadline and min(rss) < 2 * MEMORY_BUFFER:
            rss = [_rss(p.pid) for p in procs]
            time.sleep(0.1)
        assert min(rss) >= 2 * MEMORY_BUFFER  # both buffers touched: each process streams 128 MiB
        assert all(p.is_alive() for p in procs)
    assert not any(p.is_alive() for p in procs) and not multiprocessing.active_children()


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_busy_load_runs_its_processes_for_the_block_only_even_when_the_block_fails():
    with pytest.raises(RuntimeError, match="inside"):
        with busy_load(2, 60) as procs:
            assert len(procs) == 2 and all(p.is_alive() for p in procs)
            raise RuntimeError("inside")
    assert not any(p.is_alive() for p in procs) and not multiprocessing.active_children()


def test_busy_processes_die_with_a_parent_that_is_killed(tmp_path):
    # A parent killed outright runs no cleanup: its busy processes must still not outlive it.
    script = (
        "import os, sys, time\n"
        "from hybridnas.runners.bench.load import MEMORY_BUFFER, busy_load\n"
        "with busy_load(2, 120) as procs:\n"
        "    print(' '.join(str(p.pid) for p in procs), flush=True)\n"
        "    time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2
    parent.kill()
    parent.wait(10)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's reaping is missing
