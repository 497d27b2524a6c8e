"""DyRate: the per-step rate predictor on the core, its ablation baselines, and its
training, against independent references on the tiny model."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor

from dyrate_eval import PruningConfigError, apply_pruning, executed_plan
from dyrate_eval.arch import load_arch
from dyrate_eval.core.simulate import simulate_plan
from dyrate_eval.measure.flops import kept_count_flops, plan_flops
from dyrate_eval.core.hf_llava import model_arch
from dyrate_eval.dyrate.teacher_forced import TeacherForcedPass
from dyrate_eval.methods import make_policy
from dyrate_eval.core.plan import GROUPS
from dyrate_eval.dyrate.predictor import RatePredictor, kept_masks
from dyrate_eval.embedded.model import save_tiny_llava
from dyrate_eval.embedded import EMBEDDED_MODEL_DIR
from dyrate_eval.dyrate.train import PredictorTrainConfig, ShapesExamples, encode, train_predictor

from .conftest import load_model, make_image
from .reference import ProgressiveEviction, greedy, group_shares, image_positions

K = 2
NEW = 8


def staircase_predictor(arch, slope=200.0):
    """A hand-made predictor whose choice is known: rate index j = about round(slope x
    mean share of attention on the response), so the rate grows as the answer does
    (logit_j = 2 j slope s - j^2 peaks at j = slope s)."""
    predictor = RatePredictor.for_model(arch, K)
    rates = len(predictor.rates)
    weight = torch.zeros(rates, arch.heads, len(GROUPS))
    for j in range(rates):
        weight[j, :, GROUPS.index("response")] = 2 * j * slope / arch.heads
    with torch.no_grad():
        predictor.linear.weight.copy_(weight.flatten(1))
        predictor.linear.bias.copy_(-torch.arange(rates, dtype=torch.float32) ** 2)
    return predictor


def constant_predictor(arch, rate_index):
    predictor = RatePredictor.for_model(arch, K)
    with torch.no_grad():
        predictor.linear.bias[rate_index] = 10.0
    return predictor


@pytest.fixture
def staircase_dir(tiny_dir, tmp_path):
    return str(staircase_predictor(load_arch(tiny_dir)).save(tmp_path / "staircase"))


def dyrate_reference(tiny_dir, inputs, predictor, progressive=True):
    """The unmodified model (eager), whose layer K-1 weights give each step's features
    and ranking; the predictor's choice masks image keys out of layers >= K."""
    eager = load_model(tiny_dir, attn="eager")
    positions = image_positions(inputs["input_ids"], eager.config.image_token_id)
    prompt_length = inputs["input_ids"].shape[1]

    def decide(row, step, weights):
        rate = predictor.rates[int(predictor(group_shares(weights, positions[row], prompt_length)[None]).argmax())]
        return round((1 - rate) * len(positions[row]))

    reference = ProgressiveEviction(eager, K, positions, decide, progressive=progressive)
    tokens, logits, _ = greedy(eager, inputs, NEW, output_attentions=True)
    reference.remove()
    return tokens, logits, reference.chosen


def test_predictor_choices_drive_the_kept_counts_step_by_step(tiny_dir, make_inputs, staircase_dir):
    inputs = make_inputs((0, 1))
    model = apply_pruning(load_model(tiny_dir), method="dyrate", predictor=staircase_dir)
    tokens, logits, out = greedy(model, inputs, NEW)
    plan = executed_plan(model)

    reference_tokens, reference_logits, reference_chosen = dyrate_reference(tiny_dir, inputs, staircase_predictor(load_arch(tiny_dir)))
    chosen = torch.stack(plan.chosen_keep, dim=1)  # (rows, steps)
    assert chosen.tolist() == reference_chosen, "the features and the predictor's choice differ from the eager reference"
    assert len(set(chosen.flatten().tolist())) > 2, "the staircase predictor should move through several rates"
    assert torch.equal(tokens, reference_tokens)
    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=0)

    kept = plan.kept_image_tokens()  # (rows, steps, layers)
    assert kept[:, :, :K].eq(64).all(), "layers < K keep every image token"
    progressive = torch.cummin(chosen, dim=1).values  # a dropped token never returns
    assert torch.equal(kept[:, :, K], progressive) and torch.equal(kept[:, :, -1], progressive)
    slots = torch.stack(plan.last_layer_slots, dim=1)  # (rows, steps, image slots)
    assert not (slots[:, 1:] & ~slots[:, :-1]).any(), "kept sets never grow in progressive mode"
    lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    full = inputs["input_ids"].shape[1] + NEW - 1
    for row in range(2):  # rows keep different counts: the shorter one is padded with filler
        assert int(plan.keys[-1][row, -1]) == full - int(inputs["attention_mask"][row].eq(0).sum()) - (64 - int(progressive[row, -1]))
    assert lengths[:K] == [full] * K and all(length < full for length in lengths[K:])
    shares = torch.stack(plan.group_attention, dim=1)
    assert shares.sum(-1).sub(1).abs().max() < 1e-5, "the step's attention shares sum to one"
    assert shares[:, 1:, GROUPS.index("response")].gt(0).all() and shares[:, 0, GROUPS.index("response")].eq(0).all()


def test_mask_mode_reselects_among_all_image_tokens(tiny_dir, make_inputs, staircase_dir):
    inputs = make_inputs((0,))
    model = apply_pruning(load_model(tiny_dir), method="dyrate", predictor=staircase_dir, mode="mask")
    tokens, logits, out = greedy(model, inputs, NEW)
    reference_tokens, reference_logits, reference_chosen = dyrate_reference(
        tiny_dir, inputs, staircase_predictor(load_arch(tiny_dir)), progressive=False
    )
    plan = executed_plan(model)
    assert torch.stack(plan.chosen_keep, dim=1).tolist() == reference_chosen
    assert torch.equal(tokens, reference_tokens)
    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=0)
    full = inputs["input_ids"].shape[1] + NEW - 1
    assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == [full] * 4, "masked tokens stay cached"
    assert plan.kept_image_tokens()[0, :, -1].tolist() == reference_chosen[0]


def test_a_predictor_that_always_keeps_everything_is_the_original_model(tiny_dir, make_inputs, tmp_path):
    inputs = make_inputs((0, 1))
    plain = load_model(tiny_dir)
    reference_tokens, reference_logits, _ = greedy(plain, inputs, NEW)
    path = constant_predictor(load_arch(tiny_dir), 0).save(tmp_path / "rate0")
    model = apply_pruning(load_model(tiny_dir), method="dyrate", predictor=str(path))
    tokens, logits, _ = greedy(model, inputs, NEW)
    assert torch.equal(tokens, reference_tokens)
    assert torch.equal(logits, reference_logits)
    assert torch.stack(executed_plan(model).chosen_keep).eq(64).all()


def test_teacher_forced_pass_is_the_generation_it_trains(tiny_dir, make_inputs, staircase_dir):
    """Teacher-forced on its own greedy output with the predictor's argmax choices, the
    training pass gives the generation's kept sets and logits: training optimises what runs."""
    inputs = make_inputs((0,))
    model = apply_pruning(load_model(tiny_dir), method="dyrate", predictor=staircase_dir)
    tokens, logits, _ = greedy(model, inputs, NEW)
    plan = executed_plan(model)

    plain = load_model(tiny_dir)
    predictor = staircase_predictor(load_arch(tiny_dir))
    prompt_length = inputs["input_ids"].shape[1]
    sequence = torch.cat([inputs["input_ids"], tokens], dim=1)
    forced = TeacherForcedPass(plain, sequence, inputs["pixel_values"], torch.tensor([prompt_length]), torch.tensor([NEW]), K)
    choice = torch.nn.functional.one_hot(predictor(forced.group_attention).argmax(-1), len(predictor.rates)).float()
    weights, hard, _ = kept_masks(forced.image_scores, forced.img_present, choice, predictor.keep_counts(forced.n_img), forced.step_valid)
    assert torch.equal(hard[0], torch.stack(plan.last_layer_slots, dim=1)[0])
    torch.testing.assert_close(forced.logits(weights), logits, atol=1e-5, rtol=0)

    text_tokens = torch.tensor([prompt_length - 64])
    flops, original = kept_count_flops(load_arch(tiny_dir), K, text_tokens, forced.n_img, hard.sum(-1), torch.tensor([NEW]), predictor.flops)
    counted = plan_flops(plan, load_arch(tiny_dir))["language_model"]
    assert int(flops) == counted, "the training's FLOPs count is the executed plan's"
    assert int(original) == plan_flops(simulate_plan(make_policy("original", load_arch(tiny_dir)), load_arch(tiny_dir), prompt_length - 64, NEW),
                                      load_arch(tiny_dir))["language_model"]


def test_training_lowers_the_loss_and_moves_the_flops_share_to_its_target(tiny_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    lines = []
    for index in range(6):
        make_image(index).save(tmp_path / f"{index}.png")
        lines.append(json.dumps({"image": f"{index}.png", "prompt": "Describe the image.", "answer": "a red square on a green circle"}))
    data.write_text("\n".join(lines) + "\n")
    config = PredictorTrainConfig(target_flops=0.5, steps=30, batch_size=4, lr=0.1, checkpoint_every=10)
    out = tmp_path / "predictor"
    predictor = train_predictor(str(tiny_dir), str(data), out, config)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 30

    def mean(key, part):
        return sum(entry[key] for entry in part) / len(part)

    first, last = log[:5], log[-5:]
    assert mean("loss", last) < mean("loss", first)
    assert abs(mean("flops_share_expected", last) - 0.5) < abs(mean("flops_share_expected", first) - 0.5)
    saved = RatePredictor.load(out)
    assert saved.training_log["config"]["target_flops"] == 0.5 and saved.K == K
    torch.testing.assert_close(saved.linear.weight, predictor.linear.weight.cpu())
    assert not (out / "checkpoint.pt").exists()


def test_shapes_training_answers_are_written_as_the_embedded_model_writes_them():
    """Teacher forcing must feed the answers the model generates: words after a space,
    a multiple-choice letter as the option's own token (no space)."""
    tokenizer = AutoProcessor.from_pretrained(EMBEDDED_MODEL_DIR).tokenizer
    examples = ShapesExamples(captions_only=False).batch(random.Random(0), 32)
    letters = [example for example in examples if not example.space]
    assert letters and all(example.answer in "ABCD" for example in letters)
    worded = next(example for example in examples if example.space)
    batch = encode(AutoProcessor.from_pretrained(EMBEDDED_MODEL_DIR), [letters[0], worded], 48, "cpu", torch.float32)
    assert batch.targets[0, :2].tolist() == [tokenizer.convert_tokens_to_ids(letters[0].answer), tokenizer.eos_token_id]
    assert batch.targets[1, : int(batch.answer_lengths[1]) - 1].tolist() == \
        tokenizer(" " + worded.answer, add_special_tokens=False)["input_ids"][:47]


def test_training_resumes_from_its_checkpoint(tiny_dir, tmp_path, monkeypatch):
    from dyrate_eval.dyrate import train as training

    data = tmp_path / "data.jsonl"
    make_image(0).save(tmp_path / "0.png")
    data.write_text(json.dumps({"image": "0.png", "prompt": "What is it?", "answer": "a square"}) + "\n")
    config = PredictorTrainConfig(steps=6, batch_size=2, lr=0.1, checkpoint_every=3)
    whole = train_predictor(str(tiny_dir), str(data), tmp_path / "whole", config)

    real_loss, calls = training.predictor_loss, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(training, "predictor_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_predictor(str(tiny_dir), str(data), tmp_path / "parts", config)
    assert (tmp_path / "parts" / "checkpoint.pt").exists()
    monkeypatch.setattr(training, "predictor_loss", real_loss)
    resumed = train_predictor(str(tiny_dir), str(data), tmp_path / "parts", config, resume=True)
    torch.testing.assert_close(resumed.linear.weight, whole.linear.weight)
    assert len((tmp_path / "parts" / "train_log.jsonl").read_text().splitlines()) == 4 + 3  # 4 before, steps 3-5 after


def test_the_folded_predictor_gives_the_trained_layers_logits(tiny_dir):
    """A decision at every step runs the predictor as one product with its feature
    standardisation folded in (``folded``): the logits of the layer it was trained as."""
    predictor = RatePredictor.for_model(load_arch(tiny_dir), K)
    generator = torch.Generator().manual_seed(0)
    features = torch.rand(64, predictor.linear.in_features // len(GROUPS), len(GROUPS), generator=generator)
    with torch.no_grad():
        predictor.linear.weight.copy_(torch.randn(predictor.linear.weight.shape, generator=generator))
        predictor.linear.bias.copy_(torch.randn(predictor.linear.bias.shape, generator=generator))
        predictor.standardize(features)
        weight, bias = predictor.folded()
        torch.testing.assert_close(features.flatten(1) @ weight + bias, predictor(features), atol=1e-4, rtol=1e-5)


def test_a_predictor_for_another_shape_is_refused(tiny_dir, tmp_path, staircase_dir):
    deeper = save_tiny_llava(tmp_path / "deeper", num_layers=6)
    with pytest.raises(PruningConfigError, match=r"predictor=.* does not fit this model: it was trained for .* \(layers=4"):
        apply_pruning(load_model(deeper), method="dyrate", predictor=staircase_dir)
    with pytest.raises(PruningConfigError, match=r"method 'dyrate' needs predictor=DIR: no trained predictor ships for .*dyrate-eval train-predictor"):
        apply_pruning(load_model(tiny_dir), method="dyrate")
    with pytest.raises(PruningConfigError, match=r"predictor=.*nowhere is not a predictor folder"):
        apply_pruning(load_model(tiny_dir), method="dyrate", predictor=str(tmp_path / "nowhere"))
    with pytest.raises(PruningConfigError, match="mode='drop' is not allowed for method 'dyrate': mode must be progressive or mask"):
        apply_pruning(load_model(tiny_dir), method="dyrate", predictor=staircase_dir, mode="drop")


def test_an_inconsistent_predictor_folder_is_refused_naming_what_is_wrong(tiny_dir, tmp_path, staircase_dir):
    settings = json.loads((Path(staircase_dir) / "predictor.json").read_text())
    edited = tmp_path / "edited"
    shutil.copytree(staircase_dir, edited)
    more_heads = {**settings, "model_shape": {**settings["model_shape"], "heads": settings["model_shape"]["heads"] * 2}}
    (edited / "predictor.json").write_text(json.dumps(more_heads))
    with pytest.raises(PruningConfigError, match=r"predictor=.*edited: predictor.safetensors holds tensors .* but predictor.json"):
        apply_pruning(load_model(tiny_dir), method="dyrate", predictor=str(edited))
    (edited / "predictor.json").write_text(json.dumps({key: value for key, value in settings.items() if key != "model_shape"}))
    with pytest.raises(PruningConfigError, match=r"predictor=.*edited: predictor.json must give model .* model_shape \(whole numbers layers"):
        apply_pruning(load_model(tiny_dir), method="dyrate", predictor=str(edited))


def test_dyrate_has_no_simulated_plan(tiny_dir, staircase_dir):
    arch = load_arch(tiny_dir)
    with pytest.raises(PruningConfigError, match="decides how many tokens to keep from what each input.s attention shows"):
        simulate_plan(make_policy("dyrate", arch, predictor=staircase_dir), arch, 20, 4)


def test_fixed_prune_progressive_is_fastv(tiny_dir, make_inputs):
    inputs = make_inputs((0, 1))
    fastv_tokens, fastv_logits, _ = greedy(apply_pruning(load_model(tiny_dir), method="fastv", K=2, R=0.75), inputs, NEW)
    tokens, logits, _ = greedy(apply_pruning(load_model(tiny_dir), method="fixed_prune", K=2, R=0.75), inputs, NEW)
    assert torch.equal(tokens, fastv_tokens) and torch.equal(logits, fastv_logits)


def test_fixed_prune_in_mask_mode_reselects_every_step(tiny_dir, make_inputs):
    inputs = make_inputs((1,))
    eager = load_model(tiny_dir, attn="eager")
    reference = ProgressiveEviction(eager, K, image_positions(inputs["input_ids"], eager.config.image_token_id), [16], progressive=False)
    reference_tokens, reference_logits, _ = greedy(eager, inputs, NEW, output_attentions=True)
    reference.remove()
    model = apply_pruning(load_model(tiny_dir), method="fixed_prune", K=2, R=0.75, mode="mask")
    tokens, logits, _ = greedy(model, inputs, NEW)
    assert torch.equal(tokens, reference_tokens)
    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=0)
    slots = torch.stack(executed_plan(model).last_layer_slots, dim=1)[0]
    assert slots.sum(1).eq(16).all() and (slots[1:] != slots[:-1]).any(), "the same count, re-selected"


def test_depth_prune_rates_grow_with_depth_and_average_R(tiny_dir, make_inputs):
    policy = make_policy("depth_prune", load_arch(tiny_dir), K=1, R=0.4)
    rates = [policy.layer_rate(layer) for layer in range(1, 4)]
    assert rates == sorted(rates) and sum(rates) / 3 == pytest.approx(0.4)
    model = apply_pruning(load_model(tiny_dir), method="depth_prune", K=1, R=0.4)
    greedy(model, make_inputs((0,)), 3)
    kept = executed_plan(model).kept_image_tokens()[0]
    assert kept[0].tolist() == [64] + [round((1 - rate) * 64) for rate in rates]
    assert kept.eq(kept[0]).all(), "the schedule holds for the whole generation"


@pytest.mark.parametrize("method,settings", [("fixed_prune", {"K": 2, "R": 0.5, "mode": "mask"}), ("depth_prune", {"K": 1, "R": 0.5})])
def test_simulated_plan_of_the_baselines_is_the_executed_plan(tiny_dir, make_inputs, method, settings):
    inputs = make_inputs((1,))
    model = apply_pruning(load_model(tiny_dir), method=method, **settings)
    greedy(model, inputs, NEW)
    arch = model_arch(model)
    simulated = simulate_plan(make_policy(method, arch, **settings), arch, inputs["input_ids"].shape[1] - 64, NEW)
    assert simulated.for_row(0) == executed_plan(model).for_row(0)


def test_dyrate_through_the_cli_logs_its_rates_per_step(tiny_dir, tmp_path, staircase_dir):
    from .test_harness import read_samples, run_cli

    log = run_cli(["--model", "dyrate_llava", "--model_args", f"pretrained={tiny_dir},predictor={staircase_dir}",
                   "--tasks", "dyrate_smoke"], tmp_path / "run")
    results, by_doc = read_samples(tmp_path / "run")
    assert "exact_match,none" in results["results"]["dyrate_smoke"], log[-2000:]
    rates = []
    for sample in by_doc.values():
        measured = sample["token_counts"][0]["dyrate"]
        assert measured["policy"]["method"] == "dyrate" and measured["policy"]["predictor"] == staircase_dir
        steps = measured["new_tokens"]
        assert len(measured["rate_by_step"]) == len(measured["group_attention_by_step"]) == steps
        keep = [round((1 - rate) * 64) for rate in measured["rate_by_step"]]
        assert measured["kept_image_last_layer_by_step"] == [min(keep[: t + 1]) for t in range(steps)]
        rates += measured["rate_by_step"]
    assert len(set(rates)) > 2, "the rate changes across steps and samples"


def test_beam_search_keeps_each_beams_own_choices(tiny_dir, make_inputs, staircase_dir):
    model = apply_pruning(load_model(tiny_dir), method="dyrate", predictor=staircase_dir)
    inputs = make_inputs((0, 1))
    with torch.no_grad():
        beams = model.generate(**inputs, num_beams=3, max_new_tokens=NEW, min_new_tokens=NEW, early_stopping=False)
    assert beams.shape == (2, inputs["input_ids"].shape[1] + NEW)
    plan = executed_plan(model)
    assert plan.batch_size == 6  # 2 samples x 3 beams
    chosen = torch.stack(plan.chosen_keep, dim=1)
    kept = plan.kept_image_tokens()[:, :, -1]
    # reordering carries each beam's history with it: its kept count is still the
    # running minimum of its own choices
    assert torch.equal(kept, torch.cummin(chosen, dim=1).values)


def test_rate_for_share_finds_the_rate_that_spent_it(tiny_dir):
    from dyrate_eval.measure.flops import rate_for_share

    arch = load_arch(tiny_dir)
    samples = [(30, 5), (42, 12), (25, 1)]
    fastv = make_policy("fastv", arch, K=2, R=0.5)
    original = make_policy("original", arch)
    spent = sum(plan_flops(simulate_plan(fastv, arch, t, n), arch)["language_model"] for t, n in samples)
    full = sum(plan_flops(simulate_plan(original, arch, t, n), arch)["language_model"] for t, n in samples)
    rate = rate_for_share("fixed_prune", arch, spent / full, samples, K=2)
    assert round((1 - rate) * 64) == 32, "the same kept count as FastV R=0.5 (rates are whole tokens apart)"
    with pytest.raises(PruningConfigError, match="no rate of fixed_prune"):
        rate_for_share("fixed_prune", arch, 1.5, samples, K=2)
