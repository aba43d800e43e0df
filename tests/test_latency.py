"""runners.latency and runners.device: timing a network in a context; devices and threads."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hybridnas.runners.device import DeviceError, resolve_device, torch_threads
from hybridnas.runners.latency import LatencyContext, MeasureError, latency
from hybridnas.search_space.errors import UserError


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
    latency(net, (1, 6, 6), LatencyContext(threads=2, clock="wall"), runs=20, warmup=0)
    assert torch.get_num_threads() == before
    assert net.training


@pytest.mark.parametrize("dtype", ["bfloat16", torch.bfloat16, None, "float32"])
def test_latency_runs_in_reduced_precision(dtype):
    ctx = LatencyContext(batch_size=2, dtype=dtype)
    out = latency(nn.Conv2d(2, 2, 3), (2, 6, 6), ctx, runs=20, warmup=1)
    assert out["median_ms"] > 0


@pytest.mark.parametrize(
    "request_,error,match",
    [
        (lambda: latency(nn.Identity(), (1, 2, 2), runs=5), MeasureError, "runs"),
        (lambda: LatencyContext(dtype="int8"), MeasureError, "dtype"),
        (lambda: LatencyContext(device="tpu"), DeviceError, "device"),
        (lambda: LatencyContext(threads=0), MeasureError, "threads"),
        (lambda: LatencyContext(batch_size=0), MeasureError, "batch size"),
        (lambda: LatencyContext(clock="sundial"), MeasureError, "clock"),
        (lambda: LatencyContext(threads=2, clock="cpu"), MeasureError, "threads 1"),
    ],
)
def test_latency_rejects_bad_requests_with_a_user_error(request_, error, match):
    with pytest.raises(error, match=match) as e:
        request_()
    assert isinstance(e.value, UserError)


def test_latency_on_cuda_times_a_copy_or_says_cuda_is_missing():
    # One test for both kinds of machine (no skips): with CUDA the caller's model stays on the CPU,
    # without it the request is a user error that names CUDA.
    net = nn.Conv2d(1, 2, 3)
    if torch.cuda.is_available():
        out = latency(net, (1, 8, 8), LatencyContext(device="cuda"), runs=20)
        assert out["median_ms"] > 0 and next(net.parameters()).device.type == "cpu"
    else:
        with pytest.raises(DeviceError, match="CUDA"):
            latency(net, (1, 8, 8), LatencyContext(device="cuda"))


def test_context_holds_resolved_values_and_equal_contexts_share_a_key():
    a = LatencyContext(device="cpu", dtype="bf16")
    b = LatencyContext(device=torch.device("cpu"), dtype=torch.bfloat16)
    assert a == b and a.key() == b.key() and a.dtype is torch.bfloat16
    assert LatencyContext().key() != LatencyContext(batch_size=2).key()


def test_context_from_an_experiment_latency_section():
    from hybridnas.search_space.experiment import LatencyConfig

    ctx = LatencyContext.from_config(LatencyConfig(device="cpu", batch_size=4, threads=1))
    assert (ctx.device, ctx.batch_size, ctx.threads) == (torch.device("cpu"), 4, 1)
    assert LatencyContext.from_config({"device": "cpu", "batch_size": 4, "threads": 1}) == ctx


# ---- runners.device ------------------------------------------------------------------------------


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(UserError):
        resolve_device("tpu")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("gpu0")


@pytest.mark.parametrize("n", [None, 2])
def test_thread_count_is_set_for_the_block_and_restored_even_after_an_error(n):
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="inside"):
        with torch_threads(n):
            assert torch.get_num_threads() == (before if n is None else n)
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("n", [0, -1, 1.5, "2"])
def test_a_thread_count_that_is_not_a_positive_integer_is_a_user_error(n):
    with pytest.raises(DeviceError, match="threads"):
        with torch_threads(n):
            pass


def test_auto_clock_is_the_threads_cpu_time_for_one_cpu_thread_and_wall_otherwise():
    assert LatencyContext().clock == "cpu" and LatencyContext(clock="auto", threads=1).clock == "cpu"
    assert LatencyContext(threads=2).clock == "wall" and LatencyContext(threads=None).clock == "wall"
    assert LatencyContext(clock="wall").clock == "wall"
    assert LatencyContext(clock="auto").key() == LatencyContext(clock="cpu").key()  # the same table entries
