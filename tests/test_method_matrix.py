"""Every registered method through the core's invariants, on the tiny model (the cases
are in method_matrix.py): exact when nothing is pruned, a batch equals its rows run
alone (left and right padding, beams), the simulated plan is the executed one, FLOPs
agree with torch's counter, and the unmodified model with the dropped keys masked out
gives the same tokens and logits."""

import pytest
import torch

from dyrate_eval import PruningConfigError, apply_pruning, executed_plan
from dyrate_eval.arch import Arch, load_arch
from dyrate_eval.core.simulate import simulate_plan
from dyrate_eval.measure.flops import plan_flops
from dyrate_eval.methods import METHODS, make_policy

from .conftest import load_model
from .method_matrix import CASES, matrix, same, same_plan
from .reference import PolicyMaskedReference, greedy, image_positions, reduced_prompt_generation
from .test_flops import counted_by_torch

NEW = 5


def pruned_model(tiny_dir, method, settings, attn="sdpa"):
    return apply_pruning(load_model(tiny_dir, attn=attn), method=method, **settings)


def test_every_registered_method_is_in_the_matrix():
    assert set(CASES) == set(METHODS), "add the method's cases to tests/method_matrix.py"


@pytest.mark.parametrize("method,case", matrix(lambda case: case.unpruned is not None))
def test_exact_when_nothing_is_pruned(tiny_dir, make_inputs, method, case):
    inputs = make_inputs((0, 1))
    reference_tokens, reference_logits, _ = greedy(load_model(tiny_dir), inputs, NEW)
    model = pruned_model(tiny_dir, method, case.unpruned(load_arch(tiny_dir)))
    tokens, logits, _ = greedy(model, inputs, NEW)
    assert torch.equal(tokens, reference_tokens)
    assert torch.equal(logits, reference_logits)


@pytest.mark.parametrize("method,case", matrix())
def test_left_padded_batch_equals_its_rows_alone(tiny_dir, make_inputs, method, case):
    model = pruned_model(tiny_dir, method, case.pruning(load_arch(tiny_dir)))
    batch = make_inputs((0, 1))
    assert batch["attention_mask"][0].eq(0).any(), "the two prompts should differ in length"
    batch_tokens, batch_logits, _ = greedy(model, batch, NEW)
    batch_plan = executed_plan(model)
    for row in range(2):
        tokens, logits, _ = greedy(model, make_inputs((row,)), NEW)
        assert torch.equal(batch_tokens[row], tokens[0])
        same(batch_logits[row], logits[0])
        same_plan(batch_plan.for_row(row), executed_plan(model).for_row(0))


@pytest.mark.parametrize("method,case", matrix())
def test_right_padded_prefill_equals_its_rows_alone(tiny_dir, processor, make_inputs, method, case):
    model = pruned_model(tiny_dir, method, case.pruning(load_arch(tiny_dir)))
    processor.tokenizer.padding_side = "right"
    try:
        batch = make_inputs((0, 1))
    finally:
        processor.tokenizer.padding_side = "left"
    assert batch["attention_mask"][0, -1] == 0, "row 0 should be padded on the right"
    with torch.no_grad():
        batch_logits = model(**batch).logits
        for row in range(2):
            single = make_inputs((row,))
            same(batch_logits[row, single["input_ids"].shape[1] - 1], model(**single).logits[0, -1])


@pytest.mark.parametrize("method,case", matrix())
def test_beam_search_equals_its_rows_alone(tiny_dir, make_inputs, method, case):
    model = pruned_model(tiny_dir, method, case.pruning(load_arch(tiny_dir)))
    settings = {"num_beams": 3, "max_new_tokens": NEW, "min_new_tokens": NEW, "early_stopping": False}
    batch = make_inputs((0, 1))
    with torch.no_grad():
        beams = model.generate(**batch, **settings)
        assert executed_plan(model).batch_size == 6, "the plan follows every beam"
        for row in range(2):
            single = make_inputs((row,))
            alone = model.generate(**single, **settings)[0, single["input_ids"].shape[1]:]
            assert torch.equal(beams[row, batch["input_ids"].shape[1]:], alone)


@pytest.mark.parametrize("method,case", matrix())
def test_simulated_plan_is_the_executed_plan(tiny_dir, make_inputs, method, case):
    arch = load_arch(tiny_dir)
    inputs = make_inputs((1,))
    model = pruned_model(tiny_dir, method, case.pruning(arch))
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    policy = make_policy(method, arch, **case.pruning(arch))
    text_tokens = inputs["input_ids"].shape[1] - arch.n_img
    if case.unsimulated:
        with pytest.raises(PruningConfigError, match=case.unsimulated):
            simulate_plan(policy, arch, text_tokens, NEW)
        return
    assert simulate_plan(policy, arch, text_tokens, NEW).for_row(0) == executed_plan(model).for_row(0)


@pytest.mark.parametrize("method,case", matrix())
def test_flops_agree_with_flop_counter_mode(tiny_dir, make_inputs, method, case):
    inputs = make_inputs((0,))
    model = pruned_model(tiny_dir, method, case.pruning(load_arch(tiny_dir)))
    measured = counted_by_torch(model, inputs, NEW)
    counted = plan_flops(executed_plan(model), Arch.from_config(model.config, "tiny"))
    assert abs(counted["total"] - measured) / measured < 0.01, (counted, measured)


@pytest.mark.parametrize("method,case", matrix(lambda case: case.drops_in_decoder))
def test_masked_reference_gives_the_same_generation(tiny_dir, make_inputs, method, case):
    arch = load_arch(tiny_dir)
    inputs = make_inputs((0, 1))
    eager = load_model(tiny_dir, attn="eager")
    reference = PolicyMaskedReference(eager, make_policy(method, arch, **case.pruning(arch)),
                                      image_positions(inputs["input_ids"], eager.config.image_token_id),
                                      inputs["input_ids"].shape[1], inputs["attention_mask"])
    reference_tokens, reference_logits, _ = greedy(eager, inputs, NEW, output_attentions=True)
    reference.remove()
    model = pruned_model(tiny_dir, method, case.pruning(arch))
    tokens, logits, _ = greedy(model, inputs, NEW)
    kept = executed_plan(model).kept_image_tokens()
    assert kept[:, :, -1].lt(arch.n_img).any(), "the case should drop image tokens"
    assert torch.equal(tokens, reference_tokens)
    same(logits, reference_logits)


@pytest.mark.parametrize("method,case", matrix(lambda case: case.reference_reduction is not None))
def test_reduced_prompt_reference_gives_the_same_generation(tiny_dir, make_inputs, method, case):
    """A reduction before the decoder equals the unmodified model fed, as inputs_embeds,
    the shorter prompt with the merged features the reference computes itself."""
    arch = load_arch(tiny_dir)
    inputs = make_inputs((0, 1))
    reference_tokens, reference_logits = reduced_prompt_generation(load_model(tiny_dir, attn="eager"), inputs,
                                                                   case.reference_reduction(arch), NEW)
    model = pruned_model(tiny_dir, method, case.pruning(arch))
    tokens, logits, _ = greedy(model, inputs, NEW)
    assert executed_plan(model).kept_image_tokens()[:, 0, 0].lt(arch.n_img).all(), "the case should drop image tokens"
    assert torch.equal(tokens, reference_tokens)
    same(logits, reference_logits)
