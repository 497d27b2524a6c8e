"""Every wrong setting fails before any work, with one message naming the setting and
what is allowed."""

import pytest
import torch

from dyrate_eval import PruningConfigError, apply_pruning
from dyrate_eval.prompts import llava_prompt

from .conftest import load_model, make_image


@pytest.mark.parametrize(
    "method,settings,message",
    [
        ("fastvv", {}, "unknown method 'fastvv': allowed methods are original, fastv, vtw"),
        ("fastv", {"K": 0}, "K=0 is not allowed for method 'fastv': K must be an integer in 1..3 (this model has 4 decoder layers)"),
        ("fastv", {"K": 4}, "K=4 is not allowed for method 'fastv': K must be an integer in 1..3"),
        ("vtw", {"K": 1.5}, "K=1.5 is not allowed for method 'vtw': K must be an integer in 1..3"),
        ("fastv", {"R": 1.5}, "R=1.5 is not allowed for method 'fastv': R must be a number in [0, 1]"),
        ("fastv", {"R": -0.1}, "R=-0.1 is not allowed for method 'fastv': R must be a number in [0, 1]"),
        ("vtw", {"R": 0.5}, "method 'vtw' does not take setting 'R'; it takes: K"),
        ("fastv", {"selection": "top"}, "selection='top' is not allowed for method 'fastv': selection must be attention or random"),
        ("original", {"K": 2}, "method 'original' does not take setting 'K'; it takes: no settings"),
        ("fastv", {"positions": "contiguous"},
         "positions='contiguous' is not allowed for method 'fastv': positions must be original or renumber"),
        ("pdrop", {"layers": "2/1"}, "layers='2/1' is not allowed for method 'pdrop': layers must be layer indices in 1..3, "
                                     "increasing, separated by '/' (e.g. 8/16/24) (this model has 4 decoder layers)"),
        ("pdrop", {"layers": "1/4"}, "layers='1/4' is not allowed for method 'pdrop': layers must be layer indices in 1..3"),
        ("pdrop", {"lambda": 0}, "lambda=0 is not allowed for method 'pdrop': lambda must be a number in (0, 1]"),
        ("pdrop", {"lambda": 1.5}, "lambda=1.5 is not allowed for method 'pdrop': lambda must be a number in (0, 1]"),
        ("dart", {"pivots": 65},
         "pivots=65 is not allowed for method 'dart': pivots must be an integer in 1..64, the model's image tokens"),
        ("dart", {"pivots": 0}, "pivots=0 is not allowed for method 'dart': pivots must be an integer in 1..64"),
        ("dart", {"R": 0.9, "pivots": 8}, "pivots=8 is not allowed for method 'dart' with R=0.9: the pivots are among "
                                          "the kept image tokens, and R=0.9 keeps 6 of the model's 64"),
        ("dart", {"similarity": "values"}, "similarity='values' is not allowed for method 'dart': similarity must be keys or hidden"),
    ],
)
def test_bad_settings_fail_with_a_clear_message(tiny_dir, method, settings, message):
    model = load_model(tiny_dir)
    with pytest.raises(PruningConfigError) as error:
        apply_pruning(model, method=method, **settings)
    assert message in str(error.value)
    assert type(model.model.language_model).__name__ == "LlamaModel", "a failed call must not change the model"


def test_prompt_without_image_token_fails_before_the_vision_tower_runs(tiny_dir, processor):
    model = apply_pruning(load_model(tiny_dir), method="fastv", K=2, R=0.5)
    calls = []
    model.model.vision_tower.register_forward_pre_hook(lambda *args: calls.append(1))
    text_only = processor.tokenizer([llava_prompt("What is this?", num_images=0)], return_tensors="pt")
    with pytest.raises(PruningConfigError, match=r"the prompt of sample 0 has no image token \(id 4\)"):
        model.generate(**text_only, pixel_values=torch.zeros(1, 3, 112, 112), max_new_tokens=2)
    assert calls == []


def test_second_sample_without_image_is_named(tiny_dir, processor):
    model = apply_pruning(load_model(tiny_dir), method="vtw", K=2)
    ids = processor(images=[make_image(0)], text=[llava_prompt("A?")], return_tensors="pt")["input_ids"]
    batch = torch.cat([ids, torch.full_like(ids, processor.tokenizer.pad_token_id)])
    with pytest.raises(PruningConfigError, match="the prompt of sample 1 has no image token"):
        model(input_ids=batch)


def test_output_attentions_is_refused_on_a_pruned_model(tiny_dir, make_inputs):
    model = apply_pruning(load_model(tiny_dir), method="fastv", K=2, R=0.5)
    with pytest.raises(PruningConfigError, match="output_attentions=True is not available on a pruned model"):
        model(**make_inputs((0,)), output_attentions=True)
