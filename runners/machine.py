"""The machine a run is on: CPU model, whether it multiplies bf16 in hardware, torch's CPU capability.

`precision: auto` decides from `bf16_support`, and every `hybridnas bench` header and `.ci/run`
print `machine_line`, so a number (or a red CI run) says which kind of machine it came from.

bf16 is native when the CPU has AMX tiles or AVX512-BF16 *and* oneDNN, which runs the CPU's bf16
convolutions and matmuls, may use them. ``ONEDNN_MAX_CPU_ISA`` (legacy ``DNNL_MAX_CPU_ISA``) below
``AVX512_CORE_BF16`` takes them away: at ``AVX512_CORE`` oneDNN converts bf16 to fp32 around fp32
instructions; below it (``AVX2``) oneDNN has no bf16 kernels at all and torch runs bf16
convolutions in its reference kernels (``thnn_conv2d``), several times slower than fp32, which sum
weight gradients over the batch in bf16. ``ATEN_CPU_CAPABILITY`` narrows only torch's own
vectorised kernels (elementwise, reductions); convolutions and matmuls stay on oneDNN's bf16 kernels
(profiled on torch 2.13), so it is printed but does not decide.

The checks use private helpers of torch 2.13 (``torch.cpu._is_amx_tile_supported``,
``torch.cpu._is_avx512_bf16_supported``, ``torch.ops.mkldnn._is_mkldnn_bf16_supported``); where one
is missing, a warning is logged and the CPU flags in /proc/cpuinfo stand in.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ONEDNN_ISA_VARS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
# oneDNN ISA caps below AVX512_CORE_BF16: no bf16 dot-product instructions for oneDNN there.
ONEDNN_ISAS_WITHOUT_BF16 = {
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
}
# (torch.cpu helper, /proc/cpuinfo flag, name) of the CPU features that multiply bf16.
BF16_FEATURES = (
    ("_is_amx_tile_supported", "amx_tile", "AMX"),
    ("_is_avx512_bf16_supported", "avx512_bf16", "AVX512-BF16"),
)


@dataclass(frozen=True)
class Bf16Support:
    native: bool  # bf16 convolutions and matmuls run on bf16 hardware
    why: str  # the features found, or what is missing, or what keeps oneDNN from them
    onednn: bool = True  # oneDNN runs bf16 at all (natively or converting); else torch's reference kernels do


def _cpuinfo(key: str) -> str | None:
    """The value of the first ``key`` line in /proc/cpuinfo (Linux), else None."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return None


@functools.cache
def _warn_missing(name: str, fallback: str) -> None:
    log.warning("torch %s: %s is missing or failed; %s", torch.__version__, name, fallback)


def _has_feature(helper: str, flag: str) -> bool:
    fn = getattr(torch.cpu, helper, None)
    if fn is not None:
        with contextlib.suppress(RuntimeError):
            return bool(fn())
    _warn_missing(f"torch.cpu.{helper}()", f"reading the '{flag}' flag from /proc/cpuinfo instead")
    return flag in (_cpuinfo("flags") or "").split()


def _onednn_has_bf16() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    fn = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if fn is None:
        _warn_missing(
            "torch.ops.mkldnn._is_mkldnn_bf16_supported()", "trusting the CPU flags and the ISA cap"
        )
        return True
    return bool(fn())


def onednn_isa_cap() -> tuple[str, str] | None:
    """(variable, ISA) when ``ONEDNN_MAX_CPU_ISA`` or the legacy ``DNNL_MAX_CPU_ISA`` caps oneDNN."""
    for var in ONEDNN_ISA_VARS:
        value = os.environ.get(var, "").strip().upper()
        if value:
            return var, value
    return None


def bf16_support() -> Bf16Support:
    """Whether bf16 convolutions and matmuls run natively on this CPU, and why (see the module doc)."""
    onednn = _onednn_has_bf16()
    found = ", ".join(name for helper, flag, name in BF16_FEATURES if _has_feature(helper, flag))
    if not found:
        return Bf16Support(False, "no AMX or AVX512-BF16", onednn)
    cap = onednn_isa_cap()
    if cap and cap[1] in ONEDNN_ISAS_WITHOUT_BF16:
        return Bf16Support(False, f"{found} held back by {cap[0]}={cap[1]}", onednn)
    if not onednn:
        return Bf16Support(False, f"{found}, but oneDNN has no bf16 kernels here", onednn)
    return Bf16Support(True, found, onednn)


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what `platform` knows)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown CPU"


def machine_line() -> str:
    """``machine: CPU model, cores; native bf16: yes/no (why); torch CPU capability X`` (and the GPU)."""
    bf16 = bf16_support()
    line = (
        f"machine: {cpu_model()}, {os.cpu_count()} cores; native bf16: {'yes' if bf16.native else 'no'} "
        f"({bf16.why}); torch CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    if torch.cuda.is_available():
        line += f"; cuda: {torch.cuda.get_device_name()}"
    return line


def load_average() -> str:
    """``load average 1.23 on 2 cores`` (the 1-minute average), for benchmark headers."""
    try:
        return f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    except (AttributeError, OSError):  # no getloadavg (Windows) or no /proc/loadavg
        return "load average unknown"
