"""The pruning core against the unmodified model and against the masked reference."""

import pytest
import torch

from dyrate_eval import apply_pruning, executed_plan, remove_pruning

from .conftest import load_model
from .reference import MaskedKeys, dropped_positions, fastv_selection, greedy, image_positions

NEW = 6


def test_r0_is_identical_to_the_original_model(tiny_dir, make_inputs):
    inputs = make_inputs((0,))
    plain = load_model(tiny_dir)
    reference_tokens, reference_logits, _ = greedy(plain, inputs, NEW)
    with torch.no_grad():
        reference_prefill = plain(**inputs).logits
    for method, settings in (("fastv", {"K": 2, "R": 0.0}), ("original", {})):
        pruned = apply_pruning(load_model(tiny_dir), method=method, **settings)
        tokens, logits, _ = greedy(pruned, inputs, NEW)
        assert torch.equal(tokens, reference_tokens)
        assert torch.equal(logits, reference_logits), f"{method}: decode logits differ"
        with torch.no_grad():
            assert torch.equal(pruned(**inputs).logits, reference_prefill), f"{method}: prefill logits differ"


@pytest.mark.parametrize("K,R", [(1, 0.5), (2, 0.5), (2, 0.75), (3, 0.9), (2, 1.0)])
def test_fastv_matches_masked_reference(tiny_dir, make_inputs, K, R):
    inputs = make_inputs((0,))
    eager = load_model(tiny_dir, attn="eager")
    kept = fastv_selection(eager, inputs, K, R)
    hooks = MaskedKeys(eager, K, dropped_positions(inputs, eager.config.image_token_id, kept))
    reference_tokens, reference_logits, _ = greedy(eager, inputs, NEW)
    hooks.remove()

    pruned = apply_pruning(load_model(tiny_dir), method="fastv", K=K, R=R)
    tokens, logits, _ = greedy(pruned, inputs, NEW)
    assert torch.equal(tokens, reference_tokens)
    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=0)


def test_fastv_random_selection_matches_masked_reference(tiny_dir, make_inputs):
    """selection=random keeps the same count, chosen by the policy's seeded generator
    (the first draw of a fresh model), not by attention."""
    inputs = make_inputs((0, 1))
    K, R = 2, 0.75
    eager = load_model(tiny_dir, attn="eager")
    positions = image_positions(inputs["input_ids"], eager.config.image_token_id)
    draws = torch.rand((len(positions), len(positions[0])), generator=torch.Generator().manual_seed(0))
    keep = round((1 - R) * len(positions[0]))
    kept = [row_positions[row_draws.topk(keep).indices].sort().values for row_positions, row_draws in zip(positions, draws)]
    assert any(not torch.equal(a, b) for a, b in zip(kept, fastv_selection(eager, inputs, K, R)))
    hooks = MaskedKeys(eager, K, dropped_positions(inputs, eager.config.image_token_id, kept))
    reference_tokens, reference_logits, _ = greedy(eager, inputs, NEW)
    hooks.remove()

    pruned = apply_pruning(load_model(tiny_dir), method="fastv", K=K, R=R, selection="random")
    tokens, logits, _ = greedy(pruned, inputs, NEW)
    assert torch.equal(tokens, reference_tokens)
    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("K", [1, 2, 3])
def test_vtw_matches_masked_reference(tiny_dir, make_inputs, K):
    inputs = make_inputs((1,))
    eager = load_model(tiny_dir, attn="eager")
    hooks = MaskedKeys(eager, K, image_positions(inputs["input_ids"], eager.config.image_token_id))
    reference_tokens, reference_logits, _ = greedy(eager, inputs, NEW)
    hooks.remove()

    pruned = apply_pruning(load_model(tiny_dir), method="vtw", K=K)
    tokens, logits, _ = greedy(pruned, inputs, NEW)
    assert torch.equal(tokens, reference_tokens)
    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=0)


def test_kv_cache_of_pruned_layers_is_shorter(tiny_dir, make_inputs):
    inputs = make_inputs((0,))
    K, R = 2, 0.75
    model = apply_pruning(load_model(tiny_dir), method="fastv", K=K, R=R)
    _, _, out = greedy(model, inputs, NEW)
    n_img = int((inputs["input_ids"] == model.config.image_token_id).sum())
    dropped = n_img - round((1 - R) * n_img)
    full = inputs["input_ids"].shape[1] + NEW - 1  # the last token is generated, not cached
    lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    assert lengths[:K] == [full] * K
    assert lengths[K:] == [full - dropped] * (len(lengths) - K)

    plan = executed_plan(model)
    assert plan.num_steps == NEW
    kept = plan.kept_image_tokens()[0]  # (steps, layers)
    assert kept[:, :K].eq(n_img).all() and kept[:, K:].eq(n_img - dropped).all()
    assert plan.keys[0][0].tolist() == [inputs["input_ids"].shape[1]] * K + [inputs["input_ids"].shape[1] - dropped] * (len(lengths) - K)


def test_sampling_and_beam_search_run_and_keep_the_plan(tiny_dir, make_inputs):
    model = apply_pruning(load_model(tiny_dir), method="fastv", K=2, R=0.5)
    inputs = make_inputs((0, 1))
    torch.manual_seed(0)
    with torch.no_grad():
        sampled = model.generate(**inputs, do_sample=True, top_p=0.9, temperature=0.8, max_new_tokens=5, min_new_tokens=5)
    assert sampled.shape[1] == inputs["input_ids"].shape[1] + 5
    with torch.no_grad():
        beams = model.generate(**inputs, num_beams=3, max_new_tokens=5, min_new_tokens=5, early_stopping=False)
    assert beams.shape == (2, inputs["input_ids"].shape[1] + 5)
    plan = executed_plan(model)
    assert plan.batch_size == 6  # 2 samples x 3 beams
    assert plan.kept_image_tokens()[:, :, 2:].eq(32).all()


def test_beam_search_matches_masked_reference(tiny_dir, make_inputs):
    inputs = make_inputs((0,))
    K, R = 2, 0.5
    eager = load_model(tiny_dir, attn="eager")
    kept = fastv_selection(eager, inputs, K, R)
    dropped = dropped_positions(inputs, eager.config.image_token_id, kept)
    hooks = MaskedKeys(eager, K, dropped * 3)  # the prompt is repeated once per beam
    with torch.no_grad():
        reference = eager.generate(**inputs, num_beams=3, max_new_tokens=5, min_new_tokens=5)
    hooks.remove()
    pruned = apply_pruning(load_model(tiny_dir), method="fastv", K=K, R=R)
    with torch.no_grad():
        assert torch.equal(pruned.generate(**inputs, num_beams=3, max_new_tokens=5, min_new_tokens=5), reference)


def test_remove_pruning_restores_the_model(tiny_dir, make_inputs):
    inputs = make_inputs((0,))
    plain = load_model(tiny_dir)
    with torch.no_grad():
        reference = plain(**inputs).logits
    model = remove_pruning(apply_pruning(load_model(tiny_dir), method="vtw", K=1))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)
    assert type(model.model.language_model).__name__ == "LlamaModel"
    assert "generate" not in vars(model), "the generate wrapper must be gone"


def test_prefill_without_cache_scores_from_recomputed_keys(tiny_dir, make_inputs):
    """With use_cache=False the observation layer's keys are recomputed, not read from a cache."""
    model = apply_pruning(load_model(tiny_dir), method="fastv", K=2, R=0.75)
    inputs = make_inputs((0, 1))
    with torch.no_grad():
        cached = model(**inputs, use_cache=True).logits
        uncached = model(**inputs, use_cache=False).logits
    torch.testing.assert_close(uncached, cached, atol=1e-5, rtol=0)
    assert executed_plan(model).kept_image_tokens()[:, 0, 2:].eq(16).all()


def test_scoring_rows_rotate_the_query_as_the_model_does(tiny_dir, monkeypatch):
    """The scoring rows rotate the query alone: by Llama's formula where it gives the
    model's own function's result bit for bit, else by the model's function."""
    from transformers.models.llama import modeling_llama

    from dyrate_eval.core.hf_llava import _rotate_half_rotation, _rotation_of

    language_model = load_model(tiny_dir).model.language_model
    config = language_model.config
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(2, config.num_attention_heads, 5, config.hidden_size // config.num_attention_heads,
                         generator=generator)
    cos, sin = language_model.rotary_emb(states, torch.arange(5).expand(2, -1) * 3)
    assert _rotation_of(language_model) is _rotate_half_rotation
    assert torch.equal(_rotate_half_rotation(states, cos, sin), modeling_llama.apply_rotary_pos_emb(states, states, cos, sin)[0])

    def scaled_rotary(q, k, cos, sin):  # a model whose rotary is not Llama's formula
        return q * cos.unsqueeze(1) * 2, k * cos.unsqueeze(1) * 2

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", scaled_rotary)
    own = _rotation_of(language_model)
    assert own is not _rotate_half_rotation
    assert torch.equal(own(states, cos, sin), states * cos.unsqueeze(1) * 2)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decode_scoring_rows_from_inside_the_attention_call_are_the_recomputed_ones(tiny_dir, make_inputs, attn,
                                                                                    monkeypatch):
    """DyRate's decode steps score with the query the observed layer's attention call
    was given (sdpa and eager run a watched twin); with the query's projection kept and
    rotated again instead, the rows, the choices and the logits are the same bit for bit,
    padded rows included."""
    from dyrate_eval.arch import load_arch
    from dyrate_eval.core import hf_llava
    from dyrate_eval.measure.bench import random_predictor

    inputs = make_inputs((0, 1))
    predictor = random_predictor(load_arch(tiny_dir), K=2)
    took_rotated = []
    close = hf_llava.QueryCapture.__exit__

    def spying_close(capture, *exc):
        close(capture, *exc)
        took_rotated.append(capture.rotated is not None)

    monkeypatch.setattr(hf_llava.QueryCapture, "__exit__", spying_close)
    runs = []
    for watched in (True, False):
        if not watched:
            monkeypatch.setattr(hf_llava, "_WATCHED_ATTENTION", ())
        took_rotated.clear()
        model = apply_pruning(load_model(tiny_dir, attn), method="dyrate", predictor=predictor)
        tokens, logits, _ = greedy(model, inputs, NEW)
        assert len(took_rotated) == NEW and set(took_rotated) == {watched}
        plan = executed_plan(model)
        runs.append((tokens, logits, torch.stack(plan.group_attention), torch.stack(plan.chosen_keep)))
    for inside, recomputed in zip(*runs):
        assert torch.equal(inside, recomputed)


@pytest.mark.parametrize("method,settings,generation", [
    ("dyrate", {}, {}),  # evicts at some steps, not at others; rows of different lengths
    ("fastv", {"K": 2, "R": 0.5}, {"num_beams": 2}),  # every decode step unchanged; beams reordered
    ("fixed_prune", {"K": 2, "R": 0.5, "mode": "mask"}, {}),  # re-selects (hides) at every step
])
def test_a_decode_step_that_changed_no_layer_is_recorded_as_a_count_on_its_layouts(
        tiny_dir, make_inputs, monkeypatch, method, settings, generation):
    """The executor records a decode step that dropped or hid no image token as the last
    step's counts plus the step's tokens; counting on the layouts at every step gives the
    same plan. 70 steps: past the entries a layout makes ahead for appended tokens."""
    from dyrate_eval.arch import load_arch
    from dyrate_eval.core.executor import Executor
    from dyrate_eval.measure.bench import random_predictor

    if method == "dyrate":
        settings = {"predictor": random_predictor(load_arch(tiny_dir), K=2)}
    inputs = make_inputs((0, 1))
    record = Executor._record_step
    unchanged = []

    def counting(executor, state, timeline_mask, new_tokens, reselected):
        unchanged.append(not reselected)
        record(executor, state, timeline_mask, new_tokens, reselected or recount)

    monkeypatch.setattr(Executor, "_record_step", counting)
    plans = []
    for recount in (False, True):
        model = apply_pruning(load_model(tiny_dir), method=method, **settings)
        greedy(model, inputs, 70, **generation)
        plans.append(executed_plan(model))
    assert any(unchanged) == (method != "fixed_prune")
    for field in ("kept_image", "keys", "queries", "scored_keys", "decision_flops", "last_layer_slots"):
        shortcut, counted = (torch.stack(getattr(plan, field), dim=1) for plan in plans)
        assert torch.equal(shortcut, counted), field


def test_appended_layouts_hold_every_token_past_the_entries_made_ahead():
    from dyrate_eval.core.layout import KeyLayout, image_slots, sum_by_group, token_groups

    is_image = torch.tensor([[False, True, True, True, False], [False, False, True, True, False]])
    img_pos, present = image_slots(is_image)
    prompt = KeyLayout.of_prompt(is_image, img_pos, present)
    layout, _ = prompt.without(torch.tensor([[True, False, True], [True, True, False]]))  # the first row keeps 4 of 5
    first, first_index = layout, layout.index.clone()
    for step in range(150):
        layout = layout.appended(5 + 2 * step, 2)
        if step == 10:
            hidden = layout.hiding(torch.tensor([[True, False, False], [True, False, False]]))
            probs = torch.rand(2, 3, hidden.index.shape[1])
            groups = torch.cat([token_groups(is_image, torch.full((2,), 5)), torch.full((2, 22), 3)], dim=1)
            by_group = sum_by_group(probs * hidden.valid[:, None], groups.gather(1, hidden.index)[:, None])
            torch.testing.assert_close(hidden.group_sums(probs * hidden.valid[:, None]), by_group)
    generated = torch.arange(5, 305).expand(2, -1)
    assert torch.equal(layout.index, torch.cat([first.index, generated], dim=1))
    assert torch.equal(layout.valid, torch.cat([first.valid, torch.ones(2, 300, dtype=torch.bool)], dim=1))
    assert not layout.valid[0, 0] and layout.valid[1, 0], "the first row's filler entry stays filler"
    assert torch.equal(first.index, first_index), "appending leaves earlier layouts as they were"
