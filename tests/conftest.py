import os

import pytest
import torch

# Two cores on CI: keep each test process to one intra-op thread so that tests are deterministic
# and Ray trials started by tests do not oversubscribe the machine.
torch.set_num_threads(1)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


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
