"""`hybridnas profile`: MACs, params and latency per stage, as JSON or a table; bad files exit 2."""

from __future__ import annotations

import json

import pytest

from hybridnas.runners.macs import profile_spec


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
    assert data["latency_clock"] == "cpu"  # auto: one CPU thread times its own CPU time


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
