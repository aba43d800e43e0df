"""What a search or an ablation checks before it touches the tracking store, and what it says when no
trial trained: the cluster probe (`ray_runtime.probe_cluster`), `resume.check_can_start`,
`resume.nothing_trained`, and the writability checks of `files`."""

from __future__ import annotations

import functools
import http.server
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from hybridnas.runners.files import OutputError, check_writable_dir, check_writable_file
from hybridnas.runners.ray_runtime import ClusterError, cluster_endpoint, probe_cluster
from hybridnas.runners.resume import check_can_start, nothing_trained
from hybridnas.search_space.errors import SpecError

# ---------------------------------------------------------------------------------------- the probe


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_joining_a_closed_port_fails_at_once():
    port = _closed_port()
    t = time.monotonic()
    with pytest.raises(ClusterError, match=rf"^cannot join the Ray cluster at '127.0.0.1:{port}': .*refused"):
        probe_cluster(f"127.0.0.1:{port}", timeout=30)
    assert time.monotonic() - t < 5


def test_joining_a_port_that_never_answers_fails_after_the_timeout():
    # A listening socket nobody accepts from: the TCP handshake completes (the backlog), then silence.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        t = time.monotonic()
        with pytest.raises(
            ClusterError, match=r"no answer from 127.0.0.1:\d+ within 1 s \(--connect-timeout\)"
        ):
            probe_cluster(f"ray://127.0.0.1:{port}", timeout=1)
        assert 0.9 <= time.monotonic() - t < 10


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_a_server_that_is_not_ray_is_refused(tmp_path):
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(tmp_path))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ClusterError, match="answers, but not as a Ray cluster"):
            probe_cluster(f"127.0.0.1:{server.server_address[1]}", timeout=5)
    finally:
        server.shutdown()
        server.server_close()


def test_a_real_ray_gcs_passes_the_probe(ray_local):
    probe_cluster(ray_local.get_runtime_context().gcs_address, timeout=10)


def test_addresses_default_to_rays_ports(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_endpoint("ray://head") == ("head", 10001)
    assert cluster_endpoint("head") == ("head", 6379)
    assert cluster_endpoint("[::1]:7000") == ("::1", 7000)
    assert cluster_endpoint("auto") is None  # Ray looks the cluster up itself, and fails at once
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6380")
    assert cluster_endpoint("auto") == ("10.0.0.5", 6380)
    with pytest.raises(ClusterError, match="expected HOST:PORT"):
        cluster_endpoint("head:port")


# ------------------------------------------------------------------------------- output paths


def test_writable_checks_name_the_path_and_create_nothing(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match=r"--out .*afile/sub: .*afile is a file"):
        check_writable_dir(tmp_path / "afile" / "sub")
    with pytest.raises(OutputError, match="is a file, not a directory"):
        check_writable_dir(tmp_path / "afile")
    with pytest.raises(OutputError, match="is a directory, not a file"):
        check_writable_file(tmp_path)
    assert check_writable_dir(tmp_path / "a" / "b" / "c") == tmp_path / "a" / "b" / "c"
    assert check_writable_file(tmp_path / "new" / "x.yaml") == tmp_path / "new" / "x.yaml"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_read_only_directory_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    undo = lambda: ro.chmod(0o755)  # noqa: E731
    if os.access(ro, os.W_OK):  # root: only the immutable attribute binds it
        if subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode != 0:
            pytest.skip("running as root without chattr +i: no directory can be made unwritable here")
        undo = lambda: subprocess.run(["chattr", "-i", str(ro)], check=True)  # noqa: E731
    try:
        with pytest.raises(OutputError, match=r"out_dir .*ro/out: directory .*ro is not writable"):
            check_writable_dir(ro / "out", "out_dir")
    finally:
        undo()


# ------------------------------------------------------------------------------ check_can_start


RESOURCES = SimpleNamespace(cpu=1.0, gpu=0.0)
TRAIN = SimpleNamespace(device="auto")
LATENCY = SimpleNamespace(device="cpu")


def test_check_can_start_passes_a_plain_local_setup(tmp_path):
    check_can_start(tmp_path / "out", "out_dir", RESOURCES, TRAIN, LATENCY)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "resources, train, latency, words",
    [
        (SimpleNamespace(cpu=10_000.0, gpu=0.0), TRAIN, LATENCY, "resources.cpu: a trial asks for 10000, this machine has"),
        (SimpleNamespace(cpu=1.0, gpu=64.0), TRAIN, LATENCY, "resources.gpu: a trial asks for 64, this machine has"),
    ],
    ids=["cpu", "gpu"],
)  # fmt: skip
def test_resources_beyond_this_machine_are_refused(tmp_path, resources, train, latency, words):
    with pytest.raises(SpecError) as e:
        check_can_start(tmp_path / "out", "out_dir", resources, train, latency)
    assert str(e.value).startswith(words)
    assert list(tmp_path.iterdir()) == []


def test_cuda_without_a_gpu_is_refused_for_trials_and_latency(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: asking for one is not an error here")
    with pytest.raises(SpecError, match=r"^train.device: 'cuda', but this machine has no GPU"):
        check_can_start(tmp_path, "out_dir", RESOURCES, SimpleNamespace(device="cuda"), LATENCY)
    with pytest.raises(SpecError, match=r"^latency.device: 'cuda', but PyTorch sees no CUDA GPU"):
        check_can_start(tmp_path, "out_dir", RESOURCES, TRAIN, SimpleNamespace(device="cuda"))


# ------------------------------------------------------------------------------ nothing_trained


def _store(tmp_path: Path, children: list[dict[str, str]]) -> tuple[MlflowClient, str, str]:
    """A real MLflow store with one parent run and child runs carrying ``children``'s tags."""
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp_id = client.create_experiment("e", artifact_location=(tmp_path / "mlruns").as_uri())
    parent = client.create_run(exp_id).info.run_id
    for tags in children:
        child = client.create_run(exp_id, tags={"mlflow.parentRunId": parent, **tags})
        client.set_terminated(
            child.info.run_id, "FAILED" if tags.get("hybridnas.status") == "failed" else "FINISHED"
        )
    return client, exp_id, parent


def _failed(error: str) -> dict[str, str]:
    return {"hybridnas.status": "failed", "hybridnas.error": error}


def test_nothing_trained_names_the_most_common_error(tmp_path):
    ray_text = "Traceback (most recent call last):\n  File ...\nDataError: cifar10: no batch files in /d\n\nMore advice"
    client, exp_id, parent = _store(
        tmp_path,
        [
            _failed(ray_text),
            _failed("RuntimeError: boom"),
            _failed(ray_text),
            {"hybridnas.status": "infeasible"},
        ],
    )
    assert nothing_trained(client, exp_id, parent) == (
        "no trial trained: 3 of 4 failed (1 more infeasible); the most common error (2 of 3): "
        "DataError: cifar10: no batch files in /d"
    )


def test_nothing_trained_says_when_every_architecture_was_infeasible(tmp_path):
    infeasible = {"hybridnas.status": "infeasible", "hybridnas.violations": "macs 3.1M > 1M"}
    client, exp_id, parent = _store(tmp_path, [infeasible, infeasible])
    why = nothing_trained(client, exp_id, parent)
    assert why.startswith("no trial trained: all 2 architectures were infeasible (e.g. macs 3.1M > 1M)")


def test_one_trained_trial_is_enough(tmp_path):
    client, exp_id, parent = _store(tmp_path, [_failed("RuntimeError: boom"), {"hybridnas.status": "ok"}])
    assert nothing_trained(client, exp_id, parent) is None


def test_errors_that_differ_only_in_numbers_count_as_one(tmp_path):
    client, exp_id, parent = _store(
        tmp_path,
        [
            _failed("ValueError: x"),
            _failed("RuntimeError: trial 3 ran out"),
            _failed("RuntimeError: trial 15 ran out"),
        ],
    )
    assert nothing_trained(client, exp_id, parent).endswith("(2 of 3): RuntimeError: trial 3 ran out")
