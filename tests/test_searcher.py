"""The searcher tells Optuna what each trial was: a trial stopped at a rung is COMPLETE with its
values at that rung (the rung recorded), and NSGA-II and TPE keep working on such studies."""

from __future__ import annotations

import warnings

import pytest
from optuna.trial import TrialState

from hybridnas.runners.searcher import ArchSearcher, ArchSuggester, make_sampler
from hybridnas.search_space.experiment import Experiment

OBJ = [("val_acc", "max"), ("macs", "min")]
N = 24


@pytest.fixture(scope="module")
def suggester(tmp_path_factory):
    exp = Experiment.from_dict(
        {
            "name": "s",
            "data": {"dataset": "synthetic", "size": 8, "channels": 1, "classes": 2},
            "space": {
                "stem": {"channels": [8, 16]},
                "stages": [
                    {
                        "mixer": ["conv", "window"],
                        "depth": [1, 2],
                        "channels": [8, 16],
                        "addon": ["none", "gc", "ca"],
                    }
                ],
                "mixer_options": {"window": {"window": [2, 4], "heads": [2]}},
            },
        }
    )
    latency = {"device": "cpu", "batch_size": 1, "threads": 1}
    return CheapSuggester(exp.space.to_dict(), exp.input.to_dict(), {}, latency, None)


class CheapSuggester(ArchSuggester):
    """The real suggester with made-up measures (profiling and timing are not what is tested here)."""

    def measures(self, spec) -> dict[str, float]:
        st = spec.stages[0]
        macs = 1000 * spec.stem.channels + 500 * st.channels * st.depth
        return {"macs": macs, "flops": 2 * macs, "params": macs // 10, "latency_ms": macs / 1e4}


def accuracy(config: dict) -> float:
    """A made-up final accuracy that rewards conv stages and width."""
    arch = config["arch"]["stages"][0]
    return 0.6 + 0.2 * (arch["mixer"] == "conv") + 0.01 * arch["channels"]


_DRIVEN: dict = {}


def driven(suggester, sampler: str, stopping: bool = True) -> tuple[ArchSearcher, list[dict]]:
    if (sampler, stopping) not in _DRIVEN:
        _DRIVEN[sampler, stopping] = drive(suggester, sampler, stopping)
    return _DRIVEN[sampler, stopping]


def drive(suggester, sampler: str, stopping: bool = True) -> tuple[ArchSearcher, list[dict]]:
    """N trials: two of every three stopped at epoch 1 with a lower accuracy, the rest finished."""
    searcher = ArchSearcher(suggester, make_sampler(sampler, 0, N), OBJ, stopping=stopping)
    results = []
    for i in range(N):
        cfg = searcher.suggest(f"t{i}")
        acc = accuracy(cfg)
        if i % 3:
            r = {"status": "running", "epoch": 1, "val_acc": 0.6 * acc, **cfg["predicted"]}
        else:
            r = {"status": "ok", "epoch": 4, "val_acc": acc, **cfg["predicted"]}
        searcher.on_trial_complete(f"t{i}", r)
        results.append({**r, "number": searcher.study.trials[-1].number})
    return searcher, results


@pytest.mark.parametrize("sampler", ["nsga2", "tpe"])
def test_a_stopped_trial_is_complete_with_its_values_at_the_rung_and_the_rung_recorded(suggester, sampler):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns about missing constraints or values: none here
        searcher, results = driven(suggester, sampler)
    trials = {t.number: t for t in searcher.study.trials}
    for r in results:
        t = trials[r["number"]]
        assert t.state == TrialState.COMPLETE
        assert t.values == [r["val_acc"], r["macs"]]
        assert t.user_attrs.get("rung") == (1 if r["status"] == "running" else None)
    assert not searcher.open


def test_nsga2_breeds_from_studies_with_stopped_trials(suggester):
    searcher, _ = driven(suggester, "nsga2")
    study = searcher.study
    # Stopped trials are complete, so they fill NSGA-II's generations (population max(4, N // 3)).
    generations = [study.sampler.get_trial_generation(study, t) for t in study.trials]
    assert max(generations) >= 2


def test_tpe_leaves_its_random_start_and_favours_what_did_well(suggester):
    searcher, results = driven(suggester, "tpe")
    startup = max(2, min(10, N // 4))
    later = [t for t in searcher.study.trials if t.number >= 2 * startup]
    conv = sum(t.params.get("stages.0.mixer") == "conv" for t in later)
    assert conv / len(later) > 0.5  # the mixer the made-up accuracy rewards


def test_without_a_scheduler_a_trial_ending_on_an_epoch_result_is_a_failure(suggester):
    searcher, results = driven(suggester, "random", stopping=False)
    states = {t.number: t.state for t in searcher.study.trials}
    for r in results:
        expected = TrialState.FAIL if r["status"] == "running" else TrialState.COMPLETE
        assert states[r["number"]] == expected


def test_a_replayed_stopped_result_is_told_like_the_stop_itself(suggester):
    searcher = ArchSearcher(suggester, make_sampler("random", 1, N), OBJ, stopping=True)
    cfg = searcher.suggest("a")
    searcher.on_trial_complete("a", {"status": "stopped", "epoch": 2, "val_acc": 0.5, **cfg["predicted"]})
    t = searcher.study.trials[-1]
    assert t.state == TrialState.COMPLETE and t.values[0] == 0.5 and t.user_attrs["rung"] == 2
