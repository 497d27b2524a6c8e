"""Training of the embedded default: a small LLaVA-1.5-architecture model on the shapes world.

Three stages, because training everything at once from scratch collapses (the model
answers "yes" to every yes/no question and one letter to every multiple choice):

0. The vision tower alone, with temporary linear heads on every patch token of the
   layer LLaVA reads, predicting what covers that patch (colour, shape, their
   combination, size, the covering object's centre row and column) and the background,
   with labels from the world's own object masks. The heads are then discarded.
1. Tower frozen; projector and decoder on captions. The projector's output is first
   rescaled so image features start at the text embeddings' RMS.
2. Tower frozen; instruction tuning on every question type with caption turns mixed
   in. Several turns of one scene are packed behind one shared image prefix, with an
   attention mask that lets each turn see only the prefix and itself, and the position
   ids each turn would have on its own: one image prefix pays for many answers.

Training scenes come from world seed ``TRAIN_SEED`` (the held-out tasks use
``shapes_tasks.EVAL_SEED``). Everything is deterministic from ``TrainConfig.seed``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .prompts import IMAGE_PLACEHOLDER, SYSTEM_PROMPT, llava_prompt
from .shapes_tasks import CAPTION_PROMPT, SHORT_ANSWER_POST_PROMPT
from .tiny_model import build_llava, build_tokenizer
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
    render,
    sample_scene,
    short_questions,
)

TRAIN_SEED = 0
PATCH = 14
GRID = CANVAS // PATCH
# A patch belongs to an object when the object covers at least this share of it.
PATCH_COVER = 0.2


@dataclass
class TrainConfig:
    """Sizes and schedule of a training run; ``TrainConfig()`` is the shipped model's."""

    seed: int = 0
    scenes: int = 12000
    vocab_size: int = 700
    vision_hidden: int = 192
    vision_layers: int = 4
    vision_heads: int = 3
    text_hidden: int = 256
    text_layers: int = 6
    text_heads: int = 8
    text_kv_heads: int = 4
    stage0_steps: int = 1200
    stage0_batch: int = 32
    stage0_lr: float = 1e-3
    # Scale of the locality-initialised attention heads of the tower (0: CLIP's random
    # initialisation and random position embeddings; see ``init_local_attention``).
    stage0_local_init: float = 1.0
    # Loss weights of the shape and colour-and-shape heads (the other heads weigh 1).
    stage0_shape_weight: float = 4.0
    stage0_object_weight: float = 2.0
    stage1_steps: int = 250
    stage1_batch: int = 16
    stage1_lr: float = 1e-3
    stage2_steps: int = 800
    stage2_batch: int = 16
    stage2_lr: float = 6e-4
    turns_short: int = 4
    turns_pope: int = 4
    turns_mcq: int = 4

    @classmethod
    def tiny(cls) -> "TrainConfig":
        """A few steps of a tiny model: checks the whole pipeline in seconds."""
        return cls(
            scenes=24, vocab_size=400, vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32,
            text_layers=2, text_heads=4, text_kv_heads=2, stage0_steps=2, stage0_batch=4, stage1_steps=2,
            stage1_batch=4, stage2_steps=3, stage2_batch=4,
        )


# -- data -------------------------------------------------------------------------------------


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


# -- model pieces -----------------------------------------------------------------------------


def tower_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The features LLaVA-1.5 reads: the tower's penultimate layer without the class token."""
    layer = model.config.vision_feature_layer
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[layer]
    return hidden[:, 1:]


def supervised_logits(model, features: torch.Tensor, input_ids, position_ids, visible, labels) -> torch.Tensor:
    """Logits at the supervised positions of packed rows, with the tower's ``features``
    projected and spliced into the image slots."""
    embeds = model.get_input_embeddings()(input_ids)
    image = model.model.multi_modal_projector(features.to(embeds.dtype))
    slots = input_ids == model.config.image_token_id
    embeds = embeds.masked_scatter(slots[..., None], image.reshape(-1, image.shape[-1]))
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=visible, position_ids=position_ids).last_hidden_state
    return model.lm_head(hidden[labels != -100])


def decoder_loss(model, features: torch.Tensor, input_ids, position_ids, visible, labels) -> torch.Tensor:
    """Cross-entropy on the supervised tokens of packed rows."""
    logits = supervised_logits(model, features, input_ids, position_ids, visible, labels)
    return F.cross_entropy(logits.float(), labels[labels != -100])


def rescale_projector(model, features: torch.Tensor) -> float:
    """Scale the projector's last layer so image features start at the RMS of the text
    embeddings; from scratch they would differ by orders of magnitude. Returns the factor."""
    with torch.no_grad():
        image_rms = model.model.multi_modal_projector(features).pow(2).mean().sqrt()
        text_rms = model.get_input_embeddings().weight.pow(2).mean().sqrt()
        factor = float(text_rms / image_rms)
        last = model.model.multi_modal_projector.linear_2
        last.weight.mul_(factor)
        last.bias.mul_(factor)
    return factor


def _schedule(optimizer, steps: int):
    warmup = max(1, steps // 20)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _train_loop(name: str, parameters, steps: int, lr: float, batch_loss, log: dict) -> None:
    """AdamW with warm-up and cosine decay; ``batch_loss(step)`` returns (loss, metrics)."""
    parameters = [p for p in parameters if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    scheduler = _schedule(optimizer, steps)
    started, history = time.time(), []
    progress = tqdm(range(steps), desc=name, mininterval=20)
    for step in progress:
        loss, metrics = batch_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        history.append({"step": step, "loss": loss.item(), **metrics})
        progress.set_postfix(loss=f"{loss.item():.3f}", **{k: f"{v:.3f}" for k, v in metrics.items()})
    window = max(1, steps // 10)

    def mean(part):
        return {key: round(sum(h[key] for h in part) / len(part), 4) for key in part[0] if key != "step"}

    log[name] = {
        "steps": steps,
        "seconds": round(time.time() - started, 1),
        "first": mean(history[:window]),
        "final": mean(history[-window:]),
    }
    print(f"{name}: {log[name]}", flush=True)


# Offsets (column, row) of the patch each head of the first tower layers attends to at
# initialisation: left, right, itself; then above, below, itself.
LOCAL_OFFSETS = (((-1, 0), (1, 0), (0, 0)), ((0, -1), (0, 1), (0, 0)))


def init_local_attention(tower, grid: int, scale: float = 1.0) -> None:
    """Give a from-scratch CLIP tower a convolution-like start.

    The last ``head_dim`` channels are reserved for a 2-D sinusoidal position code (the
    patch embedding writes nothing there at first; the class token has none), and the
    heads of the first layers (``LOCAL_OFFSETS``, up to the layer LLaVA reads) get query
    and key projections that read only that code, the query rotated by the head's offset,
    so that each head attends to one neighbouring patch. With random initialisation the
    tower learns colour at once but the shape of objects barely at all in a short stage 0:
    it first has to discover which patches are neighbours.

    With frequencies pi*k/(n+1), k = 1..n, the position codes' inner product is a
    Dirichlet kernel: n per axis where the (offset) coordinates match, about 0 elsewhere;
    ``scale`` 1 makes the attention to the intended patch about 0.85 on average.
    """
    config = tower.config
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = hidden // heads
    if head_dim % 4:
        raise ValueError(f"head_dim {head_dim} must be a multiple of 4 for a 2-D sin-cos code")
    first, n = hidden - head_dim, head_dim // 4
    omega = torch.pi * torch.arange(1, n + 1, dtype=torch.float64) / (n + 1)
    index = torch.arange(grid * grid)
    rows, cols = (index // grid).double(), (index % grid).double()
    code = torch.cat([torch.sin(cols[:, None] * omega), torch.cos(cols[:, None] * omega),
                      torch.sin(rows[:, None] * omega), torch.cos(rows[:, None] * omega)], dim=1)

    def shift(offset: int) -> torch.Tensor:
        """The linear map taking the code of coordinate c (one axis) to that of c + offset."""
        cos, sin = torch.diag(torch.cos(omega * offset)), torch.diag(torch.sin(omega * offset))
        return torch.cat([torch.cat([cos, sin], 1), torch.cat([-sin, cos], 1)], 0)

    embeddings = tower.embeddings
    with torch.no_grad():
        embeddings.patch_embedding.weight[first:] = 0
        position = torch.zeros_like(embeddings.position_embedding.weight)
        position[1:, first:] = code.to(position.dtype)
        embeddings.position_embedding.weight.copy_(position)
        for layer, offsets in zip(tower.encoder.layers[: config.num_hidden_layers - 1], LOCAL_OFFSETS):
            attention = layer.self_attn
            for head, (d_col, d_row) in enumerate(offsets[:heads]):
                rotate = torch.block_diag(shift(d_col), shift(d_row)).to(position.dtype)
                out = slice(head * head_dim, (head + 1) * head_dim)
                for projection, matrix in ((attention.q_proj, rotate), (attention.k_proj, torch.eye(head_dim))):
                    projection.weight[out] = 0
                    projection.weight[out, first:] = scale * matrix.to(position.dtype)
                    projection.bias[out] = 0


# -- the stages -------------------------------------------------------------------------------


def _render_all(processor, scene_ids, chunk: int = 256):
    """Pixel values (fp16) and per-patch labels of the training scenes."""
    pixels, labels = [], {name: [] for name in HEAD_CLASSES}
    for start in tqdm(range(0, len(scene_ids), chunk), desc="render", mininterval=20):
        scenes = [sample_scene(i, TRAIN_SEED) for i in scene_ids[start : start + chunk]]
        rendered = [render(scene) for scene in scenes]
        pixels.append(processor.image_processor([image for image, _ in rendered], return_tensors="pt")["pixel_values"].half())
        for scene, (_, mask) in zip(scenes, rendered):
            for name, values in patch_labels(scene, mask).items():
                labels[name].append(torch.from_numpy(values))
    return torch.cat(pixels), {name: torch.stack(values) for name, values in labels.items()}


def train_embedded(out_dir: str | Path, config: TrainConfig | None = None) -> dict:
    """Train the embedded model from scratch and save it (fp16) with its tokenizer and
    processor to ``out_dir``; returns the training log (also written as training_log.json)."""
    config = config or TrainConfig()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    started = time.time()
    log: dict = {"config": dataclasses.asdict(config)}

    scene_ids = list(range(config.scenes))
    tokenizer = build_tokenizer(training_corpus(scene_ids[:2000]), vocab_size=config.vocab_size)
    model, processor = build_llava(
        tokenizer,
        image_size=CANVAS,
        patch_size=PATCH,
        vision={
            "hidden_size": config.vision_hidden,
            "intermediate_size": 4 * config.vision_hidden,
            "num_hidden_layers": config.vision_layers,
            "num_attention_heads": config.vision_heads,
        },
        text={
            "hidden_size": config.text_hidden,
            "intermediate_size": 3 * config.text_hidden,
            "num_hidden_layers": config.text_layers,
            "num_attention_heads": config.text_heads,
            "num_key_value_heads": config.text_kv_heads,
        },
        seed=config.seed,
    )
    model.train()
    pixels, labels = _render_all(processor, scene_ids)

    # Stage 0: the vision tower with per-patch heads.
    tower = model.model.vision_tower
    if config.stage0_local_init:
        init_local_attention(tower, GRID, config.stage0_local_init)
    heads = torch.nn.ModuleDict({name: torch.nn.Linear(config.vision_hidden, n) for name, n in HEAD_CLASSES.items()})
    weights = {name: 1.0 for name in HEAD_CLASSES}
    weights.update(shape=config.stage0_shape_weight, object=config.stage0_object_weight)
    for name in OBJECT_HEADS:  # what covers a patch is learned where something covers it
        labels[name] = labels[name].masked_fill(labels[name] == 0, IGNORE)

    def stage0_loss(step):
        pick = torch.randint(len(scene_ids), (config.stage0_batch,))
        features = tower_features(model, pixels[pick].float())
        losses, accuracy = [], {}
        for name, head in heads.items():
            logits, target = head(features), labels[name][pick]
            losses.append(weights[name] * F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE))
            on_object = target > 0 if name not in ("background", "texture") else torch.ones_like(target, dtype=torch.bool)
            accuracy[f"acc_{name}"] = float((logits.argmax(-1) == target)[on_object].float().mean()) if on_object.any() else 0.0
        shown = ("acc_colour", "acc_shape", "acc_object", "acc_size", "acc_centre_col", "acc_centre_row")
        return sum(losses), {k: accuracy[k] for k in shown}

    _train_loop("stage0_vision", list(tower.parameters()) + list(heads.parameters()), config.stage0_steps, config.stage0_lr, stage0_loss, log)

    # The tower is frozen from here: compute its features once.
    tower.requires_grad_(False)
    tower.eval()
    with torch.no_grad():
        features = torch.cat([tower_features(model, pixels[i : i + 128].float()).half() for i in range(0, len(pixels), 128)])
    del pixels
    log["projector_rescale"] = rescale_projector(model, features[:64].float())

    builder = TurnBuilder(tokenizer, features.shape[1], object_frequencies(scene_ids, TRAIN_SEED))
    decoder_parameters = [p for name, p in model.named_parameters() if "vision_tower" not in name]

    def packed_loss(batch: int, turns_for):
        pick = [rng.randrange(len(scene_ids)) for _ in range(batch)]
        turns = [turns_for(sample_scene(scene_ids[i], TRAIN_SEED)) for i in pick]
        input_ids, position_ids, visible, targets = pack(builder.prefix_ids, turns, tokenizer.pad_token_id)
        return decoder_loss(model, features[pick].float(), input_ids, position_ids, visible, targets), {}

    # Stage 1: projector and decoder on captions.
    _train_loop(
        "stage1_captions", decoder_parameters, config.stage1_steps, config.stage1_lr,
        lambda step: packed_loss(config.stage1_batch, lambda scene: builder.caption_turns(scene, rng, 2)), log,
    )
    # Stage 2: instruction tuning on every question type, captions mixed in.
    _train_loop(
        "stage2_instructions", decoder_parameters, config.stage2_steps, config.stage2_lr,
        lambda step: packed_loss(config.stage2_batch, lambda scene: builder.instruction_turns(scene, rng, config)), log,
    )

    log["seconds"] = round(time.time() - started, 1)
    log["parameters"] = sum(p.numel() for p in model.parameters())
    out_dir = Path(out_dir)
    model.eval().half().save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    return log
