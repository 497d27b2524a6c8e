"""Reading lmms-eval result files."""

import json

import pytest

from dyrate_eval import PruningConfigError
from dyrate_eval.results import results_table


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


def test_task_submission_files_are_not_read_as_runs(tmp_path):
    """MMBench's aggregation writes submissions/mmbench_en_dev_static_results.json beside the run."""
    write_result(tmp_path / "20261202_000000_results.json", "fastv_llava", "pretrained=/m,K=2,R=0.5", {"exact_match,none": 0.75})
    (tmp_path / "submissions").mkdir()
    (tmp_path / "submissions" / "mmbench_en_dev_static_results.json").write_text(json.dumps({"overall_acc": 0.5}))
    assert results_table([tmp_path])["method"].tolist() == ["fastv"]
