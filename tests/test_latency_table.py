"""runners.latency_table: the cached per-unit table, its file, units, and predictions from it."""

from __future__ import annotations

import json
import math
import multiprocessing
from pathlib import Path

import pytest

from hybridnas.runners.latency import LatencyContext
from hybridnas.runners.latency_table import (
    TABLE_FORMAT,
    CacheWarning,
    LatencyTable,
    default_table_path,
    measure_in_context,
    missing_units,
    predict_latency,
    spec_units,
    unit_latencies,
)


def test_table_round_trips_through_its_file(tmp_path):
    path = tmp_path / "sub" / "latency.json"
    table = LatencyTable(path)
    table.put("a", {"ms": 1.5, "runs": 20})
    table.save()
    again = LatencyTable(path)
    assert again.get("a") == {"ms": 1.5, "runs": 20} and len(again) == 1
    assert [p.name for p in path.parent.iterdir() if p.suffix == ".json"] == ["latency.json"]  # no temp left


def test_table_save_keeps_entries_other_writers_saved_meanwhile(tmp_path):
    path = tmp_path / "latency.json"
    first, second = LatencyTable(path), LatencyTable(path)
    first.put("a", {"ms": 1.0})
    second.put("b", {"ms": 2.0})
    first.save()
    second.save()
    assert {k for k in ("a", "b") if k in LatencyTable(path)} == {"a", "b"}


def _write_keys(path: str, worker: int) -> None:
    for i in range(15):
        table = LatencyTable(path)
        table.put(f"w{worker}-{i}", {"ms": float(i)})
        table.save()


def test_concurrent_processes_never_lose_or_corrupt_entries(tmp_path):
    path = str(tmp_path / "latency.json")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_keys, args=(path, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    data = json.loads(Path(path).read_text())
    assert len(data["entries"]) == 4 * 15


def test_an_unreadable_table_file_is_measured_afresh_not_fatal(tmp_path):
    path = tmp_path / "latency.json"
    path.write_text("{not json")
    with pytest.warns(CacheWarning, match="not a JSON file.*set aside"):
        table = LatencyTable(path)
    assert len(table) == 0
    table.put("a", {"ms": 1.0})
    table.save()
    assert LatencyTable(path).get("a") == {"ms": 1.0}


def test_table_rejects_an_entry_without_finite_ms(tmp_path):
    with pytest.raises(ValueError, match="ms"):
        LatencyTable(tmp_path / "t.json").put("a", {"ms": float("nan")})


def test_default_table_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("HYBRIDNAS_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_table_path() == tmp_path / "xdg" / "hybridnas" / "latency.json"
    monkeypatch.setenv("HYBRIDNAS_CACHE_DIR", str(tmp_path / "mine"))
    assert default_table_path() == tmp_path / "mine" / "latency.json"


def test_spec_units_cover_stem_downsamples_every_block_and_head(tiny_spec):
    units = spec_units(tiny_spec)
    assert [u.module for u in units] == [
        "stem",
        "stages.0.blocks.0",  # same width, no downsample: no downsample unit
        "stages.1.downsample",
        "stages.1.blocks.0",
        "stages.1.blocks.1",
        "head",
    ]
    # A shifted_window stage of depth 2 is a (W, SW) pair: two different blocks, two different keys.
    assert units[3].key.startswith("block|window|") and units[4].key.startswith("block|shifted_window|")
    assert units[2].input_shape == (1, 4, 8, 8) and units[3].input_shape == (1, 8, 4, 4)
    assert all(u.input_shape[0] == 3 for u in spec_units(tiny_spec, batch_size=3))


def test_unit_keys_resolve_default_options(tiny_spec):
    explicit = tiny_spec.replace_path("stages.0.options.kernel", 3)
    assert [u.key for u in spec_units(explicit)] == [u.key for u in spec_units(tiny_spec)]


def test_predict_latency_measures_once_and_sums_units_plus_overhead(tiny_spec, tmp_path):
    table = LatencyTable(tmp_path / "latency.json")
    rows = unit_latencies(tiny_spec, table)
    assert rows[-1]["unit"] == "overhead" and len(rows) == len(spec_units(tiny_spec)) + 1
    assert all(math.isfinite(r["ms"]) for r in rows) and all(r["ms"] > 0 for r in rows[:-1])
    n, mtime = len(table), (tmp_path / "latency.json").stat().st_mtime_ns
    predicted = predict_latency(tiny_spec, table)
    assert predicted == pytest.approx(sum(r["ms"] for r in rows)) and predicted > 0
    assert len(table) == n and (tmp_path / "latency.json").stat().st_mtime_ns == mtime  # nothing re-measured
    assert missing_units(tiny_spec, table) == []


def test_table_keys_differ_by_threads_batch_dtype_and_clock(tiny_spec, tmp_path):
    table = LatencyTable(tmp_path / "latency.json")
    predict_latency(tiny_spec, table)  # threads=1, batch 1, float32, auto clock (cpu here)
    assert not missing_units(tiny_spec, table)
    n_units = len(spec_units(tiny_spec))
    for other in ({"threads": 2}, {"batch_size": 2}, {"dtype": "bfloat16"}, {"clock": "wall"}):
        # Nothing measured in another context counts for it: every unit is missing there.
        assert len(missing_units(tiny_spec, table, LatencyContext(**other))) == n_units
    predict_latency(tiny_spec, table, LatencyContext(dtype="bfloat16"))
    assert not missing_units(tiny_spec, table, LatencyContext(dtype="bfloat16"))
    assert len(missing_units(tiny_spec, table, LatencyContext(threads=2))) == n_units


def test_predict_latency_without_a_table_uses_the_cache_dir(tiny_spec, tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDNAS_CACHE_DIR", str(tmp_path))
    assert predict_latency(tiny_spec) > 0
    assert len(LatencyTable(tmp_path / "latency.json")) == len({u.key for u in spec_units(tiny_spec)}) + 1


def test_measure_in_context_times_every_unit_inside_the_network(tiny_spec):
    out = measure_in_context(tiny_spec, runs=20, budget_s=0.0)
    keys = {u.key for u in spec_units(tiny_spec)}
    assert set(out["units"]) == set(out["samples"]) == keys
    assert all(len(t) >= 20 and min(t) > 0 for t in out["samples"].values())
    assert all(math.isfinite(ms) and ms > 0 for ms in out["units"].values())
    assert out["total"]["runs"] >= 20 and math.isfinite(out["overhead_ms"])
    # The units add up to the network: what is left over is a small part of a pass.
    assert sum(out["units"][u.key] for u in spec_units(tiny_spec)) + out["overhead_ms"] == pytest.approx(
        out["total"]["median_ms"]
    )


@pytest.mark.parametrize(
    "content,reason",
    [
        (
            {"format": 1, "entries": {"a": {"ms": 1.0}}},
            "format 1, and this version of hybridnas reads format",
        ),
        (
            {"format": TABLE_FORMAT, "entries": {"a": {"ms": 1.0}, "b": {"ms": "fast"}}},
            "entry 'b' has no finite",
        ),
        ({"format": TABLE_FORMAT, "rows": []}, "not a latency table"),
    ],
)
def test_a_table_of_another_format_or_with_a_bad_entry_is_set_aside_whole(tmp_path, content, reason):
    path = tmp_path / "latency.json"
    path.write_text(json.dumps(content))
    with pytest.warns(CacheWarning) as caught:
        table = LatencyTable(path)
    assert len(caught) == 1 and reason in str(caught[0].message)
    assert len(table) == 0  # never half-read: not even the good entry "a"
    aside = list(tmp_path.glob("latency.json.bad-*"))
    assert len(aside) == 1 and json.loads(aside[0].read_text()) == content and not path.exists()
    table.put("c", {"ms": 2.0})
    table.save()
    assert LatencyTable(path).get("c") == {"ms": 2.0}  # a fresh, good file in its place


def test_remove_deletes_entries_from_the_file_and_keeps_the_others(tmp_path):
    path = tmp_path / "latency.json"
    table = LatencyTable(path)
    for k in "abc":
        table.put(k, {"ms": 1.0})
    table.save()
    assert table.remove({"a", "b", "zz"}) == 2
    assert "a" not in table and {k for k, _ in LatencyTable(path).items()} == {"c"}


def test_measured_entries_carry_the_time_they_were_measured(tiny_spec, tmp_path):
    import time

    t0 = time.time()
    table = LatencyTable(tmp_path / "latency.json")
    unit_latencies(tiny_spec, table)
    assert all(t0 <= e["at"] <= time.time() for _, e in table.items())
