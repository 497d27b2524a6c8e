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
``embedded.tasks.EVAL_SEED``). Everything is deterministic from ``TrainConfig.seed``.
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

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .examples import (
    HEAD_CLASSES,
    GRID,
    IGNORE,
    OBJECT_HEADS,
    PATCH,
    TRAIN_SEED,
    TurnBuilder,
    pack,
    patch_labels,
    training_corpus,
)
from .model import build_llava, build_tokenizer
from .world import CANVAS, object_frequencies, render, sample_scene


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
