import math

import numpy as np
import pytest
from scipy import stats

from hybridnas.runners.ablation_table import (
    build_table,
    plot,
    to_latex,
    to_markdown,
    to_text,
    welch,
    write_csv,
)


def _results(values: dict[str, list[float]]) -> list[dict]:
    out = []
    for variant, vals in values.items():
        for seed, v in enumerate(vals):
            out.append(
                {
                    "variant": variant,
                    "factor": "f",
                    "value": variant,
                    "seed": seed,
                    "val_acc": v,
                    "macs": 100.0,
                    "params": 10.0,
                    "latency_ms": 1.0,
                }
            )
    return out


def test_welch_interval_and_p_value_match_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.9, 0.01, 5), rng.normal(0.88, 0.03, 4)
    diff, lo, hi, p = welch(a, b, 0.95)
    res = stats.ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(0.95)
    assert diff == pytest.approx(a.mean() - b.mean())
    assert p == pytest.approx(res.pvalue)
    assert (lo, hi) == pytest.approx((ci.low, ci.high))


def test_table_statistics_match_scipy_and_mark_significance():
    vals = {"base": [0.90, 0.91, 0.905], "better": [0.95, 0.951, 0.949], "same": [0.90, 0.912, 0.903]}
    rows = build_table(_results(vals), confidence=0.9)
    assert [r.variant for r in rows] == ["base", "better", "same"]
    for r in rows[1:]:
        res = stats.ttest_ind(vals[r.variant], vals["base"], equal_var=False)
        ci = res.confidence_interval(0.9)
        assert r.mean == pytest.approx(np.mean(vals[r.variant]))
        assert r.std == pytest.approx(np.std(vals[r.variant], ddof=1))
        assert r.p_value == pytest.approx(res.pvalue)
        assert (r.ci_low, r.ci_high) == pytest.approx((ci.low, ci.high))
        assert r.significant == (ci.low > 0 or ci.high < 0)
    assert rows[1].significant and not rows[2].significant
    assert rows[0].diff == 0 and math.isnan(rows[0].p_value)


def test_one_seed_gives_a_table_without_intervals():
    rows = build_table(_results({"base": [0.9], "v": [0.95]}))
    assert math.isnan(rows[1].ci_low) and math.isnan(rows[1].p_value) and not rows[1].significant
    assert rows[1].diff == pytest.approx(0.05)
    assert "-" in to_text(rows)


def test_constant_seeds_give_an_exact_difference():
    rows = build_table(_results({"base": [0.9, 0.9], "v": [0.95, 0.95]}))
    assert rows[1].ci_low == rows[1].ci_high == pytest.approx(0.05) and rows[1].significant


def test_missing_base_is_an_error():
    with pytest.raises(ValueError, match="base"):
        build_table(_results({"v": [0.9, 0.8]}))


def test_outputs_render(tmp_path):
    rows = build_table(_results({"base": [0.90, 0.91], "stages.1.mixer=acmix": [0.95, 0.96]}))
    md, tex = to_markdown(rows), to_latex(rows, caption="mixers")
    assert md.count("\n|") >= 3 and "stages.1.mixer=acmix *" in md
    assert (
        r"\toprule" in tex and r"\bottomrule" in tex and r"stages.1.mixer=acmix" in tex and r"\textbf{" in tex
    )
    write_csv(rows, tmp_path / "a.csv")
    assert (tmp_path / "a.csv").read_text().splitlines()[0].startswith("variant,factor,value,n,mean")
    plot(rows, tmp_path / "a.png")
    from PIL import Image

    im = np.asarray(Image.open(tmp_path / "a.png").convert("L"))
    assert im.shape[0] > 100 and im.std() > 5
