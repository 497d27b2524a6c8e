"""The reducers of the DyRate paper's Table 1 (VisionZip, PruMerge, SparseVLM) beyond the
method matrix: their budgets, their refusals of bad settings, and runs through lmms-eval."""

import json
import subprocess
import sys

import pytest
import torch

from dyrate_eval import PruningConfigError
from dyrate_eval.arch import ARCHS
from dyrate_eval.core.policy import StepView
from dyrate_eval.methods import make_policy

from .test_harness import read_samples, run_cli


def test_sparsevlm_keeps_its_budgets_plus_the_recycled_centres_on_the_7b_shape():
    """192 tokens on average: 300, 200 and 110 of 576 before layers 3, 7 and 16, each with
    the centres of the recycled tokens (30% of the deleted, one more; a tenth as many
    clusters, one more)."""
    policy = make_policy("sparsevlm", ARCHS["llava-1.5-7b"])
    view = StepView(n_img=torch.tensor([576]))
    kept = {layer: policy.keep_before_layer(layer, 0, view) for layer in range(1, 32)}
    assert {layer: int(count) for layer, count in kept.items() if count is not None} == {3: 300 + 9, 7: 200 + 4, 16: 110 + 3}
    assert policy.keep_before_layer(3, 1, view) is None, "SparseVLM prunes at the prefill only"


@pytest.mark.parametrize("method,settings,named", [
    ("visionzip", {"tokens": 577}, "tokens=577"),
    ("visionzip", {"tokens": 64, "contextual": 65}, "contextual=65"),
    ("prumerge", {"neighbours": 576}, "neighbours=576"),
    ("prumerge", {"plus": "maybe"}, "plus='maybe'"),
    ("sparsevlm", {"tokens": 100}, "tokens=100"),
    ("sparsevlm", {"layers": "16/7/3"}, "layers='16/7/3'"),
    ("sparsevlm", {"layers": "3/7/32"}, "layers='3/7/32'"),
    ("sparsevlm", {"stages": 3}, "'stages'"),
])
def test_bad_settings_fail_before_any_work_naming_the_setting(method, settings, named):
    with pytest.raises(PruningConfigError, match=named):
        make_policy(method, ARCHS["llava-1.5-7b"], **settings)


def test_flops_before_a_run_where_the_plan_is_known():
    """VisionZip's plan is known before it runs; SparseVLM's scoring rows depend on the
    instruction and PruMerge's count on the image: their FLOPs come from runs."""
    def flops(*args):
        return subprocess.run([sys.executable, "-m", "dyrate_eval.cli", "flops", "--arch", "llava-1.5-7b", "--text-tokens",
                               "40", "--json", *args], capture_output=True, text=True)

    done = flops("--method", "visionzip", "--tokens", "64")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["image_tokens"] == 576 and 0 < result["prefill_ratio"] < 0.2 and result["flops_scoring"] > 0, result
    for method in ("sparsevlm", "prumerge"):
        done = flops("--method", method)
        assert done.returncode == 2 and "from a run" in done.stderr


@pytest.mark.parametrize("method_args", ["method=visionzip", "method=prumerge,plus=True", "method=sparsevlm,layers=1/2/3"])
def test_runs_through_lmms_eval_with_fewer_flops_than_the_original(tiny_dir, tmp_path, method_args):
    run_cli(["--model", "dyrate_llava", "--model_args", f"pretrained={tiny_dir},{method_args}", "--tasks", "dyrate_smoke",
             "--gen_kwargs", "max_new_tokens=4"], tmp_path)
    results, by_doc = read_samples(tmp_path)
    method = method_args.split(",")[0].removeprefix("method=")
    for sample in by_doc.values():
        measured = sample["token_counts"][0]["dyrate"]
        assert measured["policy"]["method"] == method
        assert measured["flops_ratio"] < 1
