"""The embedded model's training script, on a tiny configuration."""

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoProcessor, CLIPVisionConfig, CLIPVisionModel, LlavaForConditionalGeneration

from dyrate_eval import apply_pruning, executed_plan
from dyrate_eval.prompts import llava_prompt
from dyrate_eval.embedded.tasks import SHORT_ANSWER_POST_PROMPT
from dyrate_eval.embedded.examples import GRID, TurnBuilder, pack, patch_labels
from dyrate_eval.embedded.train import (
    LOCAL_OFFSETS,
    TrainConfig,
    init_local_attention,
    supervised_logits,
    tower_features,
    train_embedded,
)
from dyrate_eval.embedded.world import COLOURS, SHAPES, Scene, Thing, mcq_questions, render, sample_scene

TASKS = Path(__file__).resolve().parents[1] / "tasks" / "shapes"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained long enough for its losses to move (a few seconds)."""
    out = tmp_path_factory.mktemp("embedded")
    config = dataclasses.replace(TrainConfig.tiny(), stage0_steps=20, stage1_steps=10, stage2_steps=30)
    log = train_embedded(out, config)
    return out, log


def test_training_saves_a_standard_llava_folder_that_runs_with_pruning(trained):
    out, log = trained
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert model.dtype == torch.float16, "weights are stored in fp16"
    model = model.float()
    image = render(sample_scene(0, seed=1))[0]
    inputs = processor(images=[image], text=[llava_prompt("How many shapes are there in the image?")], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == GRID * GRID == 144
    apply_pruning(model, method="fastv", K=1, R=0.75)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert executed_plan(model).for_row(0)["kept_image"][0] == [144, 36]
    saved = json.loads((out / "training_log.json").read_text())
    assert set(saved) >= {"stage0_vision", "stage1_captions", "stage2_instructions", "projector_rescale", "seconds"}


def test_every_stage_lowers_its_loss(trained):
    _, log = trained
    for stage in ("stage0_vision", "stage1_captions", "stage2_instructions"):
        assert log[stage]["final"]["loss"] < log[stage]["first"]["loss"], stage


def test_patch_labels_come_from_the_object_masks():
    thing = Thing("red", "square", "large", x=35, y=35)  # covers patches 0..4 in both directions
    scene = Scene(0, "white", "plain", (thing,))
    labels = patch_labels(scene, render(scene)[1])
    centre, corner = 2 * GRID + 2, GRID * GRID - 1
    assert labels["colour"][centre] == list(COLOURS).index("red") + 1
    assert labels["shape"][centre] == SHAPES.index("square") + 1
    assert labels["centre_col"][centre] == labels["centre_row"][centre] == 35 // 14 + 1
    assert labels["colour"][corner] == labels["shape"][corner] == labels["object"][corner] == 0
    assert (labels["background"] == 2).all() and (labels["texture"] == 0).all()


def test_turn_tokens_are_the_evaluation_prompt_tokens(trained):
    out, _ = trained
    processor = AutoProcessor.from_pretrained(out)
    builder = TurnBuilder(processor.tokenizer, GRID * GRID, popular=[])
    question = "What colour is the circle?" + SHORT_ANSWER_POST_PROMPT
    turn = builder.turn(question, "red")
    image = render(sample_scene(3))[0]
    expected = processor(images=[image], text=[llava_prompt(question)], return_tensors="pt")["input_ids"][0].tolist()
    assert builder.prefix_ids + turn.prompt_ids == expected
    assert processor.tokenizer.decode(turn.answer_ids, skip_special_tokens=True).strip() == "red"


def test_packed_turns_see_exactly_what_a_single_turn_sees(trained):
    """Each packed turn's logits equal those of the turn run alone through the full model."""
    out, _ = trained
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out)
    builder = TurnBuilder(processor.tokenizer, GRID * GRID, popular=["red circle", "blue square"])
    scene = sample_scene(7)
    turns = builder.instruction_turns(scene, random.Random(0), TrainConfig())
    assert len(turns) >= 4
    pixels = processor.image_processor([render(scene)[0]], return_tensors="pt")["pixel_values"]
    input_ids, position_ids, visible, labels = pack(builder.prefix_ids, [turns], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        packed = supervised_logits(model, tower_features(model, pixels), input_ids, position_ids, visible, labels)
        offset = 0
        for turn in turns:
            alone = torch.tensor([builder.prefix_ids + turn.prompt_ids + turn.answer_ids])
            logits = model(input_ids=alone, pixel_values=pixels).logits[0]
            answer = len(turn.answer_ids)
            torch.testing.assert_close(packed[offset : offset + answer], logits[-answer - 1 : -1], atol=1e-5, rtol=0)
            offset += answer
    assert torch.equal(labels[labels != -100], torch.tensor([t for turn in turns for t in turn.answer_ids]))


def test_task_yaml_post_prompts_are_the_training_post_prompt():
    for name in ("shapes_vqa", "shapes_pope"):
        text = (TASKS / f"{name}.yaml").read_text()
        loaded = yaml.safe_load("\n".join(line for line in text.splitlines() if "!function" not in line))
        assert loaded["lmms_eval_specific_kwargs"]["default"]["post_prompt"] == SHORT_ANSWER_POST_PROMPT, name


def test_multiple_choice_answers_are_the_option_letter_tokens(trained):
    """The answer of a multiple-choice turn is the very token that writes its option's
    letter in the prompt ("\nB. circle"), not the space-prefixed letter, a different token."""
    out, _ = trained
    tokenizer = AutoProcessor.from_pretrained(out).tokenizer
    builder = TurnBuilder(tokenizer, GRID * GRID, popular=[])
    newline, dot = (tokenizer.convert_tokens_to_ids(t) for t in tokenizer.tokenize("\n."))
    seen = set()
    for scene_id in range(6):
        for question in mcq_questions(sample_scene(scene_id), random.Random(scene_id)):
            turn = builder.mcq_turn(question)
            letter = turn.answer_ids[0]
            assert turn.answer_ids == [letter, tokenizer.eos_token_id]
            assert tokenizer.decode(turn.answer_ids, skip_special_tokens=True) == question["answer"]
            assert letter != tokenizer(" " + question["answer"], add_special_tokens=False)["input_ids"][0]
            lines = [turn.prompt_ids[i + 1] for i in range(len(turn.prompt_ids) - 2)
                     if turn.prompt_ids[i] == newline and turn.prompt_ids[i + 2] == dot]
            assert len(set(lines)) == 4 and lines["ABCD".index(question["answer"])] == letter
            seen.add(question["answer"])
    assert seen == set("ABCD")


def test_instruction_turns_answer_letters_with_the_option_tokens(trained):
    out, _ = trained
    tokenizer = AutoProcessor.from_pretrained(out).tokenizer
    builder = TurnBuilder(tokenizer, GRID * GRID, popular=["red circle", "blue square"])
    letters = {tokenizer.convert_tokens_to_ids(letter) for letter in "ABCD"}
    turns = builder.instruction_turns(sample_scene(7), random.Random(0), TrainConfig())
    assert sum(turn.answer_ids[0] in letters for turn in turns) == TrainConfig().turns_mcq


def test_local_attention_init_makes_each_head_attend_to_its_neighbour():
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
                              image_size=168, patch_size=14, attn_implementation="eager")
    tower = CLIPVisionModel(config).eval()
    init_local_attention(tower, GRID)
    assert torch.equal(tower.embeddings.position_embedding.weight[0], torch.zeros(192)), "the class token has no position"
    with torch.no_grad():
        attentions = tower(torch.randn(2, 3, 168, 168), output_attentions=True).attentions
    for layer, offsets in enumerate(LOCAL_OFFSETS):
        patches = attentions[layer][:, :, 1:, 1:]  # patch to patch
        for head, (d_col, d_row) in enumerate(offsets):
            for row in range(1, GRID - 1):
                for col in range(1, GRID - 1):
                    weights = patches[:, head, row * GRID + col]
                    target = (row + d_row) * GRID + col + d_col
                    assert (weights.argmax(-1) == target).all(), (layer, head, row, col)
                    assert (weights[:, target] > 0.5).all(), (layer, head, row, col)
    # the layer LLaVA reads and the last one keep CLIP's initialisation
    assert tower.encoder.layers[2].self_attn.q_proj.weight.std() > 0.01
