"""The embedded shapes tasks: reproducible data, correct scoring, and a run of the
whole group through the lmms-eval CLI."""

import importlib.util
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from dyrate_eval.errors import PruningConfigError
from dyrate_eval.report.runs import results_table
from dyrate_eval.report.shapes import SHAPES_SCORES, caption_cider_per_sample, caption_rate_by_objects, write_summary
from dyrate_eval.embedded.tasks import BUILDERS, EVAL_SEED, SCENE_RANGES, scene_from_doc, write_task_data
from dyrate_eval.embedded.world import caption_content

from .test_harness import REPO, run_cli

TASK_DIR = REPO / "tasks" / "shapes"


def load_task_utils():
    spec = importlib.util.spec_from_file_location("shapes_utils", TASK_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_data_is_what_the_generator_writes(tmp_path):
    counts = write_task_data(tmp_path)
    assert counts == {"caption": 200, "vqa": 300, "pope": 300, "mcq": 300}
    for name in counts:
        assert (tmp_path / f"{name}.jsonl").read_text() == (TASK_DIR / "data" / f"{name}.jsonl").read_text(), name


def test_held_out_scenes_use_their_own_seed_and_ranges():
    assert EVAL_SEED != 0, "training draws seed 0"
    ranges = [set(r) for r in SCENE_RANGES.values()]
    assert all(not (a & b) for i, a in enumerate(ranges) for b in ranges[i + 1:])


def test_caption_scores_reward_matching_captions():
    utils = load_task_utils()
    docs = [json.loads(line) for line in (TASK_DIR / "data" / "caption.jsonl").read_text().splitlines()[:20]]
    good = [utils.caption_process_results(doc, [doc["captions"][0]])["shapes_CIDEr"] for doc in docs]
    shuffled = [utils.caption_process_results(doc, [other["captions"][0]])["shapes_CIDEr"] for doc, other in zip(docs, docs[1:] + docs[:1])]
    assert utils.caption_cider(good) > 2.0 > utils.caption_cider(shuffled)
    assert utils.caption_bleu4(good) > 0.8 > utils.caption_bleu4(shuffled)


def test_pope_metrics():
    utils = load_task_utils()
    answers = ["Yes, there is.", "no", "yes", "No.", "There is a red circle."]
    truths = ["yes", "no", "no", "yes", "no"]
    results = [utils.pope_process_results({"answer": t, "split": "random"}, [a])["f1"] for a, t in zip(answers, truths)]
    assert [r["prediction"] for r in results] == ["yes", "no", "yes", "no", "no"]
    assert utils.pope_accuracy(results) == pytest.approx(3 / 5)
    assert utils.pope_precision(results) == pytest.approx(1 / 2)
    assert utils.pope_recall(results) == pytest.approx(1 / 2)
    assert utils.pope_f1(results) == pytest.approx(1 / 2)
    assert utils.pope_yes_ratio(results) == pytest.approx(2 / 5)


def test_per_caption_cider_averages_to_the_task_metric():
    """The per-kind table's caption columns average per-caption CIDEr: their mean over all
    captions must be the caption task's own corpus CIDEr."""
    utils = load_task_utils()
    docs = [json.loads(line) for line in (TASK_DIR / "data" / "caption.jsonl").read_text().splitlines()[:4]]
    predictions = [docs[0]["captions"][0], "a red circle on a white background.", docs[2]["captions"][1][:30], "nothing"]
    entries = [utils.caption_process_results(doc, [text])["shapes_CIDEr"] for doc, text in zip(docs, predictions)]
    per_caption = caption_cider_per_sample([{"shapes_CIDEr": entry} for entry in entries])
    assert per_caption[0] > per_caption[1] and per_caption[3] == 0
    assert sum(per_caption) / len(per_caption) == pytest.approx(utils.caption_cider(entries))


def test_mcq_reads_the_chosen_letter():
    utils = load_task_utils()
    assert [utils.chosen_letter(text) for text in ("B", "b.", "The answer is C", "(D) pink", "none")] == ["B", "B", "C", "D", None]
    assert utils.mcq_process_results({"answer": "C"}, ["C. red"]) == {"accuracy": 1.0}


EXPECTED_METRICS = {
    "shapes_caption": ["shapes_CIDEr", "shapes_Bleu_4"],
    "shapes_vqa": ["exact_match"],
    "shapes_pope": ["accuracy", "precision", "recall", "f1", "yes_ratio"],
    "shapes_mcq": ["accuracy"],
}


@pytest.fixture(scope="module")
def shapes_runs(tiny_dir, tmp_path_factory):
    """The shapes group through the CLI, for each lmms-eval model."""
    out = tmp_path_factory.mktemp("shapes_runs")
    logs = {}
    for model, settings in (("original_llava", ""), ("fastv_llava", ",K=2,R=0.75"), ("vtw_llava", "")):
        args = ["--model", model, "--model_args", f"pretrained={tiny_dir}{settings}", "--tasks", "shapes", "--limit", "3", "--batch_size", "3"]
        logs[model] = run_cli(args, out / model)
    return out, logs


@pytest.mark.parametrize("model", ["original_llava", "fastv_llava", "vtw_llava"])
def test_the_shapes_group_runs_through_the_cli(shapes_runs, model):
    out, logs = shapes_runs
    files = list((out / model).glob("**/*_results.json"))
    assert len(files) == 1, logs[model][-3000:]
    results = json.loads(files[0].read_text())
    for task, metrics in EXPECTED_METRICS.items():
        for metric in metrics:
            assert isinstance(results["results"][task][f"{metric},none"], float), (task, metric)


def test_summary_tables_of_the_shapes_runs(shapes_runs, tmp_path):
    out, _ = shapes_runs
    table = write_summary([out], tmp_path, "embedded")
    scores = pd.read_csv(tmp_path / "embedded_scores.csv", keep_default_na=False)
    assert scores["method"].tolist() == ["original", "fastv", "vtw"]
    assert scores["settings"].tolist() == ["", "K=2,R=0.75", ""]
    assert list(scores.columns[4:]) == list(SHAPES_SCORES.values())
    assert scores["decoding"].tolist() == ["greedy"] * 3
    original_vqa = table[(table["method"] == "original") & (table["task"] == "shapes_vqa")]["exact_match"].item()
    assert scores.loc[0, "vqa EM"] == original_vqa
    by_kind = pd.read_csv(tmp_path / "embedded_by_kind.csv", keep_default_na=False)
    # --limit 3 takes the first three docs: vqa kinds colour, shape, count; pope splits
    # random, random, popular; captions of scenes with four, four and one object
    assert {"vqa colour", "vqa shape", "vqa count", "pope random", "pope popular", "caption 1 object", "caption 4 objects"} <= set(by_kind.columns)
    assert "Run files:" in (tmp_path / "embedded_by_kind.md").read_text()
    content = pd.read_csv(tmp_path / "embedded_caption_content.csv", keep_default_na=False)
    original_captions = next((out / "original_llava").glob("**/*_samples_shapes_caption.jsonl"))
    scenes = {doc["doc_id"]: scene_from_doc(doc) for doc in BUILDERS["caption"]()}
    recalled = [caption_content(scenes[s["doc_id"]], s["shapes_CIDEr"]["prediction"])["objects_recalled"]
                for s in map(json.loads, original_captions.read_text().splitlines())]
    assert content["method"].tolist() == ["original", "fastv", "vtw"] and content["captions"].tolist() == [3] * 3
    assert content.loc[0, "objects named"] == pytest.approx(sum(recalled) / 3)
    # original and FastV R=0.75: one of the two rates per number of objects (4 and 1 here)
    headroom = pd.read_csv(tmp_path / "embedded_caption_rate_by_objects.csv")
    original_cider = table[(table["method"] == "original") & (table["task"] == "shapes_caption")]["shapes_CIDEr"].item()
    assert headroom["R"].tolist() == [0.0, 0.75]
    assert headroom.loc[0, "TFLOPs %"] == pytest.approx(100) and headroom.loc[0, "caption CIDEr"] == pytest.approx(original_cider)
    assert headroom.loc[1, "TFLOPs %"] < 100
    assert (headroom["best per-objects CIDEr"] >= headroom["caption CIDEr"] - 1e-9).all()
    assert (headroom["its TFLOPs %"] <= headroom["TFLOPs %"] + 1e-9).all()
    assert headroom.loc[1, "its R by objects"] in {f"1 object: {a}, 4 objects: {b}" for a in ("0", "0.75") for b in ("0", "0.75")}


def test_the_per_objects_table_refuses_runs_of_different_scenes(shapes_runs, tmp_path):
    out, _ = shapes_runs
    shutil.copytree(out / "original_llava", tmp_path / "original")
    shutil.copytree(out / "fastv_llava", tmp_path / "fastv")
    captions = next((tmp_path / "fastv").glob("**/*_samples_shapes_caption.jsonl"))
    captions.write_text("".join(captions.read_text().splitlines(keepends=True)[:-1]))  # one caption fewer
    with pytest.raises(PruningConfigError, match="did not caption the same scenes"):
        caption_rate_by_objects(results_table([tmp_path]))


def test_the_embedded_model_is_the_default_pretrained(tmp_path):
    """With no pretrained= the wrappers run the shipped embedded model, offline."""
    log = run_cli(["--model", "fastv_llava", "--model_args", "K=2,R=0.75", "--tasks", "shapes_vqa", "--limit", "4"], tmp_path)
    files = list(Path(tmp_path).glob("**/*_results.json"))
    assert len(files) == 1, log[-3000:]
    results = json.loads(files[0].read_text())
    assert "pretrained" not in results["config"]["model_args"]
    assert results["results"]["shapes_vqa"]["exact_match,none"] > 0, "the trained model answers some questions right"
