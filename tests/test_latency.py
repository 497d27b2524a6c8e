"""The statistics of paired latency and how the tables show them, from hand-made pairs
(the pass itself, on real runs of a tiny model, is in test_report.py)."""

import math

import pandas as pd
import pytest

from dyrate_eval.cli import main
from dyrate_eval.measure.latency import SUMMARY_COLUMNS, summarize_pairs
from dyrate_eval.report.tables import paired_latency_shown


def pairs(method: dict[str, list[float]], original: dict[str, list[float]]) -> pd.DataFrame:
    """Pairs of five samples, each answer 12 tokens long unless given."""
    method, original = {"new_tokens": [12] * 5, **method}, {"new_tokens": [12] * 5, **original}
    return pd.DataFrame({**method, **{f"{column}_original": values for column, values in original.items()}})


def test_ratios_are_medians_of_per_sample_ratios_with_their_quartiles():
    # the original takes 100 ms every time; the method 40, 50, 60, 70, 80: ratios 0.4 .. 0.8
    table = pairs(
        {"end_to_end_ms": [40.0, 50, 60, 70, 80], "ttft_ms": [10.0, 10, 10, 10, 10], "decode_ms_per_token": [5.0, 5, math.nan, 5, 5]},
        {"end_to_end_ms": [100.0] * 5, "ttft_ms": [20.0, 20, 20, 20, 20], "decode_ms_per_token": [4.0, 6, 5, 4, 6]},
    )
    summary = summarize_pairs(table)
    assert list(summary) == SUMMARY_COLUMNS
    assert (summary["latency ratio q1"], summary["latency ratio"], summary["latency ratio q3"]) == pytest.approx((0.5, 0.6, 0.7))
    assert summary["latency (ms)"] == 60 and summary["original latency (ms)"] == 100
    assert summary["latency noisy"] is False, "an IQR of 0.2 around 0.6 is smaller than the effect of 0.4"
    assert summary["TTFT ratio"] == 0.5 and summary["TTFT noisy"] is False
    # decode: the sample without a decode step is left out; 5/4, 5/6, 5/4, 5/6 straddle 1
    assert summary["decode ratio"] == pytest.approx((1.25 + 5 / 6) / 2)
    assert summary["decode noisy"] is True, "an effect smaller than its spread is marked"
    assert summary["answer tokens"] == summary["original answer tokens"] == 12 and summary["latency samples"] == 5


def test_a_ratio_whose_spread_is_larger_than_its_effect_is_noisy_even_when_its_iqr_misses_one():
    # ratios 0.90, 0.94, 0.96, 0.98, 0.99: median 0.96, IQR 0.94-0.98 (0.04 wide, effect 0.04: not larger)
    steady = pairs({"end_to_end_ms": [90.0, 94, 96, 98, 99], "ttft_ms": [1.0] * 5, "decode_ms_per_token": [1.0] * 5},
                   {"end_to_end_ms": [100.0] * 5, "ttft_ms": [1.0] * 5, "decode_ms_per_token": [1.0] * 5})
    assert summarize_pairs(steady)["latency noisy"] is False
    # ratios 0.80, 0.90, 0.97, 0.99, 0.995: median 0.97, IQR 0.90-0.99 (0.09 wide, effect 0.03)
    spread = steady.assign(end_to_end_ms=[80.0, 90, 97, 99, 99.5])
    assert summarize_pairs(spread)["latency noisy"] is True


def test_tables_show_each_ratio_with_its_spread_and_the_times_beside_the_originals():
    measured = {"source": "measured", **summarize_pairs(pairs(
        {"end_to_end_ms": [40.0, 50, 60, 70, 80], "ttft_ms": [10.0] * 5, "decode_ms_per_token": [5.0, 5, 5, 5, 5]},
        {"end_to_end_ms": [100.0] * 5, "ttft_ms": [20.0] * 5, "decode_ms_per_token": [4.0, 6, 5, 4, 6]}))}
    reported = {"source": "reported", "latency (ms)": 70.8}
    without = {"source": "measured, no latency pass"}
    shown = paired_latency_shown(pd.DataFrame([measured, reported, without], columns=["source", *SUMMARY_COLUMNS]))
    assert list(shown.columns) == ["source", "latency (ms)", "latency ratio", "TTFT (ms)", "TTFT ratio", "decode (ms/token)",
                                   "decode ratio", "answer tokens", "latency samples"]
    assert shown.loc[0, "latency ratio"] == "0.60 [0.50-0.70]"
    assert shown.loc[0, "latency (ms)"] == "60.0 / 100.0" and shown.loc[0, "decode (ms/token)"] == "5.00 / 5.00"
    assert shown.loc[0, "decode ratio"] == "~1.00 [0.83-1.25]" and shown.loc[0, "answer tokens"] == "12.0 / 12.0"
    assert shown.loc[1, "latency (ms)"] == "70.8" and pd.isna(shown.loc[1, "latency ratio"]), "the paper's own ms, no ratio"
    assert shown.loc[2].drop("source").isna().all(), "a cell never timed stays missing"


def test_the_latency_command_refuses_paths_without_runs_and_counts_out_of_range(tmp_path, capsys):
    assert main(["latency", str(tmp_path)]) == 2
    assert f"no lmms-eval results files (*_results.json) under {tmp_path}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["latency", str(tmp_path), "--samples", "0"])
    assert "'0' is not a whole number >= 1" in capsys.readouterr().err
