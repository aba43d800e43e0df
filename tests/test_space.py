"""SearchSpace: counting, enumeration, sampling with real Optuna samplers (and Ray's OptunaSearch), errors."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import optuna
import pytest
import torch

from hybridnas.search_space import GRID_PARAM, ArchSpec, InputSpec, SearchSpace, SpecError, build_model

optuna.logging.set_verbosity(optuna.logging.WARNING)
ROOT = Path(__file__).resolve().parents[1]

CONV = {
    "input": {"channels": 1, "size": 16, "classes": 10},
    "stem": {"channels": [8, 16]},
    "stages": [
        {"mixer": "conv", "depth": [1, 2], "channels": [8, 16], "addon": ["none", "gc"]},
        {"mixer": "conv", "depth": 1, "channels": 16, "downsample": ["conv", "spd"]},
    ],
    "mixer_options": {"conv": {"kernel": [3, 5]}},
}
# heads 8 does not divide 12: counted only where valid, repaired when sampled.
HEADS = {
    "input": {"channels": 1, "size": 16, "classes": 10},
    "stem": {"channels": 8},
    "stages": [
        {"mixer": ["conv", "window"], "depth": 1, "channels": [8, 12], "downsample": "conv"},
        {
            "mixer": ["window", "shifted_window", "conv"],
            "depth": [1, 2],
            "channels": 16,
            "downsample": "conv",
        },
    ],
    "mixer_options": {
        "window": {"heads": [2, 4, 8], "window": [2, 4]},
        "shifted_window": {"heads": [2, 4, 8], "window": [2, 4]},
    },
}
# Two mixers give `heads` different choice lists: the parameter name carries the mixer.
MIXED = {
    "input": {"channels": 1, "size": 16, "classes": 10},
    "stem": {"channels": 8},
    "norm": ["batchnorm", "layernorm"],
    "stages": [
        {"mixer": ["axial", "window"], "depth": 1, "channels": [8, 16], "downsample": "spd"},
    ],
    "mixer_options": {"axial": {"heads": [1, 2]}, "window": {"heads": [2, 4], "window": 4}},
}
SMALL_SPACES = {"conv": CONV, "heads": HEADS, "mixed": MIXED}


def as_list(v):
    return v if isinstance(v, list) else [v]


def brute_force(d: dict) -> set[str]:
    """Independent count: every raw combination the file allows, kept when ArchSpec accepts it."""
    per_stage = []
    for st in d["stages"]:
        variants = []
        for m in as_list(st["mixer"]):
            opts = d.get("mixer_options", {}).get(m, {})
            names = list(opts)
            for combo in itertools.product(*(as_list(opts[n]) for n in names)):
                for depth, ch, addon, ds in itertools.product(
                    as_list(st["depth"]),
                    as_list(st["channels"]),
                    as_list(st.get("addon", "none")),
                    as_list(st.get("downsample", "none")),
                ):
                    variants.append(
                        {
                            "mixer": m,
                            "depth": depth,
                            "channels": ch,
                            "addon": addon,
                            "downsample": ds,
                            "options": dict(zip(names, combo)),
                        }
                    )
        per_stage.append(variants)
    out = set()
    for stem in as_list(d.get("stem", {}).get("channels", 32)):
        for norm in as_list(d.get("norm", "batchnorm")):
            for stages in itertools.product(*per_stage):
                try:
                    spec = ArchSpec.from_dict(
                        {
                            "input": d["input"],
                            "stem": {"channels": stem},
                            "norm": norm,
                            "stages": list(stages),
                        },
                        warn=False,
                    )
                except SpecError:
                    continue
                out.add(spec.arch_hash())
    return out


def quiet(d: dict) -> SearchSpace:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SearchSpace.from_dict(d)


# ---- counting and enumeration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SMALL_SPACES)
def test_size_equals_distinct_enumerated_equals_brute_force(name):
    d = SMALL_SPACES[name]
    space = quiet(d)
    archs = space.enumerate()
    hashes = {a.arch_hash() for a in archs}
    assert space.size() == len(archs) == len(hashes)
    assert hashes == brute_force(d)


def test_size_counts_options_only_under_their_mixer():
    d = {
        "stages": [{"mixer": ["conv", "window"], "depth": 1, "channels": 16}],
        "mixer_options": {"window": {"window": [2, 4, 7]}, "conv": {"kernel": 3}},
    }
    assert quiet(d).size() == 1 + 3  # conv once, window three times


def test_heads_that_do_not_divide_a_width_are_not_counted():
    d = {
        "stages": [{"mixer": "window", "depth": 1, "channels": [8, 12]}],
        "mixer_options": {"window": {"heads": [4, 8]}},
    }
    assert quiet(d).size() == 2 + 1  # width 8: heads 4, 8; width 12: heads 4


def test_size_is_exact_for_a_large_space_without_enumerating():
    space = quiet(CONV)
    assert space.size() == 2 * (2 * 2 * 2 * 2) * (1 * 2 * 2)
    with pytest.raises(SpecError, match="at most 10"):
        space.enumerate(limit=10)


def test_space_to_dict_round_trips():
    for d in SMALL_SPACES.values():
        space = quiet(d)
        again = quiet(space.to_dict())
        assert again == space and again.size() == space.size()


# ---- sampling -------------------------------------------------------------------------------------------------


def objectives(spec: ArchSpec) -> tuple[float, float]:
    width = sum(s.channels * s.depth for s in spec.stages)
    return float(width % 7), float(width)


@pytest.mark.parametrize(
    "make_sampler",
    [
        lambda: optuna.samplers.TPESampler(seed=0, n_startup_trials=5),
        lambda: optuna.samplers.RandomSampler(seed=0),
        lambda: optuna.samplers.NSGAIISampler(seed=0, population_size=6),
    ],
    ids=["tpe", "random", "nsga2"],
)
@pytest.mark.parametrize("name", ["heads", "mixed"])
def test_real_samplers_produce_valid_buildable_specs(make_sampler, name):
    space = quiet(SMALL_SPACES[name])
    every = {a.arch_hash() for a in space.enumerate()}
    names = {p.name for p in space.params()}
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler())
    built = set()
    for _ in range(18):
        trial = study.ask()
        spec = space.suggest(trial)
        assert ArchSpec.from_dict(spec.to_dict(), warn=False) == spec  # valid
        assert spec.arch_hash() in every  # and one of the counted architectures
        assert set(trial.params) <= names
        for i, stage in enumerate(spec.stages):  # options only for the mixer that was chosen
            for key in trial.params:
                if key.startswith(f"stages.{i}.") and key.split(".")[2] not in (
                    "mixer",
                    "depth",
                    "channels",
                    "addon",
                    "downsample",
                    "mlp_ratio",
                ):
                    assert key.split(".")[-1] in stage.options
        if spec.arch_hash() not in built and len(built) < 3:
            built.add(spec.arch_hash())
            out = build_model(spec).eval()(torch.randn(1, 1, 16, 16))
            assert out.shape == (1, 10)
        study.tell(trial, objectives(spec))


def test_parameter_names_are_readable_and_qualified_only_when_choices_differ():
    heads = {p.name: p for p in quiet(HEADS).params()}
    assert {"stages.0.mixer", "stages.0.channels", "stages.0.heads", "stages.0.window"} <= set(heads)
    assert heads["stages.1.heads"].condition == "stages.1.mixer in (window, shifted_window)"
    mixed = {p.name for p in quiet(MIXED).params()}
    assert {"stages.0.axial.heads", "stages.0.window.heads", "norm"} <= mixed
    assert "stages.0.window" not in mixed  # fixed (one value): not a parameter


def test_invalid_heads_are_repaired_deterministically_and_recorded():
    d = {
        "stages": [{"mixer": "window", "depth": 1, "channels": 12}],
        "mixer_options": {"window": {"heads": [8, 2, 4]}},
    }
    space = quiet(d)
    for _ in range(2):
        trial = optuna.trial.FixedTrial({"stages.0.heads": 8})
        spec = space.suggest(trial)
        assert spec.stages[0].options["heads"] == 2  # nearest valid choice in list order
        assert trial.user_attrs["repaired"] == {"stages.0.options.heads": 2}


def test_grid_sampler_over_enumerate_covers_every_architecture():
    space = quiet(MIXED)  # small: Optuna's GridSampler costs milliseconds per trial
    n = space.size()
    study = optuna.create_study(sampler=optuna.samplers.GridSampler(space.grid_search_space(), seed=0))
    seen = set()

    def objective(trial):
        spec = space.suggest(trial)  # the grid sampler is detected
        assert set(trial.params) == {GRID_PARAM}
        seen.add(spec.arch_hash())
        return 0.0

    study.optimize(objective, n_trials=n)
    assert seen == {a.arch_hash() for a in space.enumerate()}
    assert len(seen) == n


def test_suggest_uses_the_datasets_input():
    space = quiet(CONV)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    spec = space.suggest(study.ask(), input=InputSpec(channels=3, size=32, classes=100))
    assert spec.input == InputSpec(3, 32, 100)
    assert build_model(spec).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 100)
    with pytest.raises(SpecError, match=r"stages\[1\]\.downsample"):
        space.suggest(study.ask(), input=InputSpec(1, 1, 10))  # a 1x1 input cannot downsample


def test_ray_optuna_search_define_by_run_gives_valid_specs():
    from ray.tune.search.optuna import OptunaSearch

    space = quiet(HEADS)
    every = {a.arch_hash() for a in space.enumerate()}

    def define(trial):
        return {"arch": space.suggest(trial).to_dict()}

    searcher = OptunaSearch(
        space=define,
        metric=["val_acc", "macs"],
        mode=["max", "min"],
        sampler=optuna.samplers.NSGAIISampler(seed=0, population_size=4),
    )
    for i in range(10):
        config = searcher.suggest(f"trial_{i}")
        spec = ArchSpec.from_dict(config["arch"], warn=False)
        assert spec.arch_hash() in every
        assert config["stages.0.mixer"] == spec.stages[0].mixer  # Ray also records the sampled params
        acc, macs = objectives(spec)
        searcher.on_trial_complete(f"trial_{i}", result={"val_acc": acc, "macs": macs})


# ---- errors ---------------------------------------------------------------------------------------------------


def space_with(stage_changes: dict | None = None, **top) -> dict:
    d = {
        "stages": [
            {"mixer": "conv", "depth": 1, "channels": 8},
            {"mixer": ["conv", "window"], "depth": 1, "channels": 16},
        ]
    }
    if stage_changes:
        d["stages"][1] = {**d["stages"][1], **stage_changes}
    d.update(top)
    return d


@pytest.mark.parametrize(
    "d, path, words",
    [
        (
            space_with({"mixer": ["conv", "windw"]}),
            "space.stages[1].mixer[1]",
            ["'windw'", "did you mean 'window'"],
        ),
        (space_with(mixer_options={"windw": {}}), "space.mixer_options.windw", ["did you mean 'window'"]),
        (
            space_with(mixer_options={"window": {"windw": [4, 7]}}),
            "space.mixer_options.window.windw",
            ["unknown option", "did you mean 'window'"],
        ),
        (
            space_with(mixer_options={"window": {"window": [4, "big"]}}),
            "space.mixer_options.window.window[1]",
            ["integer"],
        ),
        (space_with({"depth": []}), "space.stages[1].depth", ["empty"]),
        (space_with({"depth": [1, 2, 1]}), "space.stages[1].depth[2]", ["duplicate"]),
        (space_with({"channels": [16, 30]}), "space.stages[1].channels", ["30", "window", "heads 4"]),
        (space_with({"options": {"window": 4}}), "space.stages[1].options", ["mixer_options"]),
        (space_with({"dpth": 1}), "space.stages[1].dpth", ["did you mean 'depth'"]),
        (space_with(norm=["batchnorm", "rms"]), "space.norm[1]", ["batchnorm, layernorm"]),
        ({"stem": {"channels": [8]}}, "space.stages", ["required"]),
        (
            {
                "input": {"size": 4},
                "stages": [{"mixer": "conv", "depth": 1, "channels": 8, "downsample": ["none", "conv"]}] * 3,
            },
            "space.stages[2].downsample",
            ["1x1", "4x4 input allows 2"],
        ),
    ],
)
def test_invalid_spaces_raise_spec_error_with_key_path(d, path, words):
    with pytest.raises(SpecError) as e:
        quiet(d)
    assert e.value.path == path, str(e.value)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_fixed_mixer_stage_may_write_options_directly():
    d = space_with({"mixer": "window", "options": {"window": [2, 4]}})
    assert quiet(d).size() == 2


def test_window_larger_than_any_map_a_stage_can_see_warns():
    d = {
        "input": {"size": 8},
        "stages": [{"mixer": "window", "depth": 1, "channels": 8, "downsample": "conv"}],
        "mixer_options": {"window": {"window": [2, 7], "heads": 2}},
    }
    with pytest.warns(UserWarning, match=r"space\.stages\[0\]: mixer 'window' with window 7: .*at most 4x4"):
        SearchSpace.from_dict(d)


def test_from_yaml_reads_the_space_of_an_experiment_file():
    space = SearchSpace.from_yaml(ROOT / "experiments" / "quickstart.yaml")
    assert space.size() > 100
    assert "stages.1.mixer" in {p.name for p in space.params()}
