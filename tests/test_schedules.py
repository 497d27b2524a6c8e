"""Layer schedules (method=schedule) and the searches that write them: G-Search,
P-Sigmoid and VTW's choice of K."""

import functools
import json
import math
import sys
from unittest import mock
from pathlib import Path

import pytest
import torch

from dyrate_eval import PruningConfigError, apply_pruning, executed_plan, pruning_method
from dyrate_eval.arch import Arch, load_arch
from dyrate_eval.cli import main as dyrate_eval
from dyrate_eval.core.simulate import simulate_plan
from dyrate_eval.measure.timing import BatchTiming, sample_measurements
from dyrate_eval.methods import make_policy
from dyrate_eval.report.runs import load_runs
from dyrate_eval.search.calibration import FlopsShare
from dyrate_eval.search.gsearch import greedy_search
from dyrate_eval.search.psigmoid import sigmoid_schedule

from .conftest import load_model
from .reference import MaskedKeys, greedy, image_positions
from .test_harness import REPO, run_cli

NEW = 6
TASKS = str(REPO / "tasks")


# -- the schedule method ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,settings,schedule",
    [
        ("fastv", {"K": 2, "R": 0.5}, [64, 64, 32, 32]),
        ("fastv", {"K": 1, "R": 0.75}, "64/16/16/16"),
        ("vtw", {"K": 2}, [64, 64, 0, 0]),
        ("vtw", {"K": 3}, "64/64/64/0"),
    ],
)
def test_schedule_equal_to_fastv_or_vtw_gives_exactly_its_output(tiny_dir, make_inputs, method, settings, schedule):
    inputs = make_inputs((0, 1))
    model = apply_pruning(load_model(tiny_dir), method=method, **settings)
    reference_tokens, reference_logits, _ = greedy(model, inputs, NEW)
    reference_plan = executed_plan(model)
    apply_pruning(model, method="schedule", schedule=schedule)
    tokens, logits, _ = greedy(model, inputs, NEW)
    assert torch.equal(tokens, reference_tokens)
    assert torch.equal(logits, reference_logits)
    for row in range(2):
        assert executed_plan(model).for_row(row) == reference_plan.for_row(row)


def test_schedule_file_with_search_metadata_runs_and_describes_itself(tiny_dir, make_inputs, tmp_path):
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps({"schedule": [64, 64, 32, 32], "searched_by": "gsearch", "label": "criterion=kl"}))
    model = apply_pruning(load_model(tiny_dir), method="fastv", K=2, R=0.5)
    reference_tokens, _, _ = greedy(model, make_inputs((0,)), NEW)
    policy = pruning_method(apply_pruning(model, method="schedule", schedule=str(path)))
    assert torch.equal(greedy(model, make_inputs((0,)), NEW)[0], reference_tokens)
    assert policy.describe() == {"method": "schedule", "schedule": [64, 64, 32, 32], "positions": "original", "searched_by": "gsearch",
                                 "label": "criterion=kl"}


class ScheduleReference:
    """The unmodified model (eager attention) whose layer l cannot attend to the image
    keys a schedule dropped up to l: at each layer where the count drops, the last prompt
    token's head-averaged attention at the previous layer ranks the image tokens still
    kept (once, at prefill). Nothing here uses the project's executor."""

    def __init__(self, model, positions, counts):
        self.kept = [row.clone() for row in positions]
        self.positions = positions
        self.handles = []
        layers = model.model.language_model.layers
        for layer in range(1, len(counts)):
            if counts[layer] < counts[layer - 1]:
                masking = MaskedKeys(model, layer, [row[:0] for row in positions])
                select = functools.partial(self._select, counts[layer], masking)
                self.handles += [masking, layers[layer - 1].self_attn.register_forward_hook(select)]

    def _select(self, count, masking, module, args, output):
        weights = output[1]  # (B, heads, queries, keys): eager attention returns its weights
        if weights.shape[2] == 1:
            return  # a decode step: the prefill's selection holds
        for row, positions in enumerate(self.positions):
            scores = weights[row, :, -1, :].mean(0)[self.kept[row]]
            self.kept[row] = self.kept[row][scores.topk(count).indices].sort().values
            masking.dropped[row] = positions[~torch.isin(positions, self.kept[row])]

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("counts", [[64, 40, 16, 0], [64, 48, 48, 8]])
def test_schedule_with_several_drops_matches_masked_reference(tiny_dir, make_inputs, counts):
    inputs = make_inputs((1,))
    eager = load_model(tiny_dir, attn="eager")
    reference = ScheduleReference(eager, image_positions(inputs["input_ids"], eager.config.image_token_id), counts)
    reference_tokens, reference_logits, _ = greedy(eager, inputs, NEW)
    reference.remove()

    model = apply_pruning(load_model(tiny_dir), method="schedule", schedule=counts)
    tokens, logits, _ = greedy(model, inputs, NEW)
    assert torch.equal(tokens, reference_tokens)
    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=0)
    assert executed_plan(model).kept_image_tokens()[0].eq(torch.tensor(counts)).all()
    # FLOPs of schedules come from the simulated plan: it is the executed one
    arch = Arch.from_config(model.config, "tiny")
    text_tokens = inputs["input_ids"].shape[1] - arch.n_img
    assert simulate_plan(make_policy("schedule", arch, schedule=counts), arch, text_tokens, NEW).for_row(0) == executed_plan(model).for_row(0)


ALLOWED = ("schedule must be a JSON schedule file or keep counts separated by '/' (e.g. 144/144/72/72/36/36), one per "
           "decoder layer, non-increasing, the first equal to the image tokens (layer 0 is never pruned)")


@pytest.mark.parametrize(
    "schedule,reason",
    [
        ("64/64/32", "got 3 counts for 4 decoder layers"),
        ("64/32/48/16", "layer 2 keeps 48, more than layer 1's 32"),
        ([64, 80, 32, 0], "layer 1 keeps 80, outside 0..64, the model's image tokens"),
        ([48, 48, 32, 0], "layer 0 keeps 48, but it always sees all 64 image tokens"),
        ([64, 32.5, 16, 0], "every count must be a whole number of image tokens"),
        ("64,64,32,32", "no such readable file (No such file or directory); counts given inline are separated by '/'"),
        ("64/64/-5/0", "layer 2 keeps -5, outside 0..64, the model's image tokens"),
        ("64/64/x/0", "layer 2's count 'x' is not a whole number of image tokens"),
        (3, "got a int"),
    ],
)
def test_bad_schedules_fail_with_a_clear_message(tiny_dir, schedule, reason):
    model = load_model(tiny_dir)
    with pytest.raises(PruningConfigError) as error:
        apply_pruning(model, method="schedule", schedule=schedule)
    assert str(error.value) == f"schedule={schedule!r} is not allowed for method 'schedule': {ALLOWED} ({reason})"
    assert type(model.model.language_model).__name__ == "LlamaModel", "a failed call must not change the model"


def test_bad_schedule_files_and_a_missing_schedule_are_named(tmp_path):
    arch = load_arch("llava-1.5-7b")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"keep": [576] * 32}))
    with pytest.raises(PruningConfigError, match="neither a list of counts nor an object with a 'schedule' list"):
        make_policy("schedule", arch, schedule=str(wrong))
    wrong.write_text("[576, 576,")
    with pytest.raises(PruningConfigError, match="cannot read it as JSON: Expecting value"):
        make_policy("schedule", arch, schedule=wrong)
    with pytest.raises(PruningConfigError, match=r"got 4 counts for 32 decoder layers"):
        make_policy("schedule", arch, schedule="576/576/288/0")
    with pytest.raises(PruningConfigError, match="method 'schedule' needs schedule=: .* this model has 32 decoder layers and 576 image tokens"):
        make_policy("schedule", arch)


def test_inline_schedule_survives_lmms_eval_model_args(tiny_dir):
    """lmms-eval splits --model_args at commas; the counts are separated by '/'."""
    from model_wrappers.llava_pruned import DyRateLlava

    model = DyRateLlava.create_from_arg_string(f"pretrained={tiny_dir},method=schedule,schedule=64/64/32/32")
    assert model.policy_settings == {"method": "schedule", "schedule": [64, 64, 32, 32], "positions": "original"}


# -- the searches' pieces ---------------------------------------------------------------------


def test_greedy_search_takes_the_smallest_count_within_tolerance_layer_by_layer():
    """A synthetic criterion: layer l must keep at least need[l] tokens. Layer 3 needs
    more than layer 2, so layer 2 is set by layer 3's need, and layer 3 cannot go lower."""
    need = [0, 40, 20, 30, 5]
    grid = [48, 0, 32, 8, 16, 8]  # unsorted, with a duplicate
    tried = []

    def within(layer, candidate):
        tried.append((layer, candidate))
        return all(count >= needed for count, needed in zip(candidate, need))

    schedule = greedy_search(5, 64, grid, within)
    assert schedule == (64, 48, 32, 32, 8)
    assert all(a >= b for a, b in zip(schedule, schedule[1:]))
    # every candidate keeps the layers fixed so far and sets the deeper ones to its count,
    # counts are tried from the smallest up, below the previous layer's, until one holds
    for layer, candidate in tried:
        assert all(count == candidate[layer] for count in candidate[layer:])
    assert [(layer, candidate[layer]) for layer, candidate in tried] == [
        (1, 0), (1, 8), (1, 16), (1, 32), (1, 48), (2, 0), (2, 8), (2, 16), (2, 32), (3, 0), (3, 8), (3, 16), (4, 0), (4, 8),
    ]
    assert [candidate[:3] for layer, candidate in tried if layer == 3] == [(64, 48, 32)] * 3


def test_greedy_search_keeps_everything_when_nothing_holds():
    assert greedy_search(4, 64, [0, 16, 32], lambda layer, candidate: False) == (64, 64, 64, 64)


def test_sigmoid_schedule_follows_its_formula():
    k, a, b = 1.5, 2.0, 0.25
    counts = sigmoid_schedule(k, a, b, 6, 144)
    assert counts[0] == 144
    assert list(counts[1:]) == [round(144 * (b + (1 - b) / (1 + math.exp(k * (layer - a))))) for layer in range(1, 6)]
    assert all(x >= y for x, y in zip(counts, counts[1:]))
    assert sigmoid_schedule(10.0, 0.0, 0.0, 40, 576) == (576,) + (0,) * 39  # steep: no overflow


def test_flops_share_of_a_schedule_is_the_projects_language_model_share():
    arch = load_arch("llava-1.5-7b")
    share = FlopsShare(arch, text_tokens=40, new_tokens=8)
    fastv = make_policy("fastv", arch, K=2, R=0.5)
    assert share.of_schedule((576, 576) + (288,) * 30) == share(fastv)
    # the share the harness runs record per sample, for the same plan
    untimed = BatchTiming(ttft_ms=0.0, decode_ms_per_token=0.0, end_to_end_ms=0.0, device_memory_peak=None)
    measured = sample_measurements(simulate_plan(fastv, arch, 40, 8), arch, [8], 1, untimed, 2)[0]
    assert share(fastv) == pytest.approx(measured["flops_ratio_language_model"], rel=1e-12)
    assert 0 < share(fastv) < 1


# -- the commands on the tiny model ----------------------------------------------------------


def calibration_args(tiny_dir):
    return ["--pretrained", str(tiny_dir), "--task", "dyrate_smoke", "--limit", "8", "--include-path", TASKS]


@pytest.fixture(scope="module")
def gsearch_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gsearch") / "gsearch_kl.json"
    args = ["gsearch", *calibration_args(tiny_dir), "--criterion", "kl", "--tolerance", "0.04", "--grid", "0,0.25,0.5",
            "--out", str(out)]
    # the command line as the installed command sees it: the search builds the lmms-eval
    # model, which reads lmms-eval's --output_path from it (and must not take --out for it)
    with mock.patch.object(sys, "argv", ["dyrate-eval", *args]):
        code = dyrate_eval(args)
    assert code == 0
    return out


def test_gsearch_writes_a_schedule_and_its_search_log(gsearch_run, tiny_dir):
    written = json.loads(gsearch_run.read_text())
    log = json.loads(gsearch_run.with_name("gsearch_kl.search.json").read_text())
    schedule = written["schedule"]
    assert written["searched_by"] == "gsearch" and written["label"] == "criterion=kl,tolerance=0.04,task=dyrate_smoke"
    assert written["log"] == "gsearch_kl.search.json"
    settings = written["settings"]
    assert settings["calibration"] == {"task": "dyrate_smoke", "split": "test", "offset": 0, "limit": 8, "docs": 8}
    assert settings["grid"] == [0, 16, 32] and settings["tolerance"] == 0.04
    assert set(settings["flops_share"]) == {"flops", "text_tokens", "image_tokens", "new_tokens"}
    arch = load_arch(tiny_dir)
    make_policy("schedule", arch, schedule=str(gsearch_run))  # a valid schedule file
    # the log: every candidate tried, in order, each within tolerance exactly when its KL is
    candidates = log["candidates"]
    assert candidates and all(set(entry) == {"layer", "keep", "schedule", "value", "within_tolerance", "flops_share"}
                              for entry in candidates)
    assert all(entry["within_tolerance"] == (entry["value"] <= 0.04) for entry in candidates)
    assert [entry["layer"] for entry in candidates] == sorted(entry["layer"] for entry in candidates)
    # the rule, replayed on the logged values: per layer the smallest count within tolerance
    replayed = greedy_search(4, 64, [0, 16, 32], lambda layer, candidate: next(
        entry["within_tolerance"] for entry in candidates if entry["schedule"] == list(candidate)))
    assert list(replayed) == schedule
    assert written["flops_share"] == FlopsShare(arch, settings["flops_share"]["text_tokens"], 1).of_schedule(tuple(schedule))
    assert written["value"] <= 0.04


def test_psigmoid_writes_the_best_schedule_under_the_budget_and_its_trials(tiny_dir, tmp_path):
    out = tmp_path / "psigmoid.json"
    assert dyrate_eval(["psigmoid", *calibration_args(tiny_dir), "--budget", "0.8", "--trials", "3", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    history = json.loads((tmp_path / "psigmoid.trials.json").read_text())["trials"]
    assert written["searched_by"] == "psigmoid" and written["label"] == "criterion=score,budget=0.8,task=dyrate_smoke"
    assert written["settings"]["metric"] == "exact_match" and written["settings"]["budget"] == 0.8
    evaluated = [trial for trial in history if trial["evaluated"]]
    assert len(evaluated) == 3
    assert all(trial["flops_share"] > 0.8 for trial in history if not trial["evaluated"])
    assert all(set(trial) == {"trial", "k", "a", "b", "schedule", "flops_share", "evaluated", "value"} for trial in history)
    best = next(trial for trial in history if trial["trial"] == written["trial"])
    assert best["evaluated"] and written["schedule"] == best["schedule"] and written["flops_share"] <= 0.8
    assert tuple(written["schedule"]) == sigmoid_schedule(best["k"], best["a"], best["b"], 4, 64)
    assert best["value"] == max(trial["value"] for trial in evaluated)


def test_find_vtw_k_prints_the_kl_curve_and_picks_the_first_layer_under_eta(tiny_dir, tmp_path, capsys):
    out = tmp_path / "vtw.json"
    assert dyrate_eval(["find-vtw-k", *calibration_args(tiny_dir), "--eta", "0.03", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    curve = result["curve"]
    assert [point["K"] for point in curve] == [1, 2, 3]  # the first candidate of a shallow model is 1
    assert result["K"] == next((point["K"] for point in curve if point["kl"] <= 0.03), None)
    printed = capsys.readouterr().out
    assert all(f"{point['K']:4d} {point['kl']:10.5f}" in printed for point in curve)
    assert (f"K = {result['K']}: the first layer with a mean KL <= 0.03" if result["K"] else "no K from 1 on") in printed


@pytest.mark.parametrize(
    "command,message",
    [
        (["gsearch", "--criterion", "kl", "--metric", "exact_match", "--tolerance", "0.1"], "--metric goes with --criterion score"),
        (["gsearch", "--metric", "bleu", "--tolerance", "0.1"], "--metric 'bleu' is not a metric of dyrate_smoke: it has exact_match"),
        (["find-vtw-k", "--first-layer", "4"], "--first-layer 4 is not allowed: it must be an integer in 1..3 (this model has 4 decoder layers)"),
        (["psigmoid", "--budget", "0.3"], "--budget 0.3 is below the smallest FLOPs share a schedule reaches on this model"),
        (["psigmoid", "--budget", "0.5", "--k-range", "2", "1"], "--k-range 2 1 is not allowed: it must be LOW HIGH with"),
    ],
)
def test_bad_search_settings_are_named(tiny_dir, tmp_path, capsys, command, message):
    args = [*command[:1], *calibration_args(tiny_dir), *command[1:]]
    if command[0] != "find-vtw-k":
        args += ["--out", str(tmp_path / "schedule.json")]
    assert dyrate_eval(args) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_group_is_not_a_calibration_task(tiny_dir, capsys):
    assert dyrate_eval(["find-vtw-k", "--pretrained", str(tiny_dir), "--task", "shapes", "--include-path", TASKS]) == 2
    assert "--task 'shapes' must be one lmms-eval task that generates answers" in capsys.readouterr().err


def test_searched_schedule_evaluates_through_lmms_eval_and_reports_as_its_search(gsearch_run, tiny_dir, tmp_path):
    log = run_cli(["--model", "dyrate_llava", "--model_args", f"pretrained={tiny_dir},method=schedule,schedule={gsearch_run}",
                   "--tasks", "dyrate_smoke"], tmp_path)
    results = list(Path(tmp_path).glob("**/*_results.json"))
    assert len(results) == 1, log[-2000:]
    written = json.loads(gsearch_run.read_text())
    samples = next(Path(tmp_path).glob("**/*_samples_dyrate_smoke.jsonl")).read_text().splitlines()
    policy = json.loads(samples[0])["token_counts"][0]["dyrate"]["policy"]
    assert policy == {"method": "schedule", "schedule": written["schedule"], "positions": "original", "searched_by": "gsearch",
                      "label": written["label"]}
    scores, measured, _ = load_runs([tmp_path])
    assert set(scores["method"]) == {"gsearch"} and set(scores["settings"]) == {written["label"]}
    assert set(measured["method"]) == {"gsearch"} and len(measured) == 8
