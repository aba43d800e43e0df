import os

import pytest
import torch

# Two cores on CI: keep each test process to one intra-op thread so that tests are deterministic
# and Ray trials started by tests do not oversubscribe the machine.
torch.set_num_threads(1)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def pytest_sessionstart(session):
    """The machine line first (CPU model, native bf16 or not, torch's CPU capability), also under
    ``-q``: a red run says which kind of machine it ran on. Once, from the controller under xdist."""
    if hasattr(session.config, "workerinput"):
        return
    from hybridnas.runners.machine import machine_line

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(machine_line())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """One local Ray per test module (started like a search starts it), and a private
    latency-table cache."""
    from hybridnas.runners.ray_runtime import init_ray

    os.environ["HYBRIDNAS_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    import ray

    if not ray.is_initialized():
        init_ray()
    yield ray
    ray.shutdown()


TINY_ARCH = """
input: {channels: 1, size: 8, classes: 3}
stem: {channels: 4}
stages:
  - {mixer: conv, depth: 1, channels: 4}
  - {mixer: shifted_window, depth: 2, channels: 8, downsample: conv, addon: gc, options: {heads: 2, window: 2}}
"""


@pytest.fixture
def tiny_spec():
    """A two-stage architecture on 8x8 inputs: every kind of latency unit, fast to time."""
    from hybridnas.search_space.spec import ArchSpec

    return ArchSpec.from_yaml(TINY_ARCH)
