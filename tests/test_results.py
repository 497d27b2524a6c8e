"""Reading lmms-eval result files."""

import json

import pytest

from dyrate_eval import PruningConfigError
from dyrate_eval.report.runs import results_table


def write_result(path, model, model_args, metrics):
    path.write_text(json.dumps({"results": {"dyrate_smoke": metrics}, "config": {"model": model, "model_args": model_args}}))
    return path


def test_methods_scores_and_sources(tmp_path):
    write_result(tmp_path / "a_results.json", "dyrate_llava", "pretrained=/m", {"exact_match,none": 0.5, "exact_match_stderr,none": 0.1})
    write_result(tmp_path / "b_results.json", "dyrate_llava", "pretrained=/m,method=vtw,K=3", {"exact_match,none": 0.25})
    write_result(tmp_path / "c_results.json", "fastv_llava", "pretrained=/m,K=2,R=0.5", {"exact_match,none": 0.75})
    table = results_table([tmp_path]).set_index("file")
    assert table["method"].tolist() == ["dyrate", "vtw", "fastv"]  # dyrate_llava without method= runs dyrate
    assert table["settings"].tolist() == ["", "K=3", "K=2,R=0.5"]
    assert table["exact_match"].tolist() == [0.5, 0.25, 0.75]
    assert "exact_match_stderr" not in table.columns


def test_unreadable_or_foreign_files_are_named(tmp_path):
    broken = tmp_path / "broken_results.json"
    broken.write_text("{not json")
    with pytest.raises(PruningConfigError, match=f"cannot read results file {broken}"):
        results_table([broken])
    foreign = tmp_path / "other.json"
    foreign.write_text(json.dumps({"accuracy": 1}))
    with pytest.raises(PruningConfigError, match=f"{foreign} is not an lmms-eval results file"):
        results_table([foreign])
    (tmp_path / "empty").mkdir()
    with pytest.raises(PruningConfigError, match="no lmms-eval results files"):
        results_table([tmp_path / "empty"])


def write_samples(results_file, task, policies):
    """A samples log beside ``results_file``: one sample per (doc id, recorded policy)."""
    log = results_file.with_name(results_file.name.replace("_results.json", f"_samples_{task}.jsonl"))
    log.write_text("".join(json.dumps({"doc_id": doc_id, "token_counts": [{"dyrate": {"policy": policy}}]}) + "\n"
                           for doc_id, policy in policies))


FASTV = {"method": "fastv", "K": 2, "R": 0.5, "selection": "attention"}


def test_results_of_other_models_are_refused_by_report_and_summarize(tmp_path, capsys):
    from dyrate_eval.cli import main

    (tmp_path / "runs" / "llava-hf").mkdir(parents=True)
    foreign = write_result(tmp_path / "runs" / "llava-hf" / "x_results.json", "llava_hf", "pretrained=llava-hf/llava-1.5-7b-hf",
                           {"exact_match,none": 0.5})
    for command in ("report", "summarize"):
        assert main([command, str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 2
        error = capsys.readouterr().err
        assert f"{foreign} was written by lmms-eval model 'llava_hf', not by one of this project's models" in error
        assert not (tmp_path / "out").exists()


def test_unfinished_cells_are_never_read(tmp_path):
    finished = tmp_path / "fastv" / "a_results.json"
    finished.parent.mkdir()
    write_result(finished, "fastv_llava", "K=2,R=0.5", {"exact_match,none": 0.75})
    # what a second run_all.sh used to leave: a partial cell inside a finished one, and one beside it
    for partial in (tmp_path / "fastv" / "fastv.partial", tmp_path / "original.partial"):
        partial.mkdir()
        write_result(partial / "b_results.json", "original_llava", "", {"exact_match,none": 0.25})
    assert results_table([tmp_path])["file"].tolist() == [str(finished)]
    with pytest.raises(PruningConfigError, match=r"original.partial is inside the unfinished cell original.partial: it is never read"):
        results_table([tmp_path / "original.partial"])


def test_a_samples_log_of_another_policy_is_refused_naming_both_files(tmp_path):
    """Two runs stamped the same second in one output folder: the results file of one,
    samples of both."""
    results = write_result(tmp_path / "s_results.json", "original_llava", "", {"exact_match,none": 0.5})
    write_samples(results, "dyrate_smoke", [(0, {"method": "original"}), (1, FASTV)])
    with pytest.raises(PruningConfigError, match=r"s_samples_dyrate_smoke.jsonl line 2 was generated with .*'fastv'.*, but its results "
                                                 r"file .*s_results.json ran original_llava with method 'original'"):
        results_table([tmp_path])
    results = write_result(tmp_path / "s_results.json", "fastv_llava", "K=2,R=0.9", {"exact_match,none": 0.5})
    write_samples(results, "dyrate_smoke", [(0, FASTV)])
    with pytest.raises(PruningConfigError, match=r"line 1 was generated with .* ran fastv_llava with method 'fastv' and settings K=2,R=0.9"):
        results_table([tmp_path])
    write_samples(results, "dyrate_smoke", [(0, {**FASTV, "R": 0.9}), (1, {**FASTV, "R": 0.9})])
    assert results_table([tmp_path])["exact_match"].tolist() == [0.5]


def test_repeated_docs_and_runs_made_twice_are_errors_naming_the_files(tmp_path):
    first = write_result(tmp_path / "a_results.json", "fastv_llava", "K=2,R=0.5", {"exact_match,none": 0.5})
    write_samples(first, "dyrate_smoke", [(0, FASTV), (1, FASTV), (0, FASTV)])
    with pytest.raises(PruningConfigError, match=r"a_samples_dyrate_smoke.jsonl holds doc ids 0 more than once"):
        results_table([tmp_path])
    write_samples(first, "dyrate_smoke", [(0, FASTV), (1, FASTV)])
    write_result(tmp_path / "c_results.json", "fastv_llava", "K=2,R=0.5", {"exact_match,none": 0.5})
    with pytest.raises(PruningConfigError, match=f"{first} and {tmp_path / 'c_results.json'} both hold dyrate_smoke for the same "
                                                 "configuration .*: a run made twice; keep one of them"):
        results_table([tmp_path])


def test_task_submission_files_are_not_read_as_runs(tmp_path):
    """MMBench's aggregation writes submissions/mmbench_en_dev_static_results.json beside the run."""
    write_result(tmp_path / "20261202_000000_results.json", "fastv_llava", "pretrained=/m,K=2,R=0.5", {"exact_match,none": 0.75})
    (tmp_path / "submissions").mkdir()
    (tmp_path / "submissions" / "mmbench_en_dev_static_results.json").write_text(json.dumps({"overall_acc": 0.5}))
    assert results_table([tmp_path])["method"].tolist() == ["fastv"]
