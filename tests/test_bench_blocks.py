"""`hybridnas bench blocks`: the table has a row per mixer with finite numbers, baselines next to the
attention mixers, broken mixers reported in their row, and a peak-memory probe that sees real
allocations. No timing assertions."""

import argparse
import math
import re

import pytest
import torch
from torch import nn

from hybridnas import blocks
from hybridnas.runners.bench import blocks as bench
from hybridnas.runners.machine import machine_line

NUMBER = r"[-+]?\d+(?:\.\d+)?"


def _rows(text: str) -> dict[tuple[str, str], list[str]]:
    """{(name, size): fields} for every table row; baseline rows are named '  unfold' after their mixer."""
    rows, last = {}, None
    for line in text.splitlines():
        m = re.match(r"^(\s*)(\S+)\s+(\d+\^2)\s+(.*)$", line)
        if not m:
            continue
        indent, name, size, rest = m.groups()
        if indent:
            name = f"{last}/{name}"
        else:
            last = name
        rows[(name, size)] = rest.split()
    return rows


def test_quick_bench_prints_a_row_per_mixer_with_finite_numbers(capsys):
    mixers = ["conv", "acmix", "slide", "window"]
    assert bench.main(argparse.Namespace(quick=True, mixers=mixers)) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == machine_line()  # which machine, before anything is measured
    assert re.search(rf"matmul rate: {NUMBER} GFLOP/s", out)
    rows = _rows(out)
    for size in (f"{s}^2" for s in bench.QUICK.sizes):
        for name in mixers:
            fields = rows[(name, size)]
            assert "error:" not in fields, fields
            ms, cpu_ms, peak, macs, share = fields[:5]
            for value in (ms, cpu_ms, peak, share.rstrip("%")):
                assert math.isfinite(float(value)) and float(value) >= 0, fields
            assert float(ms) > 0 and macs.endswith("M")
        # the attention mixers have their unfold version, with a speed and memory ratio
        for name in ("acmix", "slide", "window"):
            speed, mem = rows[(name, size)][5:7]
            assert float(speed.rstrip("x")) > 0 and float(mem.rstrip("x")) > 0
            assert (
                float(rows[(name, size)][2]) > 0 and float(rows[(f"{name}/unfold", size)][2]) > 0
            )  # peak MiB
            assert float(rows[(f"{name}/unfold", size)][0]) > 0
        assert rows[("conv", size)][5:7] == ["-", "-"]


class _Broken(nn.Module):
    paper = "none"
    options: dict = {}

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this mixer is broken on purpose")


def test_a_failing_mixer_is_reported_in_its_row_and_the_others_still_run(capsys, monkeypatch):
    monkeypatch.setitem(blocks.MIXERS, "broken", _Broken)
    bench.main(argparse.Namespace(quick=True, mixers=["broken", "conv"]))
    rows = _rows(capsys.readouterr().out)
    size = f"{bench.QUICK.sizes[0]}^2"
    assert rows[("broken", size)][:2] == ["error:", "RuntimeError:"]
    assert "broken on purpose" in " ".join(rows[("broken", size)])
    assert float(rows[("conv", size)][0]) > 0


class _Blowup(nn.Module):
    """Allocates an 8x copy of its input in forward: a peak the probe must see."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(1, 8, 1, 1).sum(1, keepdim=True).expand_as(x) * self.scale


def test_peak_memory_probe_sees_a_real_allocation():
    x = torch.randn(4, 16, 32, 32, requires_grad=True)
    peak = bench.peak_bytes(_Blowup(), x)
    assert peak >= 8 * x.numel() * x.element_size()
    assert peak < 40 * x.numel() * x.element_size()


def test_peak_is_the_highest_running_total_in_time_order():
    assert bench._peak_from_events([(3, -50), (1, 100), (2, 30), (4, 70)]) == 150


@pytest.mark.parametrize("name", ["acmix", "slide"])
def test_unfold_baseline_is_the_same_module_with_the_unfold_kernel(name):
    mixer = blocks.build_mixer(name, 8, heads=2)
    base = bench.unfold_baseline(name, mixer, 8, 2)
    assert base is not mixer and base.attention is bench.unfold_local_attention
    x = torch.randn(2, 8, 6, 5)
    torch.testing.assert_close(base(x), mixer(x), rtol=1e-5, atol=1e-5)
