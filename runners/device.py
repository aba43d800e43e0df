"""Where a model runs: the device, torch's thread count, and the small model helpers measuring needs.

One home for what the trainer (`runners.train`), the MAC counter (`runners.macs`) and the latency
timer (`runners.latency`) share: turning a device name into a checked ``torch.device``, fixing
torch's process-wide intra-op thread count for a while and restoring it, naming the machine a
measurement was taken on, and running a model in eval mode on a seeded example input without
touching the caller's training flags or global RNG.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from hybridnas.runners.machine import cpu_model
from hybridnas.search_space.errors import UserError


class DeviceError(UserError, ValueError):
    """A device or thread count this machine cannot give: an unknown name, CUDA asked for but absent."""


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto``/None -> cuda when available, else cpu; ``cpu``, ``cuda``, ``cuda:N`` as named.

    A CUDA device comes back with its index (``cuda`` -> ``cuda:<current>``), so two names of the
    same GPU compare equal. Anything else, or CUDA without a GPU, is a `DeviceError`.
    """
    if name is None or (isinstance(name, str) and name in ("", "auto")):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {name!r}; use auto, cpu or cuda (cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {str(name)!r} asked for, but PyTorch sees no CUDA GPU; use cpu (or auto)"
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise DeviceError(f"device {str(name)!r} is not supported; use auto, cpu or cuda")
    return dev


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count (process-wide) set to ``n`` for the duration, then restored.

    ``None`` leaves it as it is; anything but a positive integer is a `DeviceError`.
    """
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise DeviceError(f"threads must be a positive integer, got {n!r}")
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sync_for(device: torch.device) -> Callable[[], None]:
    """A function that waits for ``device`` to finish its queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@functools.lru_cache(maxsize=16)
def device_name(device: torch.device) -> str:
    """What a measurement was taken on: ``cuda:<GPU name>`` or ``cpu:<CPU model name>``."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{cpu_model()}"


# --------------------------------------------------------------------------------------------------
# Running a model to count or time it
# --------------------------------------------------------------------------------------------------


def as_input_shape(input_size: Sequence[int], batch_size: int = 1) -> tuple[int, int, int, int]:
    """``(C, H, W)`` (batched to ``batch_size``) or ``(B, C, H, W)`` -> a checked 4-D shape."""
    shape = tuple(int(s) for s in input_size)
    if len(shape) == 3:
        shape = (batch_size, *shape)
    elif len(shape) == 4:
        if batch_size not in (1, shape[0]):
            raise ValueError(f"batch_size={batch_size} disagrees with input_size {shape}")
    else:
        raise ValueError(f"input_size must be (C, H, W) or (B, C, H, W), got {tuple(input_size)}")
    if any(s < 1 for s in shape):
        raise ValueError(f"input_size must be positive, got {shape}")
    return shape  # type: ignore[return-value]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); cpu for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def example_input(
    shape: Sequence[int], device: torch.device | str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A seeded random input; a private generator, so the caller's global RNG does not move."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(tuple(shape), generator=g).to(device=device, dtype=dtype)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """eval() for the duration, then every submodule's training flag as it was."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag
