"""Eviction during decoding (what DyRate does), driven here by a fixed per-step policy."""

import torch

from dyrate_eval import executed_plan
from dyrate_eval.core.hf_llava import install, model_arch
from dyrate_eval.core.policy import PruningPolicy

from .conftest import load_model
from .reference import ProgressiveEviction, greedy, image_positions

K = 2
KEEP_PER_STEP = [48, 40, 24, 24, 10, 3]  # image tokens kept from layer K on, per generation step


class ShrinkingKeep(PruningPolicy):
    name = "test_shrinking"

    def keep_before_layer(self, layer, step, view):
        if layer == K:
            return torch.full_like(view.n_img, KEEP_PER_STEP[min(step, len(KEEP_PER_STEP) - 1)])
        return None


def test_progressive_eviction_matches_the_masked_reference(tiny_dir, make_inputs):
    inputs = make_inputs((0, 1))
    eager = load_model(tiny_dir, attn="eager")
    reference = ProgressiveEviction(eager, K, image_positions(inputs["input_ids"], eager.config.image_token_id), KEEP_PER_STEP)
    reference_tokens, reference_logits, _ = greedy(eager, inputs, len(KEEP_PER_STEP), output_attentions=True)
    reference.remove()

    model = load_model(tiny_dir)
    install(model, ShrinkingKeep(model_arch(model), {}))
    tokens, logits, out = greedy(model, inputs, len(KEEP_PER_STEP))
    assert torch.equal(tokens, reference_tokens)
    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=0)

    kept = executed_plan(model).kept_image_tokens()  # (rows, steps, layers)
    assert kept[:, :, K:].eq(torch.tensor(KEEP_PER_STEP)[None, :, None]).all()
    assert kept[:, :, :K].eq(64).all()
    # the caches of layers >= K hold only what the last forward (step 5) kept
    prompt, new = inputs["input_ids"].shape[1], len(KEEP_PER_STEP)
    lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    assert lengths == [prompt + new - 1] * K + [prompt + new - 1 - (64 - KEEP_PER_STEP[-1])] * (4 - K)
