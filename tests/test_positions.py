"""positions=renumber (SPEC section 3 rule 3): after a prefill drop the layers that no
longer see the dropped tokens number the rest contiguously, as PyramidDrop does. The
method matrix runs every method that drops inside the decoder with it against the
masked reference; here PyramidDrop runs against its own convention rebuilt on the
unmodified model: the tokens physically cut out and the rest numbered 0..n-1, the whole
sequence recomputed at every step without a KV cache."""

import pytest
import torch

from dyrate_eval import PruningConfigError, apply_pruning, executed_plan
from dyrate_eval.arch import load_arch

from .conftest import load_model
from .reference import StagedDropsRenumbered, greedy, image_positions
from .test_dyrate import staircase_predictor

NEW = 5


def renumbered_reference(tiny_dir, inputs, keeps):
    eager = load_model(tiny_dir, attn="eager")
    reference = StagedDropsRenumbered(eager, keeps, image_positions(inputs["input_ids"], eager.config.image_token_id)[0],
                                      inputs["input_ids"].shape[1])
    tokens, logits = reference.greedy(eager, inputs, NEW)
    reference.remove()
    return tokens, logits


def test_pdrop_numbers_each_stage_contiguously_as_pyramiddrop_does(tiny_dir, make_inputs):
    inputs = make_inputs((1,))
    # the default stages of the 4-layer model: layers 1, 2 and 3 keep 32, 16 and 8 of 64
    reference_tokens, reference_logits = renumbered_reference(tiny_dir, inputs, {1: 32, 2: 16, 3: 8})
    model = apply_pruning(load_model(tiny_dir), method="pdrop")
    tokens, logits, _ = greedy(model, inputs, NEW)
    assert executed_plan(model).kept_image_tokens()[0, 0].tolist() == [64, 32, 16, 8]
    assert torch.equal(tokens, reference_tokens)
    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=0)

    # the same drops with the prompt's own position ids are another model: the
    # reference tells them apart
    original = apply_pruning(load_model(tiny_dir), method="pdrop", positions="original")
    _, original_logits, _ = greedy(original, inputs, NEW)
    assert (original_logits - reference_logits).abs().max() > 1e-2


def test_a_single_renumbered_drop_equals_the_cut_and_renumbered_model(tiny_dir, make_inputs):
    """FastV with renumber is a one-stage PyramidDrop: one cut at K, the rest numbered anew."""
    inputs = make_inputs((0,))
    reference_tokens, reference_logits = renumbered_reference(tiny_dir, inputs, {2: 16})
    model = apply_pruning(load_model(tiny_dir), method="fastv", K=2, R=0.75, positions="renumber")
    tokens, logits, _ = greedy(model, inputs, NEW)
    assert torch.equal(tokens, reference_tokens)
    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,settings", [
    ("fixed_prune", lambda arch: {"mode": "mask"}),
    ("dyrate", lambda arch: {"predictor": staircase_predictor(arch), "mode": "mask"}),
])
def test_renumbering_a_masking_policy_is_refused(tiny_dir, method, settings):
    model = load_model(tiny_dir)
    refusal = f"positions='renumber' is not allowed for method '{method}' with mode='mask'"
    with pytest.raises(PruningConfigError, match=refusal):
        apply_pruning(model, method=method, positions="renumber", **settings(load_arch(tiny_dir)))
