"""The lmms-eval integration, through the real CLI, offline. The CLI exits 0 even when
a run fails, so every check reads the files a run writes."""

import fcntl
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dyrate_eval.arch import load_arch
from dyrate_eval.errors import PruningConfigError
from dyrate_eval.core.simulate import simulate_plan
from dyrate_eval.measure.flops import plan_flops
from dyrate_eval.methods import make_policy

REPO = Path(__file__).resolve().parents[1]
SMOKE_DOCS = 8


def run_error(log: str, lines: int = 40) -> str:
    """What a failed run said: its last traceback (lmms-eval logs it and exits 0), else
    the end of its log."""
    tail = log.splitlines()
    starts = [i for i, line in enumerate(tail) if line.startswith("Traceback")]
    return "\n".join(tail[starts[-1]:][:lines] if starts else tail[-lines:])


def run_cli(args, out_dir, launcher=None, expect_results=True, include_path=REPO / "tasks"):
    """Run the lmms-eval CLI; unless ``expect_results`` is False, a run that wrote no
    results file fails the test with the run's own error."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = (launcher or [sys.executable, "-m", "lmms_eval"]) + [
        *args, "--include_path", str(include_path), "--output_path", str(out_dir), "--log_samples", "--timezone", "UTC",
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    if expect_results and not list(Path(out_dir).glob("**/*_results.json")):
        pytest.fail(f"lmms-eval wrote no results file in {out_dir}; the run said:\n{run_error(log)}", pytrace=False)
    return log


def read_samples(out_dir):
    results = list(Path(out_dir).glob("**/*_results.json"))
    samples = list(Path(out_dir).glob("**/*_samples_dyrate_smoke.jsonl"))
    assert len(results) == 1 and len(samples) == 1, f"expected one results and one samples file in {out_dir}"
    by_doc = {}
    for line in samples[0].read_text().splitlines():
        sample = json.loads(line)
        by_doc[sample["doc_id"]] = sample
    return json.loads(results[0].read_text()), by_doc


def read_run(out_dir):
    results, by_doc = read_samples(out_dir)
    return results, {doc_id: sample["filtered_resps"] for doc_id, sample in by_doc.items()}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def single_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    log = run_cli(["--model", "fastv_llava", "--model_args", f"pretrained={tiny_dir},K=2,R=0.5", "--tasks", "dyrate_smoke"], out)
    return out, log


def test_fastv_through_the_cli_writes_the_metric(single_run):
    out, log = single_run
    results, responses = read_run(out)
    assert "exact_match,none" in results["results"]["dyrate_smoke"], log[-2000:]
    assert sorted(responses) == list(range(SMOKE_DOCS))
    assert "rank 0/1: 8 generation requests, method fastv" in log


def test_each_sample_log_carries_its_measurements(single_run, tiny_dir):
    """FLOPs, kept tokens and latency per sample, where the report joins them by doc id;
    the FLOPs ratio equals an independent count (the simulated plans of FastV and of the
    original for the same prompt and number of new tokens)."""
    results, by_doc = read_samples(single_run[0])
    arch = load_arch(tiny_dir)
    fastv = make_policy("fastv", arch, K=2, R=0.5)
    ratios = []
    for sample in by_doc.values():
        measured = sample["token_counts"][0]["dyrate"]
        assert measured["policy"] == {"method": "fastv", "K": 2, "R": 0.5, "selection": "attention", "positions": "original"}
        steps = measured["new_tokens"]
        assert sample["token_counts"][0]["output_tokens"] == steps == len(measured["kept_image_by_step"])
        # 4 layers, 64 image tokens, half dropped before layer 2
        assert measured["kept_image_by_step"][0] == (64 + 64 + 32 + 32) / 4
        expected = plan_flops(simulate_plan(fastv, arch, measured["text_tokens"], steps), arch)["total"]
        original = plan_flops(simulate_plan(make_policy("original", arch), arch, measured["text_tokens"], steps), arch)["total"]
        assert measured["tflops"] * 1e12 == pytest.approx(expected, rel=1e-9)
        assert measured["flops_ratio"] == pytest.approx(expected / original, rel=1e-9)
        assert measured["ttft_ms"] > 0 and measured["end_to_end_ms"] >= measured["ttft_ms"]
        ratios.append(measured["flops_ratio"])
    # batch size 1: the run-level average is the mean over samples
    assert results["throughput"]["avg_flops_ratio"] == pytest.approx(sum(ratios) / len(ratios))


def test_batched_run_gives_the_same_answers_and_flops(single_run, tiny_dir, tmp_path):
    args = ["--model", "dyrate_llava", "--model_args", f"pretrained={tiny_dir},method=fastv,K=2,R=0.5", "--batch_size", "2"]
    log = run_cli([*args, "--tasks", "dyrate_smoke"], tmp_path)
    _, batched = read_samples(tmp_path)
    _, single = read_samples(single_run[0])
    assert {d: s["filtered_resps"] for d, s in batched.items()} == {d: s["filtered_resps"] for d, s in single.items()}, log[-2000:]
    for doc_id, sample in batched.items():
        measured, alone = sample["token_counts"][0]["dyrate"], single[doc_id]["token_counts"][0]["dyrate"]
        assert measured["batch_size"] == 2
        # padding is not counted: a sample costs what it costs alone
        assert measured["tflops"] == pytest.approx(alone["tflops"], rel=1e-12)


def test_two_process_data_parallel_run_splits_the_docs_and_matches(single_run, tiny_dir, tmp_path):
    accelerate = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(free_port()), "-m", "lmms_eval"]
    args = ["--model", "fastv_llava", "--model_args", f"pretrained={tiny_dir},K=2,R=0.5", "--tasks", "dyrate_smoke"]
    log = run_cli(args, tmp_path, launcher=accelerate)
    assert "rank 0/2: 4 generation requests" in log and "rank 1/2: 4 generation requests" in log, log[-3000:]
    results, responses = read_run(tmp_path)
    assert responses == read_run(single_run[0])[1]
    # the run-level averages cover both ranks' samples (batch size 1: the mean over samples)
    _, by_doc = read_samples(tmp_path)
    ratios = [sample["token_counts"][0]["dyrate"]["flops_ratio"] for sample in by_doc.values()]
    assert results["throughput"]["avg_flops_ratio"] == pytest.approx(sum(ratios) / len(ratios))
    assert results["throughput"]["total_gen_tokens"] == sum(sample["token_counts"][0]["output_tokens"] for sample in by_doc.values())
    assert results["results"]["dyrate_smoke"]["exact_match,none"] == read_run(single_run[0])[0]["results"]["dyrate_smoke"]["exact_match,none"]


@pytest.mark.parametrize(
    "model,model_args,message",
    [
        ("dyrate_llava", "method=fastv,K=9", "K=9 is not allowed for method 'fastv': K must be an integer in 1..3"),
        ("dyrate_llava", "method=pyramid", "unknown method 'pyramid': allowed methods are original, fastv, vtw"),
        ("fastv_llava", "R=2", "R=2 is not allowed for method 'fastv': R must be a number in [0, 1]"),
        ("vtw_llava", "R=0.5", "method 'vtw' does not take setting 'R'; it takes: K"),
        ("vtw_llava", "method=fastv", "method='fastv' is not allowed for this model: it always runs 'vtw'"),
        ("fastv_llava", "batch_size=4", "batch_size=4 is not allowed in --model_args: lmms-eval sets batch_size with its own "
                                        "option; give --batch_size 4 instead"),
        ("original_llava", "pretrained=/no/such/folder", "pretrained=/no/such/folder is not allowed: there is no such folder; "
                                                         "allowed is a LLaVA-1.5 checkpoint"),
    ],
)
def test_bad_settings_through_the_cli(tiny_dir, tmp_path, model, model_args, message):
    log = run_cli(["--model", model, "--model_args", f"pretrained={tiny_dir},{model_args}", "--tasks", "dyrate_smoke"], tmp_path,
                  expect_results=False)
    assert message in log
    assert not list(tmp_path.glob("**/*_results.json"))
    assert "Loading weights" not in log, "the settings must be refused before the weights load"


def test_a_second_run_into_a_busy_output_path_is_refused(tiny_dir, tmp_path):
    from model_wrappers.llava_pruned import OUTPUT_LOCK

    with open(tmp_path / OUTPUT_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the first run holds while it runs
        log = run_cli(["--model", "original_llava", "--model_args", f"pretrained={tiny_dir}", "--tasks", "dyrate_smoke"], tmp_path,
                      expect_results=False)
    assert f"--output_path {tmp_path} is not allowed: another run is writing into it" in log
    assert not list(tmp_path.glob("**/*_samples_*.jsonl")), "the running run's files stay its own"


def test_an_unwritable_output_path_is_refused_before_the_model_loads(tiny_dir, tmp_path):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "runs"
    log = run_cli(["--model", "original_llava", "--model_args", f"pretrained={tiny_dir}", "--tasks", "dyrate_smoke"], out,
                  expect_results=False)
    assert f"--output_path {out} is not allowed: {tmp_path / 'a_file'} is not a folder" in log
    assert "Loading weights" not in log


@pytest.mark.parametrize(
    "config,message",
    [
        (None, "the folder holds no config.json"),
        ({"model_type": "llama"}, "it is a 'llama' model"),
        ({}, "it cannot be read as a model (Unrecognized model"),
    ],
)
def test_pretrained_must_be_a_llava_checkpoint(tmp_path, config, message):
    from model_wrappers.llava_pruned import OriginalLlava

    folder = tmp_path / "model"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(PruningConfigError) as error:
        OriginalLlava.create_from_arg_string(f"pretrained={folder}")
    assert str(error.value).startswith(f"pretrained={folder} is not allowed: {message}")
    assert str(error.value).endswith("allowed is a LLaVA-1.5 checkpoint: a folder with its config.json (model_type 'llava') "
                                     "or a hub id such as llava-hf/llava-1.5-7b-hf")


NO_IMAGE_DOC = 2


@pytest.fixture(scope="module")
def no_image_tasks(tmp_path_factory):
    """The smoke task's first four docs, doc 2 without an image, as a task folder of its own."""
    folder = tmp_path_factory.mktemp("tasks")
    smoke = REPO / "tasks" / "dyrate_smoke"
    docs = [json.loads(line) for line in (smoke / "smoke.jsonl").read_text().splitlines()[:4]]
    docs[NO_IMAGE_DOC]["no_image"] = True
    (folder / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (folder / "no_image.yaml").write_text((smoke / "dyrate_smoke.yaml").read_text()
                                          .replace("task: dyrate_smoke", "task: dyrate_no_image").replace("smoke.jsonl", "docs.jsonl"))
    (folder / "utils.py").write_text((smoke / "utils.py").read_text().replace(
        "    image = Image.new(", "    if doc.get('no_image'):\n        return []\n    image = Image.new("))
    return folder


def test_original_answers_a_doc_without_an_image(tiny_dir, tmp_path, no_image_tasks):
    run_cli(["--model", "original_llava", "--model_args", f"pretrained={tiny_dir}", "--tasks", "dyrate_no_image"], tmp_path,
            include_path=no_image_tasks)
    [samples] = tmp_path.glob("**/*_samples_dyrate_no_image.jsonl")
    by_doc = {sample["doc_id"]: sample for sample in map(json.loads, samples.read_text().splitlines())}
    assert sorted(by_doc) == [0, 1, 2, 3]
    assert [by_doc[doc]["token_counts"][0]["dyrate"]["image_tokens"] for doc in range(4)] == [64, 64, 0, 64]


def test_a_pruning_method_refuses_a_doc_without_an_image_before_generating(tiny_dir, tmp_path, no_image_tasks):
    log = run_cli(["--model", "fastv_llava", "--model_args", f"pretrained={tiny_dir},K=2,R=0.5", "--tasks", "dyrate_no_image"],
                  tmp_path, expect_results=False, include_path=no_image_tasks)
    assert (f"method 'fastv' prunes image tokens, and these docs have no image: task dyrate_no_image doc {NO_IMAGE_DOC}. "
            "Nothing was generated.") in log
    assert "generation requests" not in log, "refused before any answer was generated"
    assert not list(tmp_path.glob("**/*_results.json"))
