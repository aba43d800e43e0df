"""runners.measure: MAC counting (what FlopCounterMode misses, no double counting), params, latency."""

from __future__ import annotations

import json
import math
import multiprocessing
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hybridnas.runners.measure import (
    MIN_FIT_ARCHS,
    LatencyTable,
    MeasureError,
    _context_key,
    calibrate_table,
    custom_flop_mapping,
    default_table_path,
    fit_table,
    latency,
    measure_in_context,
    missing_units,
    predict_latency,
    profile,
    profile_spec,
    spec_units,
    unit_latencies,
)


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def heads_of(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, heads, HW, C/heads)."""
    b, c, h, w = x.shape
    return x.flatten(2).transpose(1, 2).reshape(b, h * w, heads, c // heads).transpose(1, 2)


def test_linear_and_conv_net_matches_hand_count():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 9 * 3 * 8 * 10*10
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4),  # 9 * 2 * 8 * 5*5
        nn.Conv2d(8, 16, 1, bias=False),  # 8 * 16 * 5*5
        nn.Flatten(),
        nn.Linear(16 * 25, 10),  # 400 * 10
    )
    expected = 9 * 3 * 8 * 100 + 9 * 2 * 8 * 25 + 8 * 16 * 25 + 400 * 10
    out = profile(net, (3, 10, 10))
    assert out["macs"] == expected
    assert out["flops"] == 2 * expected
    assert out["params"] == sum(p.numel() for p in net.parameters())


def test_batch_dimension_scales_macs_linearly():
    net = nn.Conv2d(2, 4, 3, padding=1)
    assert profile(net, (3, 2, 6, 6))["macs"] == 3 * profile(net, (2, 6, 6))["macs"]


def sdpa_net(heads: int, mask: bool = False) -> nn.Module:
    def fn(x):
        q = heads_of(x, heads)
        m = torch.zeros(q.shape[-2], q.shape[-2]) if mask else None
        return F.scaled_dot_product_attention(q, q, q, attn_mask=m)

    return Lambda(fn)


@pytest.mark.parametrize("mask", [False, True])
def test_sdpa_is_counted_on_cpu(mask):
    # FlopCounterMode alone counts the CPU flash kernel as zero; QK^T and AV = 2 * B*h*L^2*d MACs.
    c, h, w, heads = 8, 3, 5, 2
    L, d = h * w, c // heads
    assert profile(sdpa_net(heads, mask), (c, h, w))["macs"] == 2 * heads * L * L * d


def test_plain_flop_counter_misses_cpu_sdpa():
    # Why the custom formulas exist: if this starts failing, torch counts SDPA itself and ours must
    # not be added on top (ours replaces the registry entry, so it still would not double count).
    q = torch.randn(1, 2, 6, 4)
    with torch.no_grad(), FlopCounterMode(display=False) as plain:
        F.scaled_dot_product_attention(q, q, q)
    assert plain.get_total_flops() == 0


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "grad"])
def test_sdpa_count_does_not_depend_on_autograd_mode(context):
    # Under inference_mode the top-level op reaches the counter undecomposed, under no_grad the CPU
    # flash kernel does, with grad enabled autograd's pieces: each counted exactly once.
    q = torch.randn(2, 3, 7, 4, requires_grad=context == "grad")
    k = torch.randn(2, 3, 5, 4)
    v = torch.randn(2, 3, 5, 6)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}[
        context
    ]
    with ctx(), FlopCounterMode(display=False, custom_mapping=custom_flop_mapping()) as fc:
        F.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(7, 5))
    assert fc.get_total_flops() == 2 * (2 * 3 * 7 * 5 * (4 + 6))


def test_einsum_is_counted_once_and_equals_matmul():
    a = torch.randn(2, 3, 7, 4)
    b = torch.randn(2, 3, 5, 4)

    def count(fn):
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=custom_flop_mapping()) as fc:
            fn()
        return fc.get_total_flops() // 2

    by_einsum = count(lambda: torch.einsum("bhqd,bhkd->bhqk", a, b))
    by_matmul = count(lambda: a @ b.transpose(-1, -2))
    assert by_einsum == by_matmul == 2 * 3 * 7 * 5 * 4


def test_elementwise_tensor_products_are_counted_and_scalar_rescales_are_not():
    def fn(x):
        y = x * x  # counted: numel
        y = y * 0.5  # Python scalar: free
        y = y * torch.ones(1)  # one-element tensor (a mixing rate): free
        y = y * x.mean(dim=1, keepdim=True)  # broadcast tensor x tensor: numel(out)
        return y

    c, h, w = 4, 3, 5
    assert profile(Lambda(fn), (c, h, w))["macs"] == 2 * c * h * w


def test_local_attention_written_as_mul_then_sum_is_counted():
    # "q * K then sum" (Slide/ACmix style): logits C*k^2*HW, aggregation C*k^2*HW.
    c, h, w, k = 4, 6, 5, 3

    def fn(x):
        keys = F.unfold(x, k, padding=k // 2).view(1, c, k * k, h, w)  # unfold itself is free
        logits = (x.unsqueeze(2) * keys).sum(1, keepdim=True)  # (1, 1, k^2, h, w)
        return (logits.softmax(2) * keys).sum(2)

    assert profile(Lambda(fn), (c, h, w))["macs"] == 2 * c * k * k * h * w


def test_params_count_frozen_parameters_and_shared_ones_once_but_not_buffers():
    lin = nn.Linear(4, 4)
    net = nn.Sequential(lin, lin, nn.BatchNorm1d(4))  # shared layer; BN: 8 params + 2 running buffers
    frozen = nn.Conv2d(4, 4, 1, bias=False).requires_grad_(False)  # like Slide's fixed shift conv
    model = nn.ModuleDict({"net": net, "frozen": frozen})
    model.forward = lambda x: frozen(net(x.flatten(1)).view(1, 4, 1, 1))
    assert profile(model, (4, 1, 1))["params"] == 20 + 8 + 16


def test_profile_restores_training_mode_and_leaves_the_global_rng_alone():
    net = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Dropout(0.5))
    net.train()
    net[1].eval()
    state = torch.random.get_rng_state()
    profile(net, (2, 5, 5))
    assert torch.equal(state, torch.random.get_rng_state())
    assert net.training and net[0].training and not net[1].training


def test_profile_rejects_a_bad_input_size():
    with pytest.raises(ValueError, match="input_size"):
        profile(nn.Identity(), (3, 4))


def test_latency_returns_finite_positive_numbers_from_at_least_20_runs():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    out = latency(net, (1, 12, 12), runs=20, warmup=2)
    assert out["runs"] >= 20
    for key in ("median_ms", "p10_ms", "p90_ms"):
        assert math.isfinite(out[key]) and out[key] > 0
    assert out["p10_ms"] <= out["median_ms"] <= out["p90_ms"]


def test_latency_restores_threads_and_training_mode():
    before = torch.get_num_threads()
    net = nn.Conv2d(1, 1, 3)
    net.train()
    latency(net, (1, 6, 6), threads=2, runs=20, warmup=0)
    assert torch.get_num_threads() == before
    assert net.training


@pytest.mark.parametrize("dtype", ["bfloat16", torch.bfloat16, None, "float32"])
def test_latency_runs_in_reduced_precision(dtype):
    out = latency(nn.Conv2d(2, 2, 3), (2, 6, 6), batch_size=2, runs=20, warmup=1, dtype=dtype)
    assert out["median_ms"] > 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"runs": 5}, "runs"),
        ({"dtype": "int8"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"threads": 0}, "threads"),
    ],
)
def test_latency_rejects_bad_requests_with_a_user_error(kwargs, match):
    with pytest.raises(MeasureError, match=match):
        latency(nn.Identity(), (1, 2, 2), **kwargs)


def test_latency_on_cuda_times_a_copy_or_says_cuda_is_missing():
    # One test for both kinds of machine (no skips): with CUDA the caller's model stays on the CPU,
    # without it the request is a user error that names CUDA.
    net = nn.Conv2d(1, 2, 3)
    if torch.cuda.is_available():
        out = latency(net, (1, 8, 8), device="cuda", runs=20)
        assert out["median_ms"] > 0 and next(net.parameters()).device.type == "cpu"
    else:
        with pytest.raises(MeasureError, match="CUDA"):
            latency(net, (1, 8, 8), device="cuda")


# ---- latency lookup table -------------------------------------------------------------------------

TINY = """
input: {channels: 1, size: 8, classes: 3}
stem: {channels: 4}
stages:
  - {mixer: conv, depth: 1, channels: 4}
  - {mixer: shifted_window, depth: 2, channels: 8, downsample: conv, addon: gc, options: {heads: 2, window: 2}}
"""


@pytest.fixture
def tiny_spec():
    from hybridnas.search_space.spec import ArchSpec

    return ArchSpec.from_yaml(TINY)


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
    predict_latency(tiny_spec, table)  # threads=1, batch 1, float32, wall clock
    assert not missing_units(tiny_spec, table)
    n_units = len(spec_units(tiny_spec))
    for other in ({"threads": 2}, {"batch_size": 2}, {"dtype": "bfloat16"}, {"clock": "cpu"}):
        # Nothing measured in another context counts for it: every unit is missing there.
        assert len(missing_units(tiny_spec, table, **other)) == n_units
    predict_latency(tiny_spec, table, dtype="bfloat16")
    assert not missing_units(tiny_spec, table, dtype="bfloat16")
    assert len(missing_units(tiny_spec, table, threads=2)) == n_units


def test_predict_latency_without_a_table_uses_the_cache_dir(tiny_spec, tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDNAS_CACHE_DIR", str(tmp_path))
    assert predict_latency(tiny_spec) > 0
    assert len(LatencyTable(tmp_path / "latency.json")) == len({u.key for u in spec_units(tiny_spec)}) + 1


def _synthetic_context_table(tmp_path, n_archs, seed=0):
    """A table whose in-context unit times are off by up to +-25 % (as context effects make them),
    plus ``n_archs`` end-to-end entries that are exact sums of the true times."""
    import random

    rng = random.Random(seed)
    ctx = _context_key(torch.device("cpu"), 1, 1, torch.float32, "wall")
    true = {f"u{i}": rng.uniform(0.05, 0.5) for i in range(8)}
    true_overhead = 0.03
    table = LatencyTable(tmp_path / "t.json")
    for u, t in true.items():
        table.put(f"{ctx}||{u}", {"ms": t * rng.uniform(0.75, 1.25)})
    table.put(f"{ctx}||overhead", {"ms": 0.0, "samples": [0.0]})
    table.put(f"{ctx}||lonely", {"ms": 7.0})  # in no timed architecture: the refit leaves it alone

    def arch():
        return [rng.choice(list(true)) for _ in range(rng.randint(2, 6))]

    for i in range(n_archs):
        units = arch()
        table.put(f"{ctx}||arch|a{i}", {"ms": sum(true[u] for u in units) + true_overhead, "units": units})
    return table, ctx, true, true_overhead, arch


def test_refit_makes_the_table_predict_end_to_end_times_it_never_saw(tmp_path):
    table, ctx, true, true_overhead, arch = _synthetic_context_table(tmp_path, 60)
    before = {u: table.get(f"{ctx}||{u}")["ms"] for u in true}
    fit = fit_table(table)
    assert (
        fit["archs"] == 60 and fit["units"] == len(true) and fit["within_10_after"] >= fit["within_10_before"]
    )
    for _ in range(50):  # new combinations: the refit entries add up to the truth
        units = arch()
        predicted = sum(table.get(f"{ctx}||{u}")["ms"] for u in units) + table.get(f"{ctx}||overhead")["ms"]
        assert predicted == pytest.approx(sum(true[u] for u in units) + true_overhead, rel=0.03)
    for u in true:  # the in-context measurements stay in the table
        assert table.get(f"{ctx}||{u}")["measured_ms"] == before[u]
    assert table.get(f"{ctx}||lonely") == {"ms": 7.0}
    assert table.get(f"{ctx}||overhead")["fitted"] is True


def test_refit_needs_enough_architectures_and_changes_nothing_without_them(tmp_path):
    table, ctx, true, *_ = _synthetic_context_table(tmp_path, MIN_FIT_ARCHS - 1)
    before = {k: dict(v) for k, v in table.items()}
    assert fit_table(table) == {"archs": MIN_FIT_ARCHS - 1}
    assert dict(table.items()) == before


def test_calibrate_table_measures_units_times_archs_refits_and_caches(tiny_spec, tmp_path):
    specs = [
        tiny_spec.replace_path("stem.channels", stem).replace_path("stages.1.channels", c)
        for stem in (4, 8, 12)
        for c in (8, 16, 24, 32)
    ]
    table = LatencyTable(tmp_path / "latency.json")
    cal = calibrate_table(specs, table, end_to_end=12)
    assert cal["units"] == len({u.key for s in specs for u in spec_units(s)}) == cal["measured"]
    assert cal["timed"] == 12 and cal["fit"]["archs"] == 12 and not cal["broken"]
    assert not any(missing_units(s, table) for s in specs)
    assert any("measured_ms" in e for _, e in table.items())
    predicted = [predict_latency(s, table) for s in specs]
    assert all(math.isfinite(p) and p > 0 for p in predicted)
    again = calibrate_table(specs, LatencyTable(tmp_path / "latency.json"), end_to_end=12)
    assert again["measured"] == 0 and again["timed"] == 0  # all cached: nothing timed twice


def test_a_later_measurement_keeps_the_refit_overhead(tiny_spec, tmp_path):
    table, ctx, *_ = _synthetic_context_table(tmp_path, 30)
    fit_table(table)
    fitted = table.get(f"{ctx}||overhead")["ms"]
    unit_latencies(tiny_spec, table)  # new units: measured in context, adds an overhead sample
    entry = table.get(f"{ctx}||overhead")
    assert entry["ms"] == fitted and len(entry["samples"]) == 2


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


# ---- profile_spec and `hybridnas profile` ---------------------------------------------------------


def test_profile_spec_stages_add_up_to_the_total(tiny_spec):
    from hybridnas.search_space.build import build_model

    prof = profile_spec(tiny_spec)
    whole = profile(build_model(tiny_spec), (1, 8, 8))
    assert {k: prof[k] for k in ("macs", "flops", "params")} == whole
    parts = [prof["stem"], prof["head"], *prof["stages"]]
    assert sum(p["macs"] for p in parts) == prof["macs"]
    assert sum(p["params"] for p in parts) == prof["params"]
    assert [(s["stage"], s["mixer"], s["resolution"], s["channels"]) for s in prof["stages"]] == [
        (0, "conv", 8, 4),
        (1, "shifted_window", 4, 8),
    ]


def run_cli(argv, capsys):
    from hybridnas.runners.cli import main

    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_profile_json_has_macs_flops_params_and_latency(tiny_spec, tmp_path, capsys):
    path = tmp_path / "arch.yaml"
    path.write_text(tiny_spec.to_yaml())
    rc, out, _ = run_cli(["profile", str(path), "--json"], capsys)
    data = json.loads(out)
    assert rc == 0 and data["flops"] == 2 * data["macs"] > 0 and data["params"] > 0
    assert "latency_ms" not in data
    rc, out, _ = run_cli(["profile", str(path), "--json", "--latency"], capsys)
    data = json.loads(out)
    assert rc == 0 and data["latency_ms"] > 0 and data["macs"] == profile_spec(tiny_spec)["macs"]


def test_cli_profile_table_lists_every_stage_and_latency_shares(tiny_spec, tmp_path, capsys):
    path = tmp_path / "arch.yaml"
    path.write_text(tiny_spec.to_yaml())
    rc, out, _ = run_cli(["profile", str(path), "--latency"], capsys)
    lines = out.splitlines()
    assert rc == 0
    assert [ln.split()[0] for ln in lines[:6]] == ["stage", "stem", "0", "1", "head", "total"]
    shares = [float(ln.split()[-1].rstrip("%")) for ln in lines[1:5]]
    assert sum(shares) == pytest.approx(100, abs=0.5)


@pytest.mark.parametrize(
    "content,expected",
    [
        (None, "file not found"),
        ("stages: [{mixer: windw, depth: 1, channels: 8}]\n", "stages[0].mixer: 'windw' is not one of"),
        ("a: [\n", "invalid YAML at line 2"),
    ],
)
def test_cli_profile_bad_file_exits_2_with_one_line(tmp_path, capsys, content, expected):
    path = tmp_path / "arch.yaml"
    if content is not None:
        path.write_text(content)
    rc, out, err = run_cli(["profile", str(path), "--json"], capsys)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and expected in err
