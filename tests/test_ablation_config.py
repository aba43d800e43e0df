from pathlib import Path

import pytest
import yaml

from hybridnas.search_space.ablation import AblationStudy
from hybridnas.search_space.errors import SpecError

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
BASE = {
    "input": {"channels": 1, "size": 8, "classes": 4},
    "stem": {"channels": 8},
    "stages": [
        {"mixer": "conv", "depth": 1, "channels": 8},
        {"mixer": "conv", "depth": 1, "channels": 16, "downsample": "conv"},
    ],
}


def study(**kw):
    return AblationStudy.from_dict({"base": BASE, "seeds": [0, 1], **kw})


def test_one_at_a_time_is_the_base_plus_each_value_changed_alone():
    s = study(vary={"stages.1.mixer": ["conv", "window", "slide"], "stages.*.addon": ["none", "gc"]})
    assert [v.name for v in s.variants] == [
        "base",
        "stages.1.mixer=window",
        "stages.1.mixer=slide",
        "stages.*.addon=gc",
    ]
    assert s.variants[1].spec.stages[1].mixer == "window" and s.variants[1].spec.stages[0].mixer == "conv"
    assert all(st.addon == "gc" for st in s.variants[3].spec.stages)
    assert len(s.trials()) == 4 * 2


def test_grid_is_every_combination_with_the_base_once():
    s = study(vary={"stages.1.mixer": ["conv", "window", "slide"], "train.lr": [0.002, 0.01]}, mode="grid")
    # 3 x 2 combinations; (conv, 0.002) is the base itself (lr 0.002 is the default).
    assert len(s.variants) == 6
    assert s.variants[0].is_base
    assert {v.name for v in s.variants[1:]} == {
        "train.lr=0.01",
        "stages.1.mixer=window",
        "stages.1.mixer=window, train.lr=0.01",
        "stages.1.mixer=slide",
        "stages.1.mixer=slide, train.lr=0.01",
    }
    lr = {v.name: v.train.lr for v in s.variants}
    assert lr["stages.1.mixer=slide, train.lr=0.01"] == 0.01 and lr["stages.1.mixer=slide"] == 0.002


def test_mixer_option_paths_and_train_paths():
    s = study(vary={"stages.1.options.kernel": [3, 5], "train.epochs": [1, 2]})
    v = {x.name: x for x in s.variants}
    assert v["stages.1.options.kernel=5"].spec.stages[1].options["kernel"] == 5
    assert v["train.epochs=1"].train.epochs == 1


@pytest.mark.parametrize(
    "vary, match",
    [
        ({"stages.4.mixer": ["conv"]}, "vary.stages.4.mixer"),
        ({"stages.1.mixer": ["windw"]}, "did you mean 'window'"),
        ({"stages.1.options.heads": [3]}, "vary.stages.1.options.heads"),
        ({"train.lrr": [0.1]}, "vary.train.lrr"),
        ({"train.optimizer": ["lion"]}, "vary.train.optimizer"),
        ({"stages.1.mixer": ["conv"]}, "nothing to compare"),
        ({"stages.1.mixer": []}, "non-empty list"),
        ({"stages.1.mixer": "window"}, "non-empty list"),
    ],
)
def test_bad_factors_name_the_factor_before_anything_trains(vary, match):
    with pytest.raises(SpecError, match=match):
        study(vary=vary)


def test_window_heads_that_do_not_divide_the_width_are_rejected_for_that_value():
    with pytest.raises(SpecError, match=r"vary\.stages\.0\.options\.heads.*3"):
        AblationStudy.from_dict(
            {
                "base": {**BASE, "stages": [{"mixer": "window", "depth": 1, "channels": 8}]},
                "vary": {"stages.0.options.heads": [2, 3]},
            }
        )


def test_file_errors(tmp_path):
    with pytest.raises(SpecError, match="base"):
        AblationStudy.from_dict(
            {"base": "missing.yaml", "vary": {"stages.0.mixer": ["window"]}}, base_dir=tmp_path
        )
    with pytest.raises(SpecError, match="unknown key"):
        study(vary={"stages.1.mixer": ["window"]}, sedes=[0, 1])
    with pytest.raises(SpecError, match="mode"):
        study(vary={"stages.1.mixer": ["window"]}, mode="full")
    with pytest.raises(SpecError, match="seeds"):
        study(vary={"stages.1.mixer": ["window"]}, seeds=[0, 0])
    bad = tmp_path / "a.yaml"
    bad.write_text("base: [\n")
    with pytest.raises(SpecError, match="line"):
        AblationStudy.from_yaml(bad)


def test_seeds_and_train_factors_are_checked_for_meaning():
    with pytest.raises(SpecError, match=r"^seeds\[1\]: must be >= 0, got -1$"):
        study(vary={"stages.1.mixer": ["window"]}, seeds=[0, -1])
    with pytest.raises(SpecError, match=r"^vary.train.label_smoothing: value 2.0: must be < 1"):
        study(vary={"train.label_smoothing": [0.0, 2.0]})
    with pytest.raises(SpecError, match=r"^vary.train.lr: value nan: expected a finite number"):
        study(vary={"train.lr": [0.001, float("nan")]})
    with pytest.raises(SpecError, match=r"^concurrency: must be <= 4,096"):
        study(vary={"stages.1.mixer": ["window"]}, concurrency=10**6)


@pytest.mark.parametrize(
    "content, words",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a UTF-8 text file"),
        (b"base: a.yaml\nbase: b.yaml\n", "duplicate key 'base'"),
        (b"- just\n- a list\n", "an ablation file is a mapping"),
    ],
    ids=["binary", "duplicate-key", "list"],
)
def test_a_bad_ablation_file_is_one_spec_error_naming_it(tmp_path, content, words):
    f = tmp_path / "abl.yaml"
    f.write_bytes(content)
    with pytest.raises(SpecError) as e:
        AblationStudy.from_yaml(f)
    assert words in str(e.value) and "\n" not in str(e.value)
    if words != "an ablation file is a mapping":
        assert str(f) in str(e.value)


def test_an_ablation_path_that_is_a_directory_is_a_spec_error(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(SpecError, match="is a directory"):
        AblationStudy.from_yaml(tmp_path / "dir.yaml")


def test_one_seed_warns_that_there_will_be_no_intervals():
    with pytest.warns(UserWarning, match="no confidence intervals"):
        AblationStudy.from_dict({"base": BASE, "vary": {"stages.1.mixer": ["window"]}, "seeds": [0]})


@pytest.mark.parametrize("name", ["ablation_mixer.yaml", "ablation_addon.yaml"])
def test_shipped_ablation_files_load(name):
    s = AblationStudy.from_yaml(EXPERIMENTS / name)
    assert s.variants[0].is_base and len(s.variants) >= 3 and len(s.seeds) >= 2


def test_an_ablation_file_without_a_name_is_named_after_the_file(tmp_path):
    """Two unnamed files never share an output folder or an MLflow experiment."""
    studies = []
    for stem in ("mixers", "addons"):
        path = tmp_path / f"{stem}.yaml"
        path.write_text(yaml.safe_dump({"base": BASE, "vary": {"stages.1.mixer": ["window"]}}))
        studies.append(AblationStudy.from_yaml(path))
    assert [s.name for s in studies] == ["mixers", "addons"]
    assert studies[0].out_dir != studies[1].out_dir
    assert studies[0].tracking.experiment != studies[1].tracking.experiment


def test_a_duplicated_key_in_an_ablation_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("base: {input: {channels: 1, size: 8, classes: 4}, stem: {channels: 8}, stages: []}\n"
                    "seeds: [0]\nseeds: [1, 2]\nvary: {train.lr: [0.01]}\n")  # fmt: skip
    with pytest.raises(SpecError, match=r"duplicate key 'seeds'"):
        AblationStudy.from_yaml(path)
