"""runners.fmt.human: one way to print metric values."""

from __future__ import annotations

import math

import pytest

from hybridnas.runners.fmt import human


@pytest.mark.parametrize(
    "value,metric,expected",
    [
        (0.9731, "val_acc", "97.31%"),
        (12_345_678, "macs", "12.35M"),
        (2_540_000_000, "flops", "2.54G"),
        (29_060, "params", "29.06K"),
        (512, "params", "512"),
        (0.5576, "latency_ms", "0.558"),
        (0.87941, "latency_ms_measured", "0.879"),
        (123456.0, "train_time_s", "1.235e+05"),
    ],
)
def test_each_kind_of_metric_prints_in_its_own_form(value, metric, expected):
    assert human(value, metric) == expected


@pytest.mark.parametrize("value", [None, math.nan, math.inf, -math.inf])
def test_missing_and_non_finite_values_print_as_a_dash(value):
    assert human(value, "macs") == human(value, "val_acc") == "-"


def test_a_value_that_is_not_a_number_prints_as_itself():
    assert human("conv x1 c16", "arch") == "conv x1 c16"
