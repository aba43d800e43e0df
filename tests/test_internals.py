"""runners.internals: the Ray and Optuna internals hybridnas relies on are still there in the
installed versions, and each workaround does what it says (a failing test here means an upgrade
moved one: adapt the workaround, or let it fall back)."""

import pickle
import threading

import optuna
import ray
from ray import cloudpickle
from ray.tune.search import Searcher

from hybridnas.runners import internals
from hybridnas.runners.searcher import make_sampler

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(sampler: str) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(sampler, 0, 12))
    for _ in range(6):
        t = study.ask()
        x = t.suggest_float("x", 0, 1)
        study.tell(t, [x, 1 - x])
    return study


def test_every_sampler_study_pickles_without_its_locks_and_gets_them_back():
    for name in ("nsga2", "nsga3", "tpe", "random"):
        study = _study(name)
        with internals.sampler_without_locks(study.sampler):
            blob = cloudpickle.dumps(study)
        # the live sampler got its locks back; the copy gets fresh ones
        copy = pickle.loads(blob)
        internals.restore_sampler_locks(copy.sampler)
        for s in (study.sampler, copy.sampler):
            assert all(v is not None for k, v in vars(s).items() if "lock" in k), name
        assert [t.params for t in copy.trials] == [t.params for t in study.trials]
        t = copy.ask()  # the restored sampler still samples
        assert 0 <= t.suggest_float("x", 0, 1) <= 1


def test_stripped_locks_are_real_locks_after_restore():
    study = _study("nsga2")
    with internals.sampler_without_locks(study.sampler):
        copy = pickle.loads(cloudpickle.dumps(study))
    internals.restore_sampler_locks(copy.sampler)
    locks = [v for k, v in vars(copy.sampler).items() if "lock" in k]
    assert locks and all(isinstance(v, (*internals._LOCK_TYPES, internals._PicklableLock)) for v in locks)
    assert not hasattr(copy.sampler, internals._LOCKS_ATTR)
    assert isinstance(threading.Lock(), internals._LOCK_TYPES)


def test_installed_ray_is_one_whose_system_config_was_checked():
    config = internals.worker_system_config(("torch",), 2)
    assert ray.__version__.startswith(internals.RAY_CHECKED), (
        f"ray {ray.__version__}: check preload_python_modules/num_workers_soft_limit and Tune's class_cache"
    )
    assert config == {"preload_python_modules": ["torch"], "num_workers_soft_limit": 2}


def test_tune_class_cache_lists_are_emptied_inside_and_restored_after():
    from ray.tune.execution import class_cache

    before = dict(class_cache.DEFAULT_ENV_VARS), set(class_cache.ENV_VARS_TO_PROPAGATE)
    assert before[0] or before[1]  # Tune still gives its actors env vars: the reason for the context
    with internals.tune_actors_without_env_vars():
        assert class_cache.DEFAULT_ENV_VARS == {} and class_cache.ENV_VARS_TO_PROPAGATE == set()
    assert (dict(class_cache.DEFAULT_ENV_VARS), set(class_cache.ENV_VARS_TO_PROPAGATE)) == before


class Counting(Searcher):
    """Suggests one fixed config and records which trials it was told of."""

    def __init__(self):
        super().__init__(metric="m", mode="max")
        self.told = []

    def suggest(self, trial_id):
        return {"x": 1}

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.told.append(trial_id)


def test_a_restored_concurrency_limiter_gives_vanished_trials_no_slot():
    # Ray restores the limiter's live trial ids from its snapshot; one that no restored trial
    # carries would hold a slot for good (a resumed concurrency-2 search ran one trial at a time).
    from hybridnas.runners.internals import concurrency_limiter

    before = concurrency_limiter(Counting(), 2)
    assert before.suggest("a") and before.suggest("b") and before.suggest("c") is None  # 2 at a time
    state = before.get_state()  # what Ray saves: 'a' and 'b' live

    after = pickle.loads(pickle.dumps(concurrency_limiter(Counting(), 2)))
    after.set_state(state)  # restored; 'a' is rerun by Tune, 'b' vanished between two snapshots
    assert after.suggest("c") and after.suggest("d")  # two new slots, whatever 'b' does
    assert after.suggest("e") is None
    after.on_trial_complete("a", {"m": 1.0})  # the restored trial that did run is told to the searcher
    after.on_trial_complete("c", {"m": 1.0})
    assert after.searcher.told == ["a", "c"] and after.suggest("e")
