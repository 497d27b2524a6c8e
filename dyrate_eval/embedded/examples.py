"""The embedded model's training examples from the shapes world: per-patch labels from the
world's object masks (stage 0), the caption and question turns (stages 1 and 2), and
the packing of several turns of one scene behind one shared image prefix."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..prompts import IMAGE_PLACEHOLDER, SYSTEM_PROMPT, llava_prompt
from .tasks import CAPTION_PROMPT, SHORT_ANSWER_POST_PROMPT
from .world import (
    BACKGROUNDS,
    CANVAS,
    COLOURS,
    SHAPES,
    SIZES,
    TEXTURES,
    captions,
    mcq_questions,
    object_frequencies,
    pope_questions,
    sample_scene,
    short_questions,
)

if TYPE_CHECKING:
    from .train import TrainConfig

TRAIN_SEED = 0
PATCH = 14
GRID = CANVAS // PATCH
# A patch belongs to an object when the object covers at least this share of it.
PATCH_COVER = 0.2


def patch_owner(scene, mask: np.ndarray) -> np.ndarray:
    """Per patch (GRID*GRID, raster order): 1 + the index of the object that covers it, 0 for background."""
    patches = mask.reshape(GRID, PATCH, GRID, PATCH).transpose(0, 2, 1, 3).reshape(GRID * GRID, PATCH * PATCH)
    coverage = np.stack([(patches == i + 1).mean(axis=1) for i in range(len(scene.things))], axis=1)
    return np.where(coverage.max(axis=1) >= PATCH_COVER, coverage.argmax(axis=1) + 1, 0)


def patch_labels(scene, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Per patch (GRID*GRID, raster order): what covers it, as class indices (0 = no object)."""
    owner = patch_owner(scene, mask)
    colours, shapes, sizes = list(COLOURS), list(SHAPES), list(SIZES)

    def per_object(value_of) -> np.ndarray:
        table = np.array([0] + [value_of(t) + 1 for t in scene.things])
        return table[owner]

    everywhere = np.ones(GRID * GRID, dtype=np.int64)
    return {
        "colour": per_object(lambda t: colours.index(t.colour)),
        "shape": per_object(lambda t: shapes.index(t.shape)),
        "object": per_object(lambda t: colours.index(t.colour) * len(shapes) + shapes.index(t.shape)),
        "size": per_object(lambda t: sizes.index(t.size)),
        "centre_col": per_object(lambda t: min(t.x // PATCH, GRID - 1)),
        "centre_row": per_object(lambda t: min(t.y // PATCH, GRID - 1)),
        "background": everywhere * list(BACKGROUNDS).index(scene.background),
        "texture": everywhere * TEXTURES.index(scene.texture),
    }


# Heads that describe the covering object: trained on object patches only (the colour
# head, with its "no object" class, is the one that tells objects from background).
OBJECT_HEADS = ("shape", "object", "size", "centre_col", "centre_row")
IGNORE = -100

HEAD_CLASSES = {
    "colour": len(COLOURS) + 1,
    "shape": len(SHAPES) + 1,
    "object": len(COLOURS) * len(SHAPES) + 1,
    "size": len(SIZES) + 1,
    "centre_col": GRID + 1,
    "centre_row": GRID + 1,
    "background": len(BACKGROUNDS),
    "texture": len(TEXTURES),
}


def training_corpus(scene_ids) -> list[str]:
    """Every kind of text the model will read or write, for the tokenizer."""
    texts = [SYSTEM_PROMPT, CAPTION_PROMPT, SHORT_ANSWER_POST_PROMPT, "USER: ASSISTANT:"]
    popular = object_frequencies(scene_ids, TRAIN_SEED)
    for scene_id in scene_ids:
        scene, rng = sample_scene(scene_id, TRAIN_SEED), random.Random(scene_id)
        texts += captions(scene)
        texts += [f"{q['question']} {q['answer']}" for q in short_questions(scene, rng) + pope_questions(scene, rng, popular) + mcq_questions(scene, rng)]
    return texts


@dataclass
class Turn:
    prompt_ids: list[int]  # the user turn after the image, up to and including "ASSISTANT:"
    answer_ids: list[int]  # the answer and the end-of-sequence token (the supervised part)


class TurnBuilder:
    """Token ids of the image prefix and of single turns, exactly as the LLaVA prompt of
    an evaluation request tokenizes (the prompt is split after the image tokens)."""

    def __init__(self, tokenizer, image_tokens: int, popular: list[str]):
        self.tokenizer = tokenizer
        self.popular = popular
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        ids = tokenizer(llava_prompt("x"))["input_ids"]
        cut = ids.index(self.image_id)
        self.prefix_ids = ids[:cut] + [self.image_id] * image_tokens

    def turn(self, question: str, answer: str, *, space: bool = True) -> Turn:
        """One turn; the answer is written after a space (" red") unless ``space`` is False."""
        ids = self.tokenizer(llava_prompt(question))["input_ids"]
        prompt = ids[ids.index(self.image_id) + 1 :]
        text = " " + answer if space else answer
        answer_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return Turn(prompt, answer_ids)

    def mcq_turn(self, question: dict) -> Turn:
        """A multiple-choice turn answered with the option letter as the options write it.

        The options stand after line breaks ("\\nB. circle"), where the byte-level BPE
        writes the letter as the token "B"; " B" is a different token (the letter with the
        space marker), so the decoder would have to learn a second mapping on top of
        finding the option. The answer is therefore the bare letter, the option's own token.
        """
        return self.turn(question["question"], question["answer"], space=False)

    def caption_turns(self, scene, rng: random.Random, count: int) -> list[Turn]:
        references = captions(scene)
        return [self.turn(CAPTION_PROMPT, text) for text in rng.sample(references, min(count, len(references)))]

    def instruction_turns(self, scene, rng: random.Random, config: TrainConfig) -> list[Turn]:
        short = short_questions(scene, rng)[: config.turns_short]
        pope = pope_questions(scene, rng, self.popular)
        yes = [q for q in pope if q["answer"] == "yes"]
        no = [q for q in pope if q["answer"] == "no"]
        half = config.turns_pope // 2
        # half of the "no" answers from the adversarial split (same colour or same shape as
        # an object present), the hardest negatives; the rest from all splits
        hard = [q for q in no if q["split"] == "adversarial"]
        hard_pick = rng.sample(hard, min((config.turns_pope - half + 1) // 2, len(hard)))
        rest = [q for q in no if q not in hard_pick]
        no_pick = hard_pick + rng.sample(rest, min(config.turns_pope - half - len(hard_pick), len(rest)))
        pope_pick = rng.sample(yes, min(half, len(yes))) + no_pick
        mcq = mcq_questions(scene, rng) + mcq_questions(scene, rng)  # each question with two orders of options
        mcq_pick = rng.sample(mcq, min(config.turns_mcq, len(mcq)))
        turns = [self.turn(q["question"] + SHORT_ANSWER_POST_PROMPT, q["answer"]) for q in short + pope_pick]
        turns += [self.mcq_turn(q) for q in mcq_pick]
        turns += self.caption_turns(scene, rng, 1)
        rng.shuffle(turns)
        return turns


def pack(prefix_ids: list[int], turns_per_row: list[list[Turn]], pad_id: int):
    """Rows of one shared image prefix followed by several independent turns.

    Returns input ids, position ids, a boolean attention mask (B, 1, L, L) in which
    each turn attends causally to the prefix and to itself only, and the targets
    (the next token where it is supervised, -100 elsewhere).
    """
    rows = []
    for turns in turns_per_row:
        ids, positions, segment, targets = list(prefix_ids), list(range(len(prefix_ids))), [0] * len(prefix_ids), [-100] * len(prefix_ids)
        for number, turn in enumerate(turns, start=1):
            tokens = turn.prompt_ids + turn.answer_ids
            ids += tokens
            positions += range(len(prefix_ids), len(prefix_ids) + len(tokens))
            segment += [number] * len(tokens)
            # position p predicts token p+1: the last prompt token predicts the first answer token
            targets += [-100] * (len(turn.prompt_ids) - 1) + turn.answer_ids + [-100]
        rows.append((ids, positions, segment, targets))
    length = max(len(r[0]) for r in rows)
    batch = len(rows)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((batch, length), dtype=torch.long)
    segments = torch.full((batch, length), -1, dtype=torch.long)
    labels = torch.full((batch, length), -100, dtype=torch.long)
    for i, (ids, positions, segment, targets) in enumerate(rows):
        n = len(ids)
        input_ids[i, :n], position_ids[i, :n] = torch.tensor(ids), torch.tensor(positions)
        segments[i, :n], labels[i, :n] = torch.tensor(segment), torch.tensor(targets)
    index = torch.arange(length)
    causal = index[None, :, None] >= index[None, None, :]
    query_seg, key_seg = segments[:, :, None], segments[:, None, :]
    visible = causal & ((key_seg == 0) | (key_seg == query_seg)) & (key_seg >= 0)
    visible |= torch.eye(length, dtype=torch.bool)[None]  # padding rows see themselves: no empty softmax
    return input_ids, position_ids, visible[:, None], labels
