"""The aggregator, the latency pass behind its latency columns and the traces behind its
figures, on real lmms-eval runs of a tiny model."""

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from dyrate_eval.arch import load_arch
from dyrate_eval.cli import main
from dyrate_eval.errors import PruningConfigError
from dyrate_eval.measure.latency import SUMMARY_COLUMNS
from dyrate_eval.methods import make_policy
from dyrate_eval.report.figures import point_label
from dyrate_eval.report.paper import write_report
from dyrate_eval.report.runs import LATENCY_COLUMNS, latency_file
from dyrate_eval.report.tables import REPORTED_SOURCE
from dyrate_eval.core.plan import GROUPS
from dyrate_eval.measure.trace import TRACE_FILE, trace_examples, write_trace
from .test_dyrate import staircase_predictor
from .test_harness import run_cli

TABLES = ["table1_benchmarks", "table2_captioning", "table3_decoding", "table4_flops_target", "table5_ablation"]


@pytest.fixture(scope="module")
def report(tiny_dir, tmp_path_factory):
    """original, FastV and DyRate on two shapes tasks, FastV captions with beam-2 too, a trace."""
    runs = tmp_path_factory.mktemp("runs")
    predictor = staircase_predictor(load_arch(tiny_dir)).save(tmp_path_factory.mktemp("predictor"))
    for name, model, settings, gen_kwargs in (
        ("original", "original_llava", "", []),
        ("fastv", "fastv_llava", ",K=2,R=0.5", []),
        ("fastv_beam2", "fastv_llava", ",K=2,R=0.5", ["--gen_kwargs", "num_beams=2"]),
        ("dyrate", "dyrate_llava", f",predictor={predictor}", []),
    ):
        tasks = "shapes_caption" if gen_kwargs else "shapes_caption,shapes_vqa"
        args = ["--model", model, "--model_args", f"pretrained={tiny_dir}{settings}", "--tasks", tasks, "--limit", "3", *gen_kwargs]
        run_cli(args, runs / name)
    image = Image.new("RGB", (112, 112), (200, 30, 30))
    write_trace(runs / "trace", str(tiny_dir), make_policy("fastv", load_arch(tiny_dir), K=2, R=0.5), [image], ["red"], "Describe the image.", 4)
    out = tmp_path_factory.mktemp("report")
    tables = write_report([runs], out)
    return runs, out, tables


def measured(table, method, decoding=None):
    rows = table[(table["source"] == "measured") & (table["method"] == method)]
    return rows if decoding is None else rows[rows["decoding"] == decoding]


def test_every_table_and_figure_is_written(report):
    _, out, _ = report
    for name in TABLES:
        assert (out / f"{name}.csv").is_file() and (out / f"{name}.md").is_file(), name
    for figure in ("pareto.png", "fig2_attention_by_step.png", "fig3_dyrate_rates.png", "fig4_kept_tokens.png"):
        assert (out / figure).stat().st_size > 10_000, figure


def test_figure_labels_name_paths_by_their_last_part():
    assert point_label("K=2,R=0.5,selection=random") == "K=2 R=0.5 selection=random"
    assert point_label("predictor=dyrate_eval/predictors/embedded-flops0.6") == "predictor=embedded-flops0.6"
    assert point_label("criterion=kl,tolerance=0.3,task=shapes_vqa") == "criterion=kl tolerance=0.3"
    assert point_label("") == ""


def test_scores_and_flops_shares_come_from_the_runs(report):
    runs, out, tables = report
    table1 = tables["table1_benchmarks"]
    results = json.loads(next((runs / "fastv").glob("**/*_results.json")).read_text())
    assert measured(table1, "fastv")["shapes vqa EM"].item() == results["results"]["shapes_vqa"]["exact_match,none"]
    # the unpruned model's share is 100% by construction; FastV's is below
    assert measured(table1, "original")["TFLOPs %"].item() == pytest.approx(100.0, abs=1e-9)
    assert 40 < measured(table1, "fastv")["TFLOPs %"].item() < 100
    csv = pd.read_csv(out / "table2_captioning.csv", keep_default_na=False)
    measured_rows = csv[csv["source"] == "measured"]
    assert set(measured_rows[measured_rows["method"] != "dyrate"]["Auto R"]) == {"no"}
    assert set(measured_rows[measured_rows["method"] == "dyrate"]["Auto R"]) == {"yes"}
    assert not measured(tables["table5_ablation"], "dyrate").empty, "DyRate's row in the ablation table"


def test_reported_numbers_sit_in_their_own_labelled_rows(report):
    _, out, tables = report
    table2 = tables["table2_captioning"]
    reported = table2[table2["source"] == REPORTED_SOURCE]
    original_7b = reported[(reported["model"] == "7B") & (reported["method"] == "original")]
    assert original_7b["NoCaps CIDEr"].item() == 74.89 and original_7b["latency (ms)"].item() == 70.80
    # no measured value in a reported row, no reported value in a measured row
    assert reported["shapes caption CIDEr"].isna().all()
    assert measured(table2, "fastv")["NoCaps CIDEr"].isna().all()
    text = (out / "table2_captioning.md").read_text()
    assert "reported (DyRate paper)" in text and "missing" in text and "nan" not in text


def test_decoding_table_holds_the_strategies_a_setting_was_run_with(report):
    _, _, tables = report
    table3 = tables["table3_decoding"]
    assert set(measured(table3, "fastv")["decoding"]) == {"greedy", "beam-2"}
    assert measured(table3, "original").empty, "original ran greedy only"


def test_tables_list_their_run_files(report):
    runs, out, _ = report
    text = (out / "table1_benchmarks.md").read_text()
    listed = [line[2:] for line in text.split("Run files:\n")[1].splitlines()]
    assert sorted(listed) == sorted(str(p) for name in ("original", "fastv", "dyrate") for p in (runs / name).glob("**/*_results.json"))


def test_foreign_and_broken_files_are_named(report, tmp_path):
    runs, _, _ = report
    foreign = tmp_path / "x_results.json"
    foreign.write_text(json.dumps({"accuracy": 1}))
    with pytest.raises(PruningConfigError, match="x_results.json is not an lmms-eval results file"):
        write_report([foreign], tmp_path / "out")
    broken = tmp_path / "trace" / TRACE_FILE
    broken.parent.mkdir()
    broken.write_text("{")
    with pytest.raises(PruningConfigError, match=f"{broken} is not a trace"):
        write_report([runs / "original", broken.parent], tmp_path / "out")
    with pytest.raises(PruningConfigError, match="does not exist"):
        write_report([tmp_path / "nowhere"], tmp_path / "out")


def test_trace_attention_shares_and_kept_tokens(tiny_dir):
    model = LlavaForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(tiny_dir)
    image = Image.new("RGB", (112, 112), (30, 200, 30))
    [example] = trace_examples(model, processor, make_policy("fastv", load_arch(tiny_dir), K=2, R=0.75), [image], "Describe the image.", 5)
    for step, shares in enumerate(example["attention_by_step"]):
        assert sum(shares[g] for g in GROUPS) == pytest.approx(1.0, abs=1e-4), "each query's attention sums to one"
        assert (shares["response"] == 0) == (step == 0), "no response tokens before the first one"
    # FastV keeps a quarter of the 64 image tokens at the last layer, the same ones at every step
    history = example["kept_slots_by_step"]
    assert all(len(kept) == 16 and kept == history[0] for kept in history)
    assert torch.equal(torch.tensor(history[0]).unique(), torch.tensor(history[0]))


def test_match_rate_gives_a_flops_matched_baseline(report, tiny_dir, capsys):
    from dyrate_eval.core.simulate import simulate_plan
    from dyrate_eval.measure.flops import plan_flops

    runs, _, tables = report
    assert main(["match-rate", str(runs / "dyrate"), "--task", "shapes_caption", "--set", "K=2", "--arch", str(tiny_dir)]) == 0
    rate = float(capsys.readouterr().out.strip())
    arch = load_arch(tiny_dir)
    samples = [json.loads(line)["token_counts"][0]["dyrate"] for line in next((runs / "dyrate").glob("**/*_samples_shapes_caption.jsonl")).read_text().splitlines()]
    spent = sum(plan_flops(simulate_plan(make_policy("fixed_prune", arch, K=2, R=rate), arch, s["text_tokens"], s["new_tokens"]), arch)["language_model"] for s in samples)
    full = sum(plan_flops(simulate_plan(make_policy("original", arch), arch, s["text_tokens"], s["new_tokens"]), arch)["language_model"] for s in samples)
    dyrate_share = measured(tables["table2_captioning"], "dyrate")["TFLOPs %"].item() / 100
    assert spent / full == pytest.approx(dyrate_share, abs=0.02), "within a kept token of DyRate's share"


def test_mixed_and_repeated_runs_are_refused_and_partial_cells_never_read(report, tmp_path):
    """What two runs into one output folder, a run made twice and an old run_all.sh's
    nested partial folder leave behind, made from the fixture's real runs."""
    runs, _, _ = report
    copied = tmp_path / "runs"
    shutil.copytree(runs, copied)
    nested = copied / "fastv" / "fastv.partial"
    shutil.copytree(runs / "fastv", nested)
    tables = write_report([copied], tmp_path / "out")
    assert not any(".partial" in line for line in (tmp_path / "out" / "table1_benchmarks.md").read_text().splitlines())
    assert measured(tables["table1_benchmarks"], "fastv")["TFLOPs %"].item() == measured(report[2]["table1_benchmarks"], "fastv")["TFLOPs %"].item()
    shutil.rmtree(nested)

    shutil.copytree(runs / "fastv", copied / "fastv_again")
    with pytest.raises(PruningConfigError, match=r"fastv/.*_results.json and .*fastv_again/.*_results.json both hold shapes_(caption|vqa) "
                                                 r"for the same configuration .*: a run made twice"):
        write_report([copied], tmp_path / "out")
    shutil.rmtree(copied / "fastv_again")

    [original_log] = (copied / "original").glob("**/*_samples_shapes_vqa.jsonl")
    [fastv_log] = (copied / "fastv").glob("**/*_samples_shapes_vqa.jsonl")
    original_log.write_text(fastv_log.read_text())
    with pytest.raises(PruningConfigError, match=rf"{original_log} line 1 was generated with .*'fastv'.*, but its results file .* ran "
                                                 r"original_llava with method 'original'"):
        write_report([copied], tmp_path / "out")


# -- the latency pass -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timed_report(report, tmp_path_factory):
    """The fixture's runs copied, the latency pass run on the original's and FastV's (2
    samples per task after 1 warm-up), DyRate's left without one; then the report."""
    runs = tmp_path_factory.mktemp("timed") / "runs"
    shutil.copytree(report[0], runs)
    assert main(["latency", str(runs / "original"), str(runs / "fastv"), "--samples", "2", "--warmup", "1"]) == 0
    out = runs.parent / "report"
    return runs, out, write_report([runs], out)


def results_file(run: Path) -> Path:
    [path] = run.glob("**/*_results.json")
    return path


def test_the_latency_pass_writes_a_pair_per_sample_beside_each_run(timed_report):
    runs, _, _ = timed_report
    for name in ("original", "fastv"):
        pairs = pd.read_csv(latency_file(results_file(runs / name)))
        assert list(pairs.columns) == list(LATENCY_COLUMNS)
        assert set(pairs["results_file"]) == {results_file(runs / name).name} and set(pairs["method"]) == {name}
        assert set(pairs["task"]) == {"shapes_caption", "shapes_vqa"}
        for _, task in pairs.groupby("task"):
            assert task["doc_ids"].tolist() == [1, 2], "the docs after the warm-up doc 0"
            assert task["first"].tolist() == ["original", "method"], "the order swaps from sample to sample"
        times = ["ttft_ms", "end_to_end_ms", "ttft_ms_original", "end_to_end_ms_original"]
        assert (pairs[times] > 0).all(axis=None)
        assert set(pairs["batch_size"]) == {1} and set(pairs["samples"]) == {2} and set(pairs["warmup"]) == {1}
    assert not list((runs / "dyrate").glob("**/*_latency.csv"))


def test_the_tables_latency_columns_are_paired_ratios_with_their_spread(timed_report):
    runs, out, tables = timed_report
    pairs = pd.read_csv(latency_file(results_file(runs / "fastv")))
    for name, task in (("table2_captioning", "shapes_caption"), ("table1_benchmarks", "shapes_vqa")):
        row = measured(tables[name], "fastv").iloc[0]
        task_pairs = pairs[pairs["task"] == task]
        ratios = task_pairs["end_to_end_ms"] / task_pairs["end_to_end_ms_original"]
        assert row["latency ratio"] == pytest.approx(ratios.median())
        assert row["latency ratio q1"] <= row["latency ratio"] <= row["latency ratio q3"]
        assert row["latency (ms)"] == pytest.approx(task_pairs["end_to_end_ms"].median())
        assert row["original latency (ms)"] == pytest.approx(task_pairs["end_to_end_ms_original"].median())
        assert row["latency samples"] == 2 and row["batch"] == 1
        assert measured(tables[name], "dyrate")[SUMMARY_COLUMNS].isna().all(axis=None), "no latency pass: missing"
        print(f"{name}, tiny model, FastV K=2 R=0.5 against the original: "
              + ", ".join(f"{label} {row[f'{label} ratio']:.3f}" for label in ("TTFT", "decode", "latency")))
    text = (out / "table2_captioning.md").read_text()
    fastv_row = next(line for line in text.splitlines() if line.startswith("| measured") and "| fastv" in line)
    assert re.search(r"\| ~?\d+\.\d\d \[\d+\.\d\d-\d+\.\d\d\] +\|", fastv_row), fastv_row
    dyrate_row = next(line for line in text.splitlines() if line.startswith("| measured") and "| dyrate" in line)
    assert dyrate_row.count("missing") >= 7, "no latency for a run without its pass, never zero"
    assert "Measured: 2 runs: 2 samples per task after 1 warm-up, batch 1, cpu, float32" in text
    assert f"- {latency_file(results_file(runs / 'fastv'))}" in text, "the latency files are listed with the run files"
    reported = tables["table2_captioning"][tables["table2_captioning"]["source"] == REPORTED_SOURCE]
    assert reported["latency (ms)"].notna().all() and reported["latency ratio"].isna().all(), "the paper's rows keep their own ms"


def test_a_timed_run_is_kept_unless_forced(timed_report, capsys):
    runs, _, _ = timed_report
    path = latency_file(results_file(runs / "fastv"))
    written = path.stat().st_mtime_ns
    assert main(["latency", str(runs / "fastv"), "--samples", "2", "--warmup", "1"]) == 0
    assert f"{path}: measured earlier, kept" in capsys.readouterr().out
    assert path.stat().st_mtime_ns == written


def test_a_latency_file_of_another_run_cut_short_or_without_its_run_is_refused(timed_report, tmp_path):
    runs, _, _ = timed_report
    copied = tmp_path / "runs"
    shutil.copytree(runs, copied)
    original = latency_file(results_file(copied / "original"))
    kept = original.read_text()
    original.write_text(latency_file(results_file(copied / "fastv")).read_text())
    with pytest.raises(PruningConfigError, match=rf"{re.escape(str(original))} was measured for fastv_llava method 'fastv'.* "
                                                 r"but sits beside .*, which ran original_llava method 'original'.*belongs to another run"):
        write_report([copied], tmp_path / "out")
    original.write_text("".join(kept.splitlines(keepends=True)[:-1]))
    with pytest.raises(PruningConfigError, match=r"holds 1 pairs of shapes_\w+ where it announces 2: half-written or cut"):
        write_report([copied], tmp_path / "out")
    original.write_text(kept[:-40])
    with pytest.raises(PruningConfigError, match=rf"{re.escape(str(original))} has rows without a number"):
        write_report([copied], tmp_path / "out")
    original.write_text(kept)
    stray = copied / "elsewhere" / original.name
    stray.parent.mkdir()
    stray.write_text(kept)
    with pytest.raises(PruningConfigError, match=rf"{re.escape(str(stray))} is a latency file without its run"):
        write_report([copied], tmp_path / "out")
