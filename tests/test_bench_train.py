"""runners.bench.train: both loops train the same model; the printed numbers agree with each other.

No wall-clock assertions: speed is what the benchmark reports, not what a unit test can promise.
"""

from __future__ import annotations

import argparse
import copy
import math
import re

import torch

from hybridnas.runners.bench import train as bench
from hybridnas.runners.data import load_dataset
from hybridnas.runners.machine import machine_line
from hybridnas.search_space.build import build_model
from hybridnas.search_space.config import DataConfig, TrainConfig
from hybridnas.search_space.spec import ArchSpec

TINY = """
input: {channels: 1, size: 8, classes: 10}
stem: {channels: 8}
stages:
  - {mixer: conv, depth: 1, channels: 8}
"""


def test_textbook_loop_and_trainer_both_learn_from_the_same_initial_weights():
    data = load_dataset(DataConfig(dataset="digits"))
    cfg = TrainConfig(epochs=3, batch_size=64, lr=5e-3, augment=False)  # the same work in both loops
    torch.manual_seed(0)
    model = build_model(ArchSpec.from_yaml(TINY))
    before = copy.deepcopy(model.state_dict())
    cpu = torch.device("cpu")
    loops = {
        "textbook": bench.textbook_steps(copy.deepcopy(model), data, cfg, cpu),
        "trainer": bench._trainer_steps(copy.deepcopy(model), data, cfg, cpu),
    }
    res = bench.race(loops, cfg.batch_size, lockstep=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # copies trained, not model
    for r in res.values():
        assert r["val_acc"] > 0.3  # 10 classes: chance is 0.1 (both reach about 0.5 here)
        assert r["imgs_per_s"] > 0 and r["imgs_per_cpu_s"] > 0


def test_textbook_loop_has_the_trainers_phases():
    data = load_dataset(DataConfig(dataset="digits"))
    model = build_model(ArchSpec.from_yaml(TINY))
    cfg = TrainConfig(epochs=2, batch_size=512)
    phases = list(bench.textbook_steps(model, data, cfg, torch.device("cpu")))
    steps = len(data.train_y) // 512
    assert phases == ["setup"] + (["step"] * steps + ["eval"]) * 2


def test_matmul_rate_is_measured_in_the_training_dtype():
    # No speed floor: emulated bf16 (a CPU without native bf16) multiplies at ~0.3 GFLOP/s.
    rate, dtype = bench.matmul_flops_per_s(torch.device("cpu"), seconds=0.05, n=256)
    assert 0 < rate < math.inf and dtype == "float32"
    rate, dtype = bench.matmul_flops_per_s(torch.device("cpu"), seconds=0.05, precision="bf16", n=256)
    assert 0 < rate < math.inf and dtype == "bfloat16"


def test_quick_bench_prints_consistent_rates_ratio_and_flop_fraction(capsys):
    threads = torch.get_num_threads()
    assert bench.main(argparse.Namespace(epochs=1, quick=True)) == 0
    assert torch.get_num_threads() == threads
    out = capsys.readouterr().out
    assert out.splitlines()[0] == machine_line()  # which machine, before anything is measured
    rates = {
        name: [
            float(v.replace(",", ""))
            for v in re.search(rf"{name}.*?\s([\d,]+)\s+([\d,]+)\s+([\d.]+)\n", out).groups()
        ]
        for name in ("textbook loop", "hybridnas trainer")
    }
    speedup, speedup_cpu = (
        float(v)
        for v in re.search(r"speed-up, trainer \(default\) vs textbook\s+([\d.]+)x\s+([\d.]+)x", out).groups()
    )
    tb, tr = rates["textbook loop"], rates["hybridnas trainer"]
    assert abs(speedup - tr[0] / tb[0]) < 0.02 * speedup + 0.01
    assert abs(speedup_cpu - tr[1] / tb[1]) < 0.02 * speedup_cpu + 0.01
    m = re.search(
        r"3 x ([\d.]+) MFLOP/img x ([\d,]+) img/s = ([\d.]+) GFLOP/s = ([\d.]+)% .* \(([\d,.]+) GFLOP/s\)",
        out,
    )
    mflop, imgs, gflops, pct, peak = (float(v.replace(",", "")) for v in m.groups())
    assert imgs == tr[0]
    assert abs(gflops - 3 * mflop * imgs / 1e3) <= 0.06 + 0.01 * gflops
    assert abs(pct - 100 * gflops / peak) <= 0.1 + 0.05 * pct
