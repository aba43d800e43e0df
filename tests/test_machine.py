"""runners.machine: native bf16 needs the CPU feature and oneDNN free to use it; the machine line.

The detection is driven by hand here (CPU features, oneDNN, the ISA cap), so both answers are tested
on every CPU; one test caps oneDNN for real in a fresh process.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridnas.runners import machine
from hybridnas.runners.machine import Bf16Support, bf16_support, cpu_model, machine_line


@pytest.fixture
def fake_cpu(monkeypatch):
    """Set the CPU's bf16 features and whether oneDNN has bf16 kernels; no ISA cap unless set."""
    for var in machine.ONEDNN_ISA_VARS:
        monkeypatch.delenv(var, raising=False)

    def fake(flags: set[str], onednn: bool = True) -> None:
        monkeypatch.setattr(machine, "_has_feature", lambda helper, flag: flag in flags)
        monkeypatch.setattr(machine, "_onednn_has_bf16", lambda: onednn)

    return fake


@pytest.mark.parametrize(
    ("flags", "why"),
    [
        ({"avx512_bf16"}, "AVX512-BF16"),
        ({"amx_tile", "avx512_bf16"}, "AMX, AVX512-BF16"),
        ({"amx_tile"}, "AMX"),
    ],
)
def test_amx_or_avx512_bf16_with_an_uncapped_onednn_is_native(fake_cpu, flags, why):
    fake_cpu(flags)
    assert bf16_support() == Bf16Support(True, why, True)


def test_a_cpu_without_amx_or_avx512_bf16_is_not_native(fake_cpu):
    fake_cpu({"avx2", "avx512f"})
    assert bf16_support() == Bf16Support(False, "no AMX or AVX512-BF16", True)
    fake_cpu(set(), onednn=False)
    assert bf16_support() == Bf16Support(False, "no AMX or AVX512-BF16", False)


@pytest.mark.parametrize(
    ("var", "isa", "native"),
    [
        ("ONEDNN_MAX_CPU_ISA", "AVX2", False),
        ("ONEDNN_MAX_CPU_ISA", "avx2", False),  # oneDNN reads the value case-insensitively
        ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE", False),  # AVX512 without its bf16 instructions
        ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI", False),
        ("DNNL_MAX_CPU_ISA", "AVX2", False),  # the legacy name
        ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16", True),
        ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX", True),
        ("ONEDNN_MAX_CPU_ISA", "DEFAULT", True),
    ],
)
def test_an_onednn_isa_cap_below_avx512_bf16_makes_bf16_emulated(fake_cpu, monkeypatch, var, isa, native):
    fake_cpu({"amx_tile", "avx512_bf16"})
    monkeypatch.setenv(var, isa)
    got = bf16_support()
    assert got.native is native
    if not native:
        assert got.why == f"AMX, AVX512-BF16 held back by {var}={isa.upper()}"


def test_onednn_without_bf16_kernels_makes_bf16_emulated(fake_cpu):
    fake_cpu({"avx512_bf16"}, onednn=False)
    assert bf16_support() == Bf16Support(False, "AVX512-BF16, but oneDNN has no bf16 kernels here", False)


def test_a_missing_torch_helper_falls_back_to_the_cpu_flags_with_a_logged_warning(monkeypatch, caplog):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    flags = "fpu sse avx512_bf16"
    monkeypatch.setattr(machine, "_cpuinfo", lambda key: flags if key == "flags" else None)
    machine._warn_missing.cache_clear()
    with caplog.at_level(logging.WARNING, logger=machine.__name__):
        assert machine._has_feature("_is_avx512_bf16_supported", "avx512_bf16")
        flags = "fpu sse avx2"
        assert not machine._has_feature("_is_avx512_bf16_supported", "avx512_bf16")
    assert "torch.cpu._is_avx512_bf16_supported() is missing" in caplog.text
    assert len(caplog.records) == 1  # logged once, not on every call
    machine._warn_missing.cache_clear()


def test_onednn_capped_at_avx2_in_a_fresh_process_is_not_native_and_auto_trains_in_fp32(tmp_path):
    # Real, not monkeypatched: the cap must reach oneDNN (its bf16 kernels are gone) and hybridnas.
    code = (
        "import json, torch; from hybridnas.runners.machine import bf16_support; "
        "from hybridnas.runners.train import resolve_precision; "
        "print(json.dumps({'onednn_bf16': torch.ops.mkldnn._is_mkldnn_bf16_supported(), "
        "'native': bf16_support().native, 'auto': resolve_precision('auto', torch.device('cpu'))}))"
    )
    env = {"ONEDNN_MAX_CPU_ISA": "AVX2", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"onednn_bf16": False, "native": False, "auto": "fp32"}, out.stderr


def test_machine_line_names_the_cpu_model_native_bf16_and_the_capability(monkeypatch):
    monkeypatch.setattr(machine, "bf16_support", lambda: Bf16Support(False, "no AMX or AVX512-BF16", False))
    line = machine_line()
    capability = torch.backends.cpu.get_cpu_capability()
    assert line.startswith(f"machine: {cpu_model()}, ")
    assert re.search(r", \d+ cores; native bf16: no \(no AMX or AVX512-BF16\); ", line)
    assert line.split("; ")[2] == f"torch CPU capability {capability}"
    monkeypatch.setattr(machine, "bf16_support", lambda: Bf16Support(True, "AMX", True))
    assert "native bf16: yes (AMX)" in machine_line()


def test_cpu_model_is_the_model_name_from_proc_cpuinfo():
    info = Path("/proc/cpuinfo")
    text = info.read_text() if info.exists() else ""
    names = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")]
    if not names:  # not Linux, or a kernel (some ARM ones) that names no model there
        pytest.skip("no model name in /proc/cpuinfo on this machine")
    assert cpu_model() == names[0]


def test_load_average_names_the_one_minute_load_and_the_cores(monkeypatch):
    monkeypatch.setattr(machine.os, "getloadavg", lambda: (1.234, 0.5, 0.25))
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 2)
    assert machine.load_average() == "load average 1.23 on 2 cores"
    monkeypatch.delattr(machine.os, "getloadavg")  # Windows has none
    assert machine.load_average() == "load average unknown"


def test_pytest_prints_the_machine_line_first_even_when_quiet():
    # tests/conftest.py: a red run of the README's test command says which kind of machine it ran on.
    test = f"{Path(__file__).name}::test_load_average_names_the_one_minute_load_and_the_cores"
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.splitlines()[0] == machine_line()
