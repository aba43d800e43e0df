"""Pareto fronts: dominance and ranks against brute force, hypervolume against exact rectangle
unions, the reference policy, the knee on known fronts, and the files write_fronts leaves."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hybridnas.runners.pareto import (
    HypervolumeTracker,
    dominated_within_noise,
    feasible_table,
    front_table,
    hypervolume,
    knee,
    non_dominated,
    pareto_ranks,
    reference_point,
    show_measured_latency,
    write_fronts,
)

MODE_SETS = [
    ["min", "min"],
    ["max", "min"],
    ["max", "max"],
    ["min", "max", "min"],
    ["max", "min", "min"],
    ["max", "max", "min", "min"],
]


def _to_min(p, modes):
    return np.asarray(p, float) * np.array([-1.0 if m == "max" else 1.0 for m in modes])


def _brute_non_dominated(p, modes):
    q = _to_min(p, modes)
    n = len(q)
    out = np.ones(n, dtype=bool)
    for i in range(n):
        for j in range(n):
            if i != j and np.all(q[j] <= q[i]) and np.any(q[j] < q[i]):
                out[i] = False
                break
    return out


def _brute_ranks(p, modes):
    left = list(range(len(p)))
    ranks = np.full(len(p), -1)
    r = 0
    while left:
        mask = _brute_non_dominated(np.asarray(p)[left], modes)
        for k, i in enumerate(left):
            if mask[k]:
                ranks[i] = r
        left = [i for k, i in enumerate(left) if not mask[k]]
        r += 1
    return ranks


def _brute_hypervolume(p, modes, ref):
    """Exact volume of the union of the boxes [point, reference] (minimisation after negation), by
    compressing coordinates into a grid of cells and adding up the covered ones."""
    q = _to_min(p, modes)
    r = _to_min(np.asarray(ref, float)[None], modes)[0]
    q = q[np.all(q < r, axis=1)]
    if len(q) == 0:
        return 0.0
    axes = [np.unique(np.append(q[:, d], r[d])) for d in range(q.shape[1])]
    total = 0.0
    for cell in itertools.product(*[range(len(a) - 1) for a in axes]):
        lo = np.array([axes[d][c] for d, c in enumerate(cell)])
        if np.any(np.all(q <= lo, axis=1)):
            total += float(np.prod([axes[d][c + 1] - axes[d][c] for d, c in enumerate(cell)]))
    return total


@pytest.mark.parametrize("modes", MODE_SETS, ids=lambda m: "-".join(m))
@pytest.mark.parametrize("seed", range(4))
def test_non_dominated_and_ranks_match_brute_force_with_ties(modes, seed):
    rng = np.random.default_rng(seed)
    # Small integers make ties and exact duplicates common.
    p = rng.integers(0, 6, size=(int(rng.integers(1, 40)), len(modes))).astype(float)
    np.testing.assert_array_equal(non_dominated(p, modes), _brute_non_dominated(p, modes))
    np.testing.assert_array_equal(pareto_ranks(p, modes), _brute_ranks(p, modes))


def test_duplicates_of_a_front_point_are_all_on_the_front():
    p = np.array([[0.9, 10.0], [0.9, 10.0], [0.8, 5.0], [0.8, 20.0]])
    assert non_dominated(p, ["max", "min"]).tolist() == [True, True, True, False]
    assert pareto_ranks(p, ["max", "min"]).tolist() == [0, 0, 0, 1]


def test_rows_with_nan_are_never_on_the_front_and_dominate_nothing():
    p = np.array([[0.99, np.nan], [0.5, 10.0], [np.inf, 1.0]])
    assert non_dominated(p, ["max", "min"]).tolist() == [False, True, False]
    assert pareto_ranks(p, ["max", "min"]).tolist() == [-1, 0, -1]


def test_modes_are_validated():
    with pytest.raises(ValueError, match="mode"):
        non_dominated(np.zeros((2, 2)), ["max", "maximise"])
    with pytest.raises(ValueError, match="2 modes for 3"):
        non_dominated(np.zeros((2, 3)), ["max", "min"])


def test_hypervolume_of_a_staircase_equals_its_area():
    # min-min, reference (4, 4): columns of width 1 and heights 1, 2, 3.
    p = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
    assert hypervolume(p, ["min", "min"], [4.0, 4.0]) == pytest.approx(6.0)
    # The same front as accuracy (max) against MACs (min).
    acc = np.array([[0.5, 1.0], [0.7, 2.0], [0.9, 3.0]])
    assert hypervolume(acc, ["max", "min"], [0.0, 4.0]) == pytest.approx(0.5 * 3 + 0.2 * 2 + 0.2 * 1)
    # A point outside the reference box adds nothing; an empty set has volume 0.
    assert hypervolume(np.vstack([p, [5.0, 0.0]]), ["min", "min"], [4.0, 4.0]) == pytest.approx(6.0)
    assert hypervolume(np.zeros((0, 2)), ["min", "min"], [4.0, 4.0]) == 0.0


@pytest.mark.parametrize("modes", MODE_SETS[:5], ids=lambda m: "-".join(m))
@pytest.mark.parametrize("seed", range(3))
def test_hypervolume_matches_exact_union_of_boxes(modes, seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 12 if len(modes) == 2 else 7))
    p = rng.uniform(0, 10, size=(n, len(modes))).round(1)
    ref = np.array([0.0 if m == "max" else 10.0 for m in modes])
    assert hypervolume(p, modes, ref) == pytest.approx(_brute_hypervolume(p, modes, ref), rel=1e-9, abs=1e-9)


def test_reference_point_policy():
    objs = [("val_acc", "max"), ("macs", "min"), ("latency_ms", "min"), ("flops", "min")]
    first = {"val_acc": 0.5, "macs": 2e6, "latency_ms": 3.0, "flops": 4e6}
    ref = reference_point(objs, first, constraints={"macs": {"max": 5e7}})
    # val_acc at 0; macs at the constraint, flops = 2 x macs cap; latency 10x the first trial.
    np.testing.assert_allclose(ref, [0.0, 5e7, 30.0, 1e8])
    ref = reference_point(objs, first)
    np.testing.assert_allclose(ref, [0.0, 2e7, 30.0, 4e7])
    with pytest.raises(ValueError, match="latency_ms"):
        reference_point([("latency_ms", "min")], None)


@pytest.mark.parametrize("constraints", [None, {"macs": {"max": 3e6}}])
def test_hypervolume_per_step_never_decreases(constraints):
    rng = np.random.default_rng(7)
    tracker = HypervolumeTracker([("val_acc", "max"), ("macs", "min"), ("latency_ms", "min")], constraints)
    values = []
    for _ in range(40):
        values.append(
            tracker.add(
                {
                    "val_acc": float(rng.uniform(0.1, 1.0)),
                    "macs": float(rng.uniform(1e5, 2.9e6)),  # feasible under the cap
                    "latency_ms": float(rng.uniform(0.2, 4.0)),
                }
            )
        )
        if len(values) == 1:
            ref = tracker.reference.copy()
    np.testing.assert_array_equal(tracker.reference, ref)  # fixed at the first trial
    assert values[0] > 0
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[-1] > values[0]
    # A trial with a missing metric is counted as nothing, not as a crash.
    assert tracker.add({"val_acc": 0.99, "macs": math.nan, "latency_ms": 0.1}) == values[-1]


def test_knee_of_a_convex_quarter_circle_is_its_middle():
    t = np.linspace(0, np.pi / 2, 21)
    front = np.stack([1 - np.cos(t), 1 - np.sin(t)], axis=1)  # bulges towards the ideal (0, 0)
    dominated = front + 0.3
    pts = np.vstack([dominated, front])
    assert knee(pts, ["min", "min"]) == len(dominated) + 10
    # Units do not matter (per-objective normalisation) and max columns are handled by negation.
    scaled = pts * np.array([1e7, 1.0])
    assert knee(scaled, ["min", "min"]) == len(dominated) + 10
    flipped = pts * np.array([1.0, -1.0])
    assert knee(flipped, ["min", "max"]) == len(dominated) + 10


def test_knee_of_a_parabola_front_is_where_the_slope_is_minus_one():
    x = np.linspace(0, 1, 41)
    pts = np.stack([x, (1 - x) ** 2], axis=1)  # 1 - x - y is largest at x = 0.5
    assert knee(pts, ["min", "min"]) == 20


def test_knee_in_three_objectives_picks_the_point_towards_the_ideal():
    # Extremes on the unit simplex plus one point far below it: that point is the knee.
    pts = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.2, 0.2, 0.2], [0.4, 0.4, 0.1], [0.9, 0.9, 0.9]])
    assert knee(pts, ["min", "min", "min"]) == 3
    assert knee(pts[:1], ["min", "min", "min"]) == 0


def _trials(n=14, seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "trial": [str(i) for i in range(n)],
            "run_id": [f"run{i:04d}" for i in range(n)],
            "status": ["ok"] * n,
            "val_acc": rng.uniform(0.5, 0.99, n).round(4),
            "macs": rng.integers(200_000, 40_000_000, n),
            "params": rng.integers(5_000, 500_000, n),
            "latency_ms": rng.uniform(0.3, 5.0, n).round(3),
            "arch_summary": [f"conv x{1 + i % 2} c{16 * (1 + i % 3)} | acmix x1 c64 +ca" for i in range(n)],
        }
    )
    df.loc[3, "status"] = "failed"
    df.loc[5, "latency_ms"] = np.nan
    return df


def test_feasible_table_flags_the_front_and_drops_failed_and_incomplete_trials():
    df = _trials()
    objs = [("val_acc", "max"), ("macs", "min"), ("latency_ms", "min")]
    t = feasible_table(df, objs)
    assert set(t["trial"]) == set(df["trial"]) - {"3", "5"}
    ok = df[~df["trial"].isin(["3", "5"])]
    mask = _brute_non_dominated(ok[["val_acc", "macs", "latency_ms"]].to_numpy(float), ["max", "min", "min"])
    assert set(t.loc[t["pareto"], "trial"]) == set(ok["trial"][mask])
    assert (t.loc[t["pareto"], "rank"] == 0).all() and (t.loc[~t["pareto"], "rank"] > 0).all()
    assert t["rank"].is_monotonic_increasing
    table = front_table(df, objs)
    assert table.splitlines()[0].split()[:4] == ["trial", "val_acc", "macs", "latency_ms"]
    assert len(table.splitlines()) == 1 + int(mask.sum())


def test_write_fronts_writes_csv_markdown_png_per_pair_and_one_page_with_plotly_once(tmp_path):
    df = _trials()
    df["latency_ms_measured"] = np.nan
    df.loc[0, "latency_ms_measured"] = 123.456  # measured latency appears in the plots where it exists
    objs = [("val_acc", "max"), ("macs", "min"), ("latency_ms", "min")]
    paths = write_fronts(df, objs, tmp_path / "out", title="demo")
    names = [p.name for p in paths]
    assert names[0] == "pareto.csv"
    for a, b in [("val_acc", "macs"), ("val_acc", "latency_ms"), ("macs", "latency_ms")]:
        assert f"pareto_{a}_vs_{b}.png" in names
    assert (
        "front.md" in names
        and "fronts.html" in names
        and not [n for n in names if n.startswith("pareto_") and n.endswith(".html")]
    )
    assert len(paths) == 6 and all(p.exists() for p in paths)
    assert not list((tmp_path / "out").glob(".*tmp"))  # no temporary files left behind

    csv = pd.read_csv(paths[0])
    assert {"trial", "pareto", "rank", "val_acc", "macs", "latency_ms", "arch_summary"} <= set(csv.columns)
    assert len(csv) == len(df) - 2
    expected = feasible_table(df, objs)
    assert dict(zip(csv["trial"].astype(str), csv["pareto"])) == dict(
        zip(expected["trial"], expected["pareto"])
    )
    front = expected[expected["pareto"]]

    md = (tmp_path / "out" / "front.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| trial ")]
    assert len(rows) == len(front)  # one table row per front member, pipes in the summary escaped
    assert all(line.count(" | ") == md.splitlines()[2].count(" | ") for line in rows)
    assert "conv x2 c32 \\| acmix x1 c64 +ca" in md

    for p in paths:
        if p.suffix == ".png":
            img = np.asarray(Image.open(p).convert("RGB"))
            assert img.shape[0] > 100 and img.shape[1] > 100
            # Not blank: many distinct colours (grey trials, blue front, text).
            assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20 and img.std() > 5
    html = (tmp_path / "out" / "fronts.html").read_text().replace("\\u003c", "<").replace("\\u003e", ">")
    assert 'src="https://cdn' not in html and len(html) > 1_000_000  # plotly.js is embedded ...
    assert html.count("Plotly.newPlot(") == 3 and html.count("plotly.js v") == 1  # ... once, for 3 plots
    assert len(html) < 6_000_000
    for r in front.itertuples():
        assert f"trial {r.trial}<br>" in html
        assert json.dumps(float(r.val_acc)) in html  # the data itself
    assert "conv x2 c32 | acmix x1 c64 +ca" in html
    assert "predicted latency (front, latency measured end to end)" in html and "123.456" in html


def test_write_fronts_of_a_single_objective_writes_no_plots(tmp_path):
    paths = write_fronts(_trials(), [("val_acc", "max")], tmp_path)
    assert [p.name for p in paths] == ["pareto.csv", "front.md"]
    csv = pd.read_csv(paths[0])
    assert csv.loc[csv["pareto"], "val_acc"].tolist() == [csv["val_acc"].max()]


def _plotly_traces(html: str, figure: int = 0) -> list[dict]:
    """The traces of the page's ``figure``-th plot, as the page hands them to Plotly.newPlot."""
    start = -1
    for _ in range(figure + 1):
        start = html.index("Plotly.newPlot(", start + 1)
    start = html.index("[", html.index(",", start))
    traces, _ = json.JSONDecoder().raw_decode(html[start:])
    return traces


def _measured_trials():
    """Trials whose front was measured end to end after the search: 30 % slower than predicted."""
    df = _trials()
    objs = [("val_acc", "max"), ("macs", "min"), ("latency_ms", "min")]
    front = feasible_table(df, objs)
    on_front = set(front.loc[front["pareto"], "trial"])
    df["latency_ms_measured"] = [
        round(1.3 * lat, 4) if t in on_front else math.nan for t, lat in zip(df["trial"], df["latency_ms"])
    ]
    return df, objs, on_front


def test_csv_and_front_table_show_the_measured_latency_with_the_prediction_beside_it(tmp_path):
    df, objs, on_front = _measured_trials()
    [csv_path] = write_fronts(df, objs, tmp_path, plots=False)
    csv = pd.read_csv(csv_path, dtype={"trial": str})
    assert set(csv.loc[csv["pareto"], "trial"]) == on_front  # the front is the one the search chose
    predicted = dict(zip(df["trial"], df["latency_ms"]))
    for r in csv.itertuples():
        assert r.latency_ms_predicted == pytest.approx(predicted[r.trial])
        shown = 1.3 * predicted[r.trial] if r.trial in on_front else predicted[r.trial]
        assert r.latency_ms == pytest.approx(shown, rel=1e-3)
    assert list(csv.columns).index("latency_ms_predicted") == list(csv.columns).index("latency_ms") + 1
    lines = front_table(df, objs).splitlines()
    header = lines[0].split()
    assert header[:4] == ["trial", "val_acc", "macs", "latency_ms"] and "latency_ms_predicted" in header
    for line in lines[1:]:
        cells = dict(zip(header, line.split()))
        assert float(cells["latency_ms"]) == pytest.approx(
            1.3 * float(cells["latency_ms_predicted"]), abs=2e-3
        )


def test_plots_put_measured_trials_at_their_measurement_and_draw_the_prediction_beside(tmp_path):
    df, objs, on_front = _measured_trials()
    write_fronts(df, objs, tmp_path)
    traces = _plotly_traces((tmp_path / "fronts.html").read_text(), figure=1)  # val_acc vs latency_ms
    everyone, predicted = traces[0], next(t for t in traces if t["name"].startswith("predicted latency"))
    shown = show_measured_latency(feasible_table(df, objs))
    assert everyone["x"] == pytest.approx(shown["latency_ms"].tolist())
    front_rows = shown[shown["trial"].isin(on_front)]
    assert sorted(predicted["x"]) == pytest.approx(sorted(front_rows["latency_ms_predicted"]))
    assert sorted(predicted["y"]) == pytest.approx(sorted(front_rows["val_acc"]))
    # Without measurements nothing moves and no prediction marks are drawn.
    write_fronts(_trials(), objs, tmp_path / "plain")
    plain = _plotly_traces((tmp_path / "plain" / "fronts.html").read_text(), figure=1)
    assert not any(t["name"].startswith("predicted latency") for t in plain)


def test_showing_the_measured_latency_twice_changes_nothing():
    df, objs, _ = _measured_trials()
    once = show_measured_latency(feasible_table(df, objs))
    pd.testing.assert_frame_equal(show_measured_latency(once), once)


@pytest.mark.parametrize("modes", MODE_SETS, ids=lambda m: "-".join(m))
def test_dominated_within_noise_is_plain_dominance_without_error_bars(modes):
    p = np.random.default_rng(len(modes)).integers(0, 4, (25, len(modes))).astype(float)
    assert (dominated_within_noise(p, np.zeros_like(p), modes) == ~_brute_non_dominated(p, modes)).all()


def test_a_front_member_whose_accuracy_edge_is_inside_seed_noise_is_marked():
    # val_acc (max) +- sd, macs (min) exact: b is cheaper, a is more accurate by less than the bars.
    points = [[0.950, 2e6], [0.945, 1e6], [0.900, 0.5e6]]
    sd = [[0.004, 0], [0.003, 0], [0.003, 0]]
    marked = dominated_within_noise(points, sd, ["max", "min"])
    assert marked.tolist() == [True, False, False]
    # Tighter bars: a's edge is real, nobody is marked.
    assert not dominated_within_noise(points, np.array(sd) / 10, ["max", "min"]).any()
    # Members tied in every objective mark neither.
    assert not dominated_within_noise([[0.9, 1e6], [0.9, 1e6]], [[0.01, 0], [0.01, 0]], ["max", "min"]).any()
