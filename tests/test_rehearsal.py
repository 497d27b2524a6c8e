"""The paper grid's offline rehearsal: the checkpoint in the llava-hf LLaVA-1.5 layout, the
mini benchmarks read by lmms-eval's own task definitions, and ./run_all.sh --paper
--rehearse end to end."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from dyrate_eval import EMBEDDED_MODEL_DIR
from dyrate_eval.embedded import rehearsal
from dyrate_eval.prompts import llava_prompt
from dyrate_eval.embedded.world import render, sample_scene

from .test_harness import REPO

PAPER_TASKS = ("gqa", "vizwiz_vqa_val", "scienceqa_img", "textvqa_val", "pope", "mmbench_en_dev", "mme", "nocaps_val",
               "flickr30k_test")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return rehearsal.write_checkpoint(tmp_path_factory.mktemp("rehearsal") / "llava-1.5-7b-rehearsal")


def test_the_checkpoint_has_llava15_ids_and_image_geometry(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    assert (config["image_token_index"], config["text_config"]["vocab_size"], config["text_config"]["pad_token_id"]) == (32000, 32064, 32001)
    assert (config["vision_config"]["image_size"], config["vision_config"]["patch_size"], config["image_seq_length"]) == (336, 14, 576)
    processor = AutoProcessor.from_pretrained(checkpoint)
    assert processor.tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<image>", "<pad>"]) == [0, 1, 2, 32000, 32001]
    inputs = processor(images=[render(sample_scene(0, 2))[0]], text=[llava_prompt("What is this?")], return_tensors="pt")
    assert int((inputs["input_ids"] == 32000).sum()) == 576
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    assert processor.apply_chat_template(chat, add_generation_prompt=True) == "USER: <image>\nWhat is this? ASSISTANT:"


def test_the_checkpoint_holds_the_embedded_decoder_under_the_new_ids(checkpoint):
    """Text alone, the renumbered model gives the embedded model's logits on every token
    both vocabularies share."""
    embedded = LlavaForConditionalGeneration.from_pretrained(EMBEDDED_MODEL_DIR, dtype=torch.float32).eval()
    moved = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokens = AutoProcessor.from_pretrained(EMBEDDED_MODEL_DIR).tokenizer(["What colour is the square?"], return_tensors="pt")
    assert int(tokens["input_ids"].max()) < 550, "text tokens keep their ids"
    with torch.no_grad():
        before = embedded(**tokens).logits[..., 5:550]
        after = moved(**tokens).logits[..., 5:550]
    # the rehearsal checkpoint is stored in float16, as llava-hf's is
    torch.testing.assert_close(after, before, atol=0.05, rtol=0.02)


def test_lmms_evals_own_tasks_read_the_mini_benchmarks_offline(tmp_path):
    hf_home = tmp_path / "hf_home"
    written = rehearsal.write_benchmarks(hf_home, docs=4)
    assert set(written) == set(PAPER_TASKS)
    script = """
import json, sys
from lmms_eval.tasks import TaskManager, get_task_dict
tasks = get_task_dict(sys.argv[1].split(","), TaskManager())
docs = {}
for name, task in tasks.items():
    split = task.config.test_split
    docs[name] = [len(task.dataset[split]), str(task.doc_to_text(task.dataset[split][0])), len(task.doc_to_visual(task.dataset[split][0]))]
print(json.dumps(docs))
"""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script, ",".join(PAPER_TASKS)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    docs = json.loads(done.stdout.strip().splitlines()[-1])
    for task in PAPER_TASKS:
        count, prompt, images = docs[task]
        assert (count, images) == (written[task], 1), task
    assert "Answer the question using a single word or phrase." in docs["gqa"][1]
    # MME's prompt swaps the data's " Please answer yes or no." for the task's post-prompt
    assert docs["mme"][1] == "Is there a green square in the image?\nAnswer the question using a single word or phrase."
    assert "A. " in docs["scienceqa_img"][1] and "A. " in docs["mmbench_en_dev"][1]


def test_run_all_rehearses_the_paper_grid_into_the_papers_tables(tmp_path):
    """./run_all.sh --paper --rehearse, cut to the original and DyRate cells: the setup, the
    predictor trained for the rehearsal checkpoint, lmms-eval's nine tasks, the latency
    pass and the report, whose Table 1 and Table 2 hold rehearsal rows in every benchmark
    column and paired latency ratios."""
    command = ["./run_all.sh", "--paper", "--rehearse", "--limit", "2", "--runs", str(tmp_path / "paper"), "--only", "7b_original,7b_dyrate"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert (tmp_path / "paper-rehearsal-setup" / "predictor" / "predictor.json").is_file(), "the setup goes beside --runs"
    report = tmp_path / "paper" / "report"
    table1 = pd.read_csv(report / "table1_benchmarks.csv")
    rehearsed = table1[table1["source"] == "rehearsal"].set_index("method")
    assert sorted(rehearsed.index) == ["dyrate", "original"]
    for column in ("GQA", "VizWiz", "SQA-IMG", "TextVQA", "POPE", "MMB", "MME perception", "TFLOPs %"):
        assert rehearsed[column].notna().all(), column
    assert rehearsed.loc["original", "TFLOPs %"] == pytest.approx(100)
    table2 = pd.read_csv(report / "table2_captioning.csv")
    captions = table2[table2["source"] == "rehearsal"]
    assert captions[["NoCaps CIDEr", "Flickr30k CIDEr"]].notna().all().all()
    for table in (rehearsed, captions):
        assert table[["latency ratio", "TTFT ratio", "latency (ms)", "original latency (ms)"]].notna().all(axis=None)
        assert (table["batch"] == 1).all() and (table["latency samples"] > 0).all()
    assert (captions["model"] == "7B").all()
    assert "7b_fastv_K2_R0.5" not in log, "--only runs the named cells alone"
