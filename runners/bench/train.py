"""`hybridnas bench train`: the proxy trainer against a textbook PyTorch loop, in one run.

Same architecture (a small conv net), same data (mnist5k), same initial weights, epochs, optimizer
(AdamW), learning-rate schedule and batch size. The textbook loop is what a tutorial writes:
``TensorDataset`` + ``DataLoader(shuffle=True)``, ``.to(device)`` and normalisation per batch, the
default ``AdamW`` implementation, NCHW fp32. The trainer is `runners.train.fit`, which also runs its
random-crop augmentation (the textbook loop has none), so the comparison is conservative.

Printed: training images per second for both (evaluation excluded), per wall second and per CPU
second (the latter is steadier on a shared machine), their ratio, validation accuracy for both (they
learn the same thing), and the trainer's achieved model FLOP rate, 3 x forward FLOPs per image x
img/s (forward + backward ~ 3 forwards), as a fraction of this machine's measured matmul rate.

Where the CPU speed-up comes from (one thread, this architecture, CPU time per step measured
interleaved; a shared 2-vCPU Xeon VM with AMX):

- channels_last model and input: 1.3-1.4x. oneDNN runs NHWC convolutions without the reorders NCHW
  needs. This is nearly all of it: convolutions (forward + backward) are ~50% of a step, and
  BatchNorm, GELU and residual adds (the block template's, not the trainer's) ~40%.
- batches by index instead of DataLoader collation: ~2 ms per batch either way, under 1% of a step
  for this model; it matters only for tiny models and for per-sample transforms, which we never run.
- fused AdamW instead of the per-parameter loop: under 2% (the optimizer step is ~1% of a step).
- flushing denormals: no denormals appear in weights, gradients or Adam state; no effect.
- torch.compile: 1.17x per step, but compiling forward + backward took 190 s on that machine,
  longer than a whole proxy training, and every trial is a new architecture. Not used.
- bf16 autocast on a CPU with native bf16 (AMX / AVX512-BF16): a further ~1.7x on this conv net
  (1.2-2x per mixer; ACmix and Slide keep their local-attention kernel in fp32 on the CPU, where its
  elementwise passes are faster in fp32). The trainer's default there (``precision: auto``); the
  fp32 trainer is printed as a second row, so both ratios come from the same run.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hybridnas.search_space.build import build_model
from hybridnas.search_space.config import DataConfig, TrainConfig
from hybridnas.search_space.spec import ArchSpec

from ..data import Dataset, load_dataset
from ..device import resolve_device, torch_threads
from ..machine import machine_line
from ..macs import profile
from ..optim import lr_factor
from ..train import fit_steps, resolve_precision, seed_everything

# experiments/arch_base.yaml (the ablations' base): 28x28 -> 14x14 -> 7x7, 16/32/64 channels.
BENCH_ARCH = """
input: {channels: 1, size: 28, classes: 10}
stem: {channels: 16}
stages:
  - {mixer: conv, depth: 1, channels: 16, downsample: none}
  - {mixer: conv, depth: 2, channels: 32, downsample: conv}
  - {mixer: conv, depth: 1, channels: 64, downsample: conv}
"""
# --quick (tests, smoke runs): a quarter of the MACs, about 500 training images, one epoch.
QUICK_ARCH = """
input: {channels: 1, size: 28, classes: 10}
stem: {channels: 8}
stages:
  - {mixer: conv, depth: 1, channels: 16, downsample: conv, options: {kernel: 5}}
  - {mixer: conv, depth: 1, channels: 32, downsample: conv, options: {kernel: 5}}
"""


def matmul_flops_per_s(
    device: torch.device, seconds: float = 0.5, precision: str = "fp32", n: int | None = None
) -> tuple[float, str]:
    """Best-of-3 dense n x n matmul rate (FLOP/s) on ``device`` in the trainer's ``precision``
    (n: 8192 on CUDA, 1024 on the CPU; one emulated bf16 product of 1024 takes seconds)."""
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 1024)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    a @ b  # warm-up: library initialisation and kernel selection
    sync()
    best = 0.0
    for _ in range(3):
        reps, t0 = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            sync()
            if time.perf_counter() - t0 > seconds / 3:
                break
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best, str(dtype).replace("torch.", "")


def textbook_steps(model: nn.Module, data: Dataset, cfg: TrainConfig, device: torch.device) -> Iterator[str]:
    """The loop from a tutorial, with the trainer's optimizer, schedule and loss so only speed differs.

    A generator with the phases of `runners.train.fit_steps` (``setup``, ``step``, ``eval``), so that
    both can run in lockstep; returns its own img/s (valid when run alone) and the final accuracy.
    """
    seed_everything(cfg.seed)
    model = model.to(device)
    loader = DataLoader(
        TensorDataset(data.train_x, data.train_y), batch_size=cfg.batch_size, shuffle=True, drop_last=True
    )
    val = DataLoader(TensorDataset(data.val_x, data.val_y), batch_size=cfg.batch_size)
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = len(loader)
    total, warmup = steps * cfg.epochs, round(cfg.warmup_epochs * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
    yield "setup"
    imgs, wall, acc = 0, 0.0, 0.0
    for _ in range(cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            x = (x.float() / 255.0 - mean) / std
            loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            imgs += len(y)
            yield "step"
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall += time.perf_counter() - t0
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val:
                x, y = x.to(device), y.to(device)
                correct += int((model((x.float() / 255.0 - mean) / std).argmax(1) == y).sum())
        acc = correct / len(data.val_y)
        yield "eval"
    return {"imgs_per_s": imgs / wall, "val_acc": acc}


def _trainer_steps(
    model: nn.Module, data: Dataset, cfg: TrainConfig, device: torch.device, precision: str = "auto"
) -> Iterator[str]:
    res = yield from fit_steps(model, data, cfg, device=device, precision=precision)
    return {"imgs_per_s": res.imgs_per_s, "val_acc": res.val_acc}


def race(loops: dict[str, Iterator[str]], images_per_step: int, lockstep: bool) -> dict[str, dict[str, Any]]:
    """Run the loops and time their training steps (setup and evaluation excluded).

    ``lockstep`` (CPU): one phase of each loop in turn, so a burst of load from elsewhere on the
    machine lands on all of them alike; img/s per wall second and per CPU second (this thread's)
    come from the summed step times. Otherwise (CUDA, where a step is asynchronous) one loop after
    the other, each reporting its own synchronised img/s.
    """
    stats = {k: {"wall": 0.0, "cpu": 0.0, "steps": 0} for k in loops}
    order = [list(loops)] if lockstep else [[k] for k in loops]
    for group in order:
        active = {k: loops[k] for k in group}
        while active:
            for name, it in list(active.items()):
                t, c = time.perf_counter(), time.thread_time()
                try:
                    phase = next(it)
                except StopIteration as done:
                    stats[name]["result"] = done.value
                    del active[name]
                    continue
                if phase == "step":
                    st = stats[name]
                    st["wall"] += time.perf_counter() - t
                    st["cpu"] += time.thread_time() - c
                    st["steps"] += 1
    out = {}
    for name, st in stats.items():
        imgs = st["steps"] * images_per_step
        own = st["result"]["imgs_per_s"]
        out[name] = {
            "imgs_per_s": imgs / st["wall"] if lockstep else own,
            "imgs_per_cpu_s": imgs / st["cpu"] if lockstep else None,
            "val_acc": st["result"]["val_acc"],
        }
    return out


def run(epochs: int = 2, quick: bool = False, device: str = "auto", threads: int = 1) -> dict[str, Any]:
    """Both loops on the same model and data; returns the numbers `main` prints.

    One CPU thread by default: that is what a search trial with ``resources: {cpu: 1}`` gets.
    """
    dev = resolve_device(device)
    with torch_threads(threads if dev.type == "cpu" and threads else None):
        spec = ArchSpec.from_yaml(QUICK_ARCH if quick else BENCH_ARCH)
        data = load_dataset(DataConfig(dataset="mnist5k", samples=640 if quick else None))
        cfg = TrainConfig(epochs=1 if quick else epochs, batch_size=128, lr=3e-3, seed=0)
        seed_everything(cfg.seed)
        model = build_model(spec)
        fwd_flops = profile(model, (data.channels, data.size, data.size))["flops"]
        # Identical initial weights for every loop.
        precision = resolve_precision(cfg.precision, dev)  # the trainer's default here
        loops = {
            "textbook": textbook_steps(copy.deepcopy(model), data, cfg, dev),
            "trainer": _trainer_steps(copy.deepcopy(model), data, cfg, dev),
        }
        # Where the default is bf16, the fp32 trainer runs too: the like-for-like comparison.
        if precision == "bf16":
            loops["trainer_fp32"] = _trainer_steps(copy.deepcopy(model), data, cfg, dev, precision="fp32")
        res = race(loops, cfg.batch_size, lockstep=dev.type == "cpu")
        peak, dtype = matmul_flops_per_s(dev, precision=precision)
        n_threads = torch.get_num_threads()
    textbook, trainer = res["textbook"], res["trainer"]
    achieved = 3 * fwd_flops * trainer["imgs_per_s"]
    cpu_ratio = (
        None if trainer["imgs_per_cpu_s"] is None else trainer["imgs_per_cpu_s"] / textbook["imgs_per_cpu_s"]
    )
    return {
        "arch_hash": spec.arch_hash(),
        "fwd_flops": fwd_flops,
        "train_images": len(data.train_y),
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "device": str(dev),
        "threads": n_threads,
        "lockstep": dev.type == "cpu",
        "textbook": textbook,
        "trainer": trainer,
        "precision": precision,
        "trainer_fp32": res.get("trainer_fp32"),
        "speedup": trainer["imgs_per_s"] / textbook["imgs_per_s"],
        "speedup_cpu": cpu_ratio,
        "achieved_flops_per_s": achieved,
        "matmul_flops_per_s": peak,
        "matmul_dtype": dtype,
        "fraction_of_matmul": achieved / peak,
    }


def _rate(x: float | None, width: int) -> str:
    return f"{x:{width},.0f}" if x is not None else " " * (width - 1) + "-"


def _gflops(flops_per_s: float) -> str:
    """GFLOP/s to at least three significant digits: 1,148 or 37.4 or 1.37 (emulated bf16)."""
    g = flops_per_s / 1e9
    return f"{g:,.0f}" if g >= 100 else f"{g:.3g}"


def main(args: argparse.Namespace) -> int:
    print(machine_line(), flush=True)
    r = run(epochs=args.epochs, quick=args.quick)
    tb, tr, fp = r["textbook"], r["trainer"], r["trainer_fp32"]
    mode = "in lockstep, step by step" if r["lockstep"] else "one after the other"
    print(
        f"bench train: arch {r['arch_hash']} ({r['fwd_flops'] / 2e6:.2f}M MACs/img) on mnist5k "
        f"({r['train_images']} train images), {r['epochs']} epoch(s), batch {r['batch_size']}, AdamW, "
        f"{r['device']}, {r['threads']} thread(s), loops run {mode}"
    )
    print(f"  {'':56s} {'img/s':>8s} {'img/CPU-s':>10s} {'val_acc':>8s}")
    rows = [
        ("textbook loop (DataLoader, per-batch .to + normalise)", tb),
        (f"hybridnas trainer, default precision here: {r['precision']}", tr),
    ]
    if fp is not None:
        rows.append(("hybridnas trainer, precision: fp32", fp))
    for name, x in rows:
        print(
            f"  {name:56s} {_rate(x['imgs_per_s'], 8)} {_rate(x['imgs_per_cpu_s'], 10)} {x['val_acc']:8.4f}"
        )
    cpu = f"{r['speedup_cpu']:9.2f}x" if r["speedup_cpu"] is not None else ""
    print(f"  {'speed-up, trainer (default) vs textbook':56s} {r['speedup']:7.2f}x {cpu}   [target >= 1.5x]")
    if fp is not None:
        fcpu = f"{fp['imgs_per_cpu_s'] / tb['imgs_per_cpu_s']:9.2f}x" if fp["imgs_per_cpu_s"] else ""
        print(
            f"  {'speed-up, fp32 trainer vs textbook (both fp32)':56s} {fp['imgs_per_s'] / tb['imgs_per_s']:7.2f}x {fcpu}"
        )
    print(
        f"  trainer: 3 x {r['fwd_flops'] / 1e6:.1f} MFLOP/img x {tr['imgs_per_s']:,.0f} img/s = "
        f"{r['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s = {100 * r['fraction_of_matmul']:.1f}% of this machine's "
        f"{r['matmul_dtype']} matmul rate ({_gflops(r['matmul_flops_per_s'])} GFLOP/s)"
    )
    return 0
