"""Bad input over the whole command line, each case in a fresh process as a user would meet it.

For every case: exit code 2, exactly one line on stderr that starts ``hybridnas: error:`` and names the
key, flag or file, no traceback, done within a bound, and nothing left behind in the working directory
(no ``mlflow.db``, no ``mlruns/``, no output folder). Every case fails before Ray or MLflow start, so the
table stays fast; each row is its own test, so ``pytest -n 2`` spreads them.
"""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

BOUND_S = 60.0  # per case; a case that waits on a network or a cluster fails here instead of hanging

ARCH = {
    "input": {"channels": 1, "size": 8, "classes": 4},
    "stem": {"channels": 8},
    "stages": [{"mixer": "conv", "depth": 1, "channels": 8}],
}
EXPERIMENT = {
    "name": "bad",
    "data": {"dataset": "synthetic", "size": 8, "channels": 1, "classes": 4, "samples": 64},
    "train": {"epochs": 1, "batch_size": 16},
    "space": {"stages": [{"mixer": ["conv", "window"], "depth": 1, "channels": 8}]},
    "search": {"trials": 2},
}
ABLATION = {
    "name": "bad",
    "base": "arch.yaml",
    "data": {"dataset": "synthetic", "size": 8, "channels": 1, "classes": 4, "samples": 64},
    "train": {"epochs": 1, "batch_size": 16},
    "vary": {"stages.0.mixer": ["window"]},
    "seeds": [0, 1],
}


def experiment(**sections) -> str:
    """The small valid experiment with some sections replaced (merged one level deep)."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in EXPERIMENT.items()}
    for k, v in sections.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return yaml.safe_dump(d, sort_keys=False)


def ablation(**keys) -> str:
    d = {**ABLATION, **keys}
    return yaml.safe_dump(d, sort_keys=False)


ARCH_YAML = yaml.safe_dump(ARCH, sort_keys=False)
DIGITS_ARCH_YAML = yaml.safe_dump(
    {**ARCH, "input": {"channels": 1, "size": 8, "classes": 10}}, sort_keys=False
)
BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10"


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # after `hybridnas`; the process runs in a fresh directory holding `files`
    words: tuple[str, ...]  # each appears in the error line (the key, flag or file, and what is allowed)
    files: dict[str, str | bytes] = field(default_factory=dict)
    # Called with the directory before the run (e.g. to take a permission away); may skip the case,
    # and may return a function that undoes what it did.
    setup: Callable[[Path], Callable[[], None] | None] | None = None


def _unreadable(d: Path) -> None:
    (d / "a.yaml").chmod(0)
    if os.access(d / "a.yaml", os.R_OK):
        pytest.skip("running as root: every file is readable, so an unreadable file cannot be made")


def _read_only_dir(d: Path) -> Callable[[], None]:
    """``d/ro``: a directory this process cannot write (chmod; as root, the immutable attribute)."""
    ro = d / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root ignores permissions; the immutable attribute binds root too
        done = subprocess.run(["chattr", "+i", str(ro)], capture_output=True)
        if done.returncode != 0 or os.access(ro, os.W_OK):
            pytest.skip("running as root without chattr +i: no directory can be made unwritable here")
        return lambda: subprocess.run(["chattr", "-i", str(ro)], check=True)
    return lambda: ro.chmod(0o755)


def _no_gpu(d: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: asking for one is not an error here")


CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
CIFAR_EXPERIMENT = yaml.safe_dump(
    {**EXPERIMENT, "data": {"dataset": "cifar10", "root": "cifar"}}, sort_keys=False
)
CIFAR_ABLATION = yaml.safe_dump(
    {
        **ABLATION,
        "data": {"dataset": "cifar10", "root": "cifar"},
        "base": {**ARCH, "input": {"channels": 3, "size": 32, "classes": 10}},
    },
    sort_keys=False,
)


CASES = [
    # values checked for meaning, not only type: experiment files
    Case("space-lr-nan", ("space", "e.yaml"), ("train.lr", "finite", "nan"), {"e.yaml": experiment(train={"lr": float("nan")})}),
    Case("search-lr-nan", ("search", "e.yaml"), ("train.lr", "finite"), {"e.yaml": experiment(train={"lr": float("nan")})}),
    Case("search-label-smoothing-2", ("search", "e.yaml"), ("train.label_smoothing", "< 1.0", "probability"), {"e.yaml": experiment(train={"label_smoothing": 2.0})}),
    Case("search-negative-weight-decay", ("search", "e.yaml"), ("train.weight_decay", ">= 0"), {"e.yaml": experiment(train={"weight_decay": -0.05})}),
    Case("search-data-seed-negative", ("search", "e.yaml"), ("data.seed", ">= 0", "-1"), {"e.yaml": experiment(data={"seed": -1})}),
    Case("search-epochs-10e12", ("search", "e.yaml"), ("train.epochs", "<= 10,000"), {"e.yaml": experiment(train={"epochs": 10**12})}),
    Case("search-threads-negative", ("search", "e.yaml"), ("train.threads", ">= 0"), {"e.yaml": experiment(train={"threads": -1})}),
    Case("search-train-seed-too-big", ("search", "e.yaml"), ("train.seed", "<= 4,294,967,295"), {"e.yaml": experiment(train={"seed": 2**40})}),
    Case("search-synthetic-too-big", ("search", "e.yaml"), ("data.samples", "at most"), {"e.yaml": experiment(data={"samples": 10**7, "size": 64})}),
    Case("search-binary-file", ("search", "e.yaml"), ("e.yaml", "not a UTF-8 text file"), {"e.yaml": BINARY}),
    Case("search-control-character", ("search", "e.yaml"), ("e.yaml", "line 1", "not allowed"), {"e.yaml": "name: a\x00b\n"}),
    Case("search-epochs-flag", ("search", "e.yaml", "--epochs", "100000"), ("--epochs", "<= 10,000"), {"e.yaml": experiment()}),
    Case("search-trials-flag", ("search", "e.yaml", "--trials", "0"), ("--trials", ">= 1"), {"e.yaml": experiment()}),
    Case("search-missing-file", ("search", "nope.yaml"), ("nope.yaml", "not found")),
    # space
    Case("space-samples-10e8", ("space", "e.yaml", "--samples", "100000000"), ("--samples", "<= 1,000"), {"e.yaml": experiment()}),
    Case("space-samples-negative", ("space", "e.yaml", "--samples", "-1"), ("--samples", ">= 0"), {"e.yaml": experiment()}),
    Case("space-seed-negative", ("space", "e.yaml", "--seed", "-1"), ("--seed", ">= 0"), {"e.yaml": experiment()}),
    # ablation files
    Case("ablate-binary-file", ("ablate", "a.yaml"), ("a.yaml", "not a UTF-8 text file"), {"a.yaml": BINARY}),
    Case("ablate-directory", ("ablate", "a.yaml"), ("a.yaml", "is a directory"), setup=lambda d: (d / "a.yaml").mkdir()),
    Case(
        "ablate-unreadable-file", ("ablate", "a.yaml"), ("a.yaml", "cannot read", "ermission denied"),
        {"a.yaml": ablation(), "arch.yaml": ARCH_YAML}, setup=_unreadable,
    ),
    Case("ablate-duplicate-key", ("ablate", "a.yaml"), ("a.yaml", "duplicate key 'seeds'"), {"a.yaml": ablation() + "seeds: [3, 4]\n", "arch.yaml": ARCH_YAML}),
    Case("ablate-negative-seed", ("ablate", "a.yaml"), ("seeds[0]", ">= 0"), {"a.yaml": ablation(seeds=[-1, 0]), "arch.yaml": ARCH_YAML}),
    Case("ablate-seeds-flag-negative", ("ablate", "a.yaml", "--seeds=-1,2"), ("seeds[0]", ">= 0"), {"a.yaml": ablation(), "arch.yaml": ARCH_YAML}),
    Case("ablate-seeds-flag-junk", ("ablate", "a.yaml", "--seeds", "a"), ("--seeds", "comma-separated"), {"a.yaml": ablation(), "arch.yaml": ARCH_YAML}),
    Case(
        "ablate-label-smoothing-factor", ("ablate", "a.yaml"), ("vary.train.label_smoothing", "2.0", "< 1.0"),
        {"a.yaml": ablation(vary={"train.label_smoothing": [0.0, 2.0]}), "arch.yaml": ARCH_YAML},
    ),
    Case("ablate-data-seed-negative", ("ablate", "a.yaml"), ("data.seed", ">= 0"), {"a.yaml": ablation(data={"dataset": "digits", "seed": -1}), "arch.yaml": ARCH_YAML}),
    Case("ablate-missing-base", ("ablate", "a.yaml"), ("base", "arch.yaml", "not found"), {"a.yaml": ablation()}),
    # train and profile
    Case("train-lr-nan", ("train", "arch.yaml", "--data", "digits", "--lr", "nan"), ("--lr", "finite", "nan"), {"arch.yaml": ARCH_YAML}),
    Case("train-lr-zero", ("train", "arch.yaml", "--lr", "0"), ("--lr", "> 0"), {"arch.yaml": ARCH_YAML}),
    Case("train-threads-negative", ("train", "arch.yaml", "--data", "digits", "--threads", "-1"), ("--threads", ">= 1"), {"arch.yaml": ARCH_YAML}),
    Case("train-epochs-zero", ("train", "arch.yaml", "--data", "digits", "--epochs", "0"), ("--epochs", ">= 1"), {"arch.yaml": ARCH_YAML}),
    Case("train-seed-negative", ("train", "arch.yaml", "--seed", "-1"), ("--seed", ">= 0"), {"arch.yaml": ARCH_YAML}),
    Case("train-unknown-flag", ("train", "arch.yaml", "--bogus"), ("unrecognized arguments: --bogus",), {"arch.yaml": ARCH_YAML}),
    Case("train-out-under-a-file", ("train", "arch.yaml", "--data", "digits", "--out", "afile/run"), ("--out", "afile is a file"), {"arch.yaml": DIGITS_ARCH_YAML, "afile": "x"}),
    Case("train-out-read-only", ("train", "arch.yaml", "--data", "digits", "--out", "ro/run"), ("--out", "ro is not writable"), {"arch.yaml": DIGITS_ARCH_YAML}, setup=_read_only_dir),
    Case("profile-threads-negative", ("profile", "arch.yaml", "--latency", "--threads", "-1"), ("--threads", ">= 1"), {"arch.yaml": ARCH_YAML}),
    Case("profile-batch-size-zero", ("profile", "arch.yaml", "--latency", "--batch-size", "0"), ("--batch-size", ">= 1"), {"arch.yaml": ARCH_YAML}),
    Case("train-binary-arch", ("train", "arch.yaml"), ("arch.yaml", "not a UTF-8 text file"), {"arch.yaml": BINARY}),
    Case("profile-binary-arch", ("profile", "arch.yaml"), ("arch.yaml", "not a UTF-8 text file"), {"arch.yaml": BINARY}),
    Case("search-missing-argument", ("search",), ("required: experiment", "hybridnas search --help")),
    # the data a search needs, checked in the driver before MLflow or Ray
    Case("search-cifar10-missing", ("search", "e.yaml"), ("cifar10: no batch files in", "cifar", "download: true"), {"e.yaml": CIFAR_EXPERIMENT}),
    Case(
        "search-cifar10-one-file-missing", ("search", "e.yaml"), ("cifar-10-batches-py has", "but not data_batch_4"),
        {"e.yaml": CIFAR_EXPERIMENT, **{f"cifar/cifar-10-batches-py/{f}": b"" for f in CIFAR10_FILES if f != "data_batch_4"}},
    ),
    Case("ablate-cifar10-missing", ("ablate", "a.yaml"), ("cifar10: no batch files in",), {"a.yaml": CIFAR_ABLATION}),
    # what this machine or cluster lacks, reported before mlflow.db or mlruns/ exist
    Case("search-resources-cpu-1000", ("search", "e.yaml"), ("resources.cpu", "asks for 1000", "this machine has"), {"e.yaml": experiment(resources={"cpu": 1000})}),
    Case("ablate-resources-cpu-1000", ("ablate", "a.yaml"), ("resources.cpu", "asks for 1000"), {"a.yaml": ablation(resources={"cpu": 1000}), "arch.yaml": ARCH_YAML}),
    Case("search-resources-gpu", ("search", "e.yaml"), ("resources.gpu", "asks for 1"), {"e.yaml": experiment(resources={"gpu": 1})}, setup=_no_gpu),
    Case("search-latency-cuda", ("search", "e.yaml"), ("latency.device", "no CUDA GPU"), {"e.yaml": experiment(latency={"device": "cuda"})}, setup=_no_gpu),
    Case("ablate-latency-cuda", ("ablate", "a.yaml"), ("latency.device", "no CUDA GPU"), {"a.yaml": ablation(latency={"device": "cuda"}), "arch.yaml": ARCH_YAML}, setup=_no_gpu),
    Case("search-train-device-cuda", ("search", "e.yaml"), ("train.device", "no GPU"), {"e.yaml": experiment(train={"device": "cuda"})}, setup=_no_gpu),
    # output folders that cannot be written: nothing created, not even the tracking store
    Case("search-out-under-a-file", ("search", "e.yaml", "--out", "afile/out"), ("--out", "afile is a file"), {"e.yaml": experiment(), "afile": "x"}),
    Case("search-out-dir-read-only", ("search", "e.yaml"), ("out_dir", "ro is not writable"), {"e.yaml": experiment(out_dir="ro/out")}, setup=_read_only_dir),
    Case("ablate-out-under-a-file", ("ablate", "a.yaml", "--out", "afile/out"), ("--out", "afile is a file"), {"a.yaml": ablation(), "arch.yaml": ARCH_YAML, "afile": "x"}),
    Case("ablate-out-dir-read-only", ("ablate", "a.yaml"), ("out_dir", "ro is not writable"), {"a.yaml": ablation(out_dir="ro/out"), "arch.yaml": ARCH_YAML}, setup=_read_only_dir),
    Case("export-out-under-a-file", ("export", "--experiment", "x", "--out", "afile/x.yaml"), ("--out", "afile is a file"), {"afile": "x"}),
    Case("export-pareto-out-read-only", ("export", "--experiment", "x", "--select", "pareto", "--out", "ro/front"), ("--out", "ro is not writable"), setup=_read_only_dir),
    Case("pareto-out-under-a-file", ("pareto", "--experiment", "x", "--out", "afile/p"), ("--out", "afile is a file"), {"afile": "x"}),
    # tracking stores MLflow has no store for
    Case("search-tracking-uri-unknown-scheme", ("search", "e.yaml", "--tracking-uri", "foo://bar"), ("tracking URI foo://bar", "no MLflow store", "sqlite"), {"e.yaml": experiment()}),
    Case("export-tracking-uri-unknown-scheme", ("export", "--experiment", "x", "--tracking-uri", "foo://bar"), ("tracking URI foo://bar", "no MLflow store")),
    # clusters that are not there: fail within seconds, before MLflow
    Case("search-address-closed-port", ("search", "e.yaml", "--address", "127.0.0.1:1"), ("cannot join the Ray cluster at '127.0.0.1:1'", "refused"), {"e.yaml": experiment()}),
    Case("search-address-ray-client-closed-port", ("search", "e.yaml", "--address", "ray://127.0.0.1:1"), ("cannot join the Ray cluster at 'ray://127.0.0.1:1'",), {"e.yaml": experiment()}),
    Case("search-address-not-ray", ("search", "e.yaml", "--address", "127.0.0.1:{http_port}"), ("answers, but not as a Ray cluster",), {"e.yaml": experiment()}),
    Case("search-address-malformed", ("search", "e.yaml", "--address", "host:port"), ("expected HOST:PORT",), {"e.yaml": experiment()}),
    Case("ablate-address-closed-port", ("ablate", "a.yaml", "--address", "127.0.0.1:1"), ("cannot join the Ray cluster at '127.0.0.1:1'",), {"a.yaml": ablation(), "arch.yaml": ARCH_YAML}),
    Case("search-connect-timeout-zero", ("search", "e.yaml", "--connect-timeout", "0"), ("--connect-timeout", "> 0"), {"e.yaml": experiment()}),
]  # fmt: skip


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time."""
    out = {}
    for p in sorted(root.rglob("*")):
        try:
            st = p.lstat()
        except OSError:
            continue
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def run_cli(
    argv: list[str], cwd: Path, timeout: float = BOUND_S
) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m hybridnas.runners.cli ARGV`` in a fresh process, in ``cwd``; (result, seconds)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env["HYBRIDNAS_CACHE_DIR"] = str(cwd / ".cache")  # must stay absent too
    t = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "hybridnas.runners.cli", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return res, time.monotonic() - t


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def http_port(tmp_path_factory):
    """A port on loopback where something answers that is not Ray (a plain HTTP server)."""
    handler = functools.partial(_Quiet, directory=str(tmp_path_factory.mktemp("www")))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_one_line_naming_it_and_leaves_nothing_behind(
    case: Case, tmp_path: Path, request: pytest.FixtureRequest
):
    for name, content in case.files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    undo = case.setup(tmp_path) if case.setup is not None else None
    if undo is not None:
        request.addfinalizer(undo)
    argv = list(case.argv)
    if any("{http_port}" in a for a in argv):
        port = request.getfixturevalue("http_port")
        argv = [a.replace("{http_port}", str(port)) for a in argv]
    before = _tree(tmp_path)
    res, seconds = run_cli(argv, tmp_path)
    err = res.stderr
    assert "Traceback" not in err + res.stdout, err
    assert res.returncode == 2, f"exit {res.returncode}; stderr: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("hybridnas: error: "), lines[0]
    for w in case.words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    assert seconds < BOUND_S
    assert _tree(tmp_path) == before, f"the command left files behind: {set(_tree(tmp_path)) - set(before)}"


def test_every_case_has_its_own_id():
    assert len({c.id for c in CASES}) == len(CASES)
