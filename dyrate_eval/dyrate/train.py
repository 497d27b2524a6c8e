"""Training of DyRate's rate predictor (SPEC section 4) on a frozen LLaVA model.

Each step takes a batch of (image, prompt, reference answer) examples and runs the
model teacher-forced on prompt + answer (``teacher_forced.TeacherForcedPass``): layers < K
once without gradients, giving at every step what the predictor observes at layer K-1.
The predictor's logits over the rates, divided by an annealed temperature, become
one-hot choices by the straight-through Gumbel-Softmax; each step's kept set follows
from the choices with the rule generation uses (``predictor.kept_masks``); layers >= K
run with those sets as weights on the image keys, so the cross-entropy of the
reference reaches the choices. The loss adds lambda x (expected FLOPs share -
target)^2, each sample's share (or the batch's, see
``PredictorTrainConfig.flops_constraint``) computed from the expected kept counts
with the FLOPs count of generation (``measure.flops.kept_count_flops``). Only the predictor
learns.

Training data: ``shapes`` (the procedural world's training scenes: captions, short
answers, yes/no and multiple choice, the embedded model's own training seed),
``shapes-captions`` (captions only), a JSON-lines file of
``{"image": PATH, "prompt": TEXT, "answer": TEXT}`` (image paths relative to the
file), or ``hf:NAME[:SPLIT]``, a Hugging Face data set with image, prompt and answer
columns (on a machine that can download it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ..arch import Arch
from ..errors import PruningConfigError
from ..measure.flops import kept_count_flops
from ..core.hf_llava import model_arch
from .teacher_forced import TeacherForcedPass
from ..core.settings import MODES
from ..dyrate.predictor import DEFAULT_RATES, RatePredictor, kept_masks
from ..prompts import llava_prompt
from ..harness import resolve_dtype

CHECKPOINT_FILE = "checkpoint.pt"
FLOPS_CONSTRAINTS = ("sample", "batch")
LOG_FILE = "train_log.jsonl"


@dataclass
class PredictorTrainConfig:
    """Settings of a training run (SPEC section 4; defaults are the starred ones)."""

    target_flops: float = 0.6  # language-model FLOPs share the loss pulls towards
    flops_weight: float = 20.0  # lambda
    # "sample": every sample's expected share is pulled to the target (the mean of the
    # squared gaps); "batch": the batch's share alone, which lets the predictor spend
    # the budget unevenly. Teacher forcing makes long answers look cheap to prune (the
    # reference, not the model's own words, comes next), so per batch it starves them.
    flops_constraint: str = "sample"
    temperature: float = 1.0  # tau dividing the predictor's logits at the first step
    # tau at the last step, reached by exponential decay: sharper samples late in
    # training make the inference-time argmax the choice that training optimised
    temperature_final: float = 0.2
    K: int = 2
    rates: tuple[float, ...] = DEFAULT_RATES
    mode: str = "progressive"  # the selection rule the kept sets follow (see core.settings.MODES)
    steps: int = 150
    batch_size: int = 8
    # one linear layer on standardised features: a large rate moves its choices within
    # tens of steps, while the temperature anneals over the run
    lr: float = 0.05
    max_answer_tokens: int = 48
    seed: int = 0
    checkpoint_every: int = 50


# -- data -------------------------------------------------------------------------------------


@dataclass
class Example:
    image: Image.Image
    prompt: str  # the user's question or instruction, without the conversation template
    answer: str
    # the answer follows the prompt after a space, as LLaVA writes answers; the embedded
    # model writes a multiple-choice letter as the option's own token, without one
    space: bool = True


class ShapesExamples:
    """Examples from the procedural world's training scenes (the embedded model's seed)."""

    KINDS = ("caption", "short", "pope", "mcq")

    def __init__(self, captions_only: bool):
        from ..embedded.examples import TRAIN_SEED
        from ..embedded.world import object_frequencies

        self.kinds = ("caption",) if captions_only else self.KINDS
        self.seed = TRAIN_SEED
        self.popular = object_frequencies(range(2000), TRAIN_SEED)

    def batch(self, rng: random.Random, size: int) -> list[Example]:
        from ..embedded.tasks import CAPTION_PROMPT, SHORT_ANSWER_POST_PROMPT
        from ..embedded.world import captions, mcq_questions, pope_questions, render, sample_scene, short_questions

        examples = []
        for _ in range(size):
            scene = sample_scene(rng.randrange(100_000), self.seed)
            kind = rng.choice(self.kinds)
            if kind == "caption":
                prompt, answer = CAPTION_PROMPT, rng.choice(captions(scene))
            else:
                pool = {"short": short_questions, "mcq": mcq_questions}.get(kind)
                items = pool(scene, rng) if pool else pope_questions(scene, rng, self.popular)
                item = rng.choice(items)
                post = SHORT_ANSWER_POST_PROMPT if kind != "mcq" else ""
                prompt, answer = item["question"] + post, item["answer"]
            examples.append(Example(render(scene)[0], prompt, answer, space=kind != "mcq"))
        return examples


class FileExamples:
    """Examples from a JSON-lines file of {"image", "prompt", "answer"}."""

    def __init__(self, path: Path):
        self.records = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                self.records.append((path.parent / record["image"], str(record["prompt"]), str(record["answer"])))
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise PruningConfigError(
                    f"{path} line {number} is not a training example {{\"image\", \"prompt\", \"answer\"}}: {error!r}"
                ) from None
        if not self.records:
            raise PruningConfigError(f"{path} holds no training examples")

    def batch(self, rng: random.Random, size: int) -> list[Example]:
        picked = [self.records[rng.randrange(len(self.records))] for _ in range(size)]
        return [Example(Image.open(image).convert("RGB"), prompt, answer) for image, prompt, answer in picked]


class HubExamples:
    """Examples from a Hugging Face data set (answers given as a list take the first)."""

    def __init__(self, name: str, split: str, columns: dict[str, str]):
        from datasets import load_dataset

        self.rows = load_dataset(name, split=split)
        missing = [column for column in columns.values() if column not in self.rows.column_names]
        if missing:
            raise PruningConfigError(
                f"data set {name}:{split} has no column {missing[0]!r}; it has {', '.join(self.rows.column_names)} "
                "(choose with --image-column, --prompt-column, --answer-column)"
            )
        self.columns = columns

    def batch(self, rng: random.Random, size: int) -> list[Example]:
        examples = []
        for _ in range(size):
            row = self.rows[rng.randrange(len(self.rows))]
            answer = row[self.columns["answer"]]
            answer = answer[0] if isinstance(answer, list) else answer
            examples.append(Example(row[self.columns["image"]].convert("RGB"), str(row[self.columns["prompt"]]), str(answer)))
        return examples


def training_data(data: str, columns: dict[str, str] | None = None):
    """The example source named by ``--data``."""
    if data in ("shapes", "shapes-captions"):
        return ShapesExamples(captions_only=data == "shapes-captions")
    if data.startswith("hf:"):
        name, _, split = data[3:].partition(":")
        return HubExamples(name, split or "train", columns or {"image": "image", "prompt": "question", "answer": "answer"})
    path = Path(data)
    if not path.is_file():
        raise PruningConfigError(
            f"--data {data!r} is not allowed: give shapes, shapes-captions, a JSON-lines file of "
            '{"image", "prompt", "answer"}, or hf:NAME[:SPLIT]'
        )
    return FileExamples(path)


# -- batches ----------------------------------------------------------------------------------


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) prompt then answer, right-padded
    pixel_values: torch.Tensor
    prompt_lengths: torch.Tensor  # (B,)
    answer_lengths: torch.Tensor  # (B,)
    targets: torch.Tensor  # (B, T) answer token t, the target of step t (padding: -100)


def encode(processor, examples: list[Example], max_answer_tokens: int, device, dtype) -> Batch:
    """Prompts in LLaVA-1.5's conversation format, each answer after a space (unless the
    example says otherwise) and closed by the end-of-sequence token (how the model
    writes it), right-padded."""
    tokenizer = processor.tokenizer
    rows, prompt_lengths, answers, pixels = [], [], [], []
    for example in examples:
        encoded = processor(images=[example.image], text=[llava_prompt(example.prompt)], return_tensors="pt")
        prompt = encoded["input_ids"][0].tolist()
        answer = tokenizer((" " if example.space else "") + example.answer, add_special_tokens=False)["input_ids"][: max_answer_tokens - 1]
        answer = answer + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        prompt_lengths.append(len(prompt))
        answers.append(answer)
        pixels.append(encoded["pixel_values"])
    length, steps = max(map(len, rows)), max(map(len, answers))
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    targets = torch.full((len(rows), steps), -100, dtype=torch.long)
    for row, (ids, answer) in enumerate(zip(rows, answers)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        targets[row, : len(answer)] = torch.tensor(answer)
    return Batch(
        input_ids.to(device),
        torch.cat(pixels).to(device, dtype),
        torch.tensor(prompt_lengths, device=device),
        torch.tensor([len(a) for a in answers], device=device),
        targets.to(device),
    )


# -- one step -------------------------------------------------------------------------------


def temperature_at(config: PredictorTrainConfig, step: int) -> float:
    progress = step / max(1, config.steps - 1)
    return config.temperature * (config.temperature_final / config.temperature) ** progress


def predictor_loss(model, predictor: RatePredictor, arch: Arch, batch: Batch, config: PredictorTrainConfig,
                   temperature: float) -> tuple[torch.Tensor, dict]:
    """The training loss of one batch and what to log of it."""
    observed = TeacherForcedPass(model, batch.input_ids, batch.pixel_values, batch.prompt_lengths, batch.answer_lengths, config.K)
    rate_logits = predictor(observed.group_attention)  # (B, T, rates)
    # The hard samples of a Gumbel-Softmax follow softmax(logits) whatever its tau, while
    # inference takes the argmax: sampling from softmax(logits / tau) instead, with tau
    # annealed, makes the late training steps run (and pay the FLOPs of) the argmax policy.
    sharpened = rate_logits / temperature
    choice = F.gumbel_softmax(sharpened, tau=1.0, hard=True)
    keep_per_rate = predictor.keep_counts(observed.n_img)
    weights, hard, counts = kept_masks(observed.image_scores, observed.img_present, choice, keep_per_rate,
                                       observed.step_valid, config.mode == "progressive")
    logits = observed.logits(weights)
    valid = observed.step_valid
    cross_entropy = F.cross_entropy(logits[valid].float(), batch.targets[valid])

    text_tokens = batch.prompt_lengths - observed.n_img
    expected_kept = (sharpened.softmax(-1) * counts).sum(-1)  # (B, T)
    flops, original = kept_count_flops(arch, config.K, text_tokens, observed.n_img, expected_kept, batch.answer_lengths, predictor.flops)
    share = flops.sum() / original.sum()
    gaps = (flops / original if config.flops_constraint == "sample" else share) - config.target_flops
    loss = cross_entropy + config.flops_weight * (gaps ** 2).mean()
    with torch.no_grad():
        sampled, _ = kept_count_flops(arch, config.K, text_tokens, observed.n_img, hard.sum(-1), batch.answer_lengths, predictor.flops)
        chosen = torch.tensor(predictor.rates, device=choice.device)[rate_logits.argmax(-1)][valid]
    return loss, {
        "loss": loss.item(),
        "cross_entropy": cross_entropy.item(),
        "flops_share_expected": share.item(),
        "flops_share_sampled": (sampled.sum() / original.sum()).item(),
        "argmax_rate_mean": chosen.mean().item(),
    }


# -- the loop --------------------------------------------------------------------------------


def load_frozen_model(pretrained: str, device: str | None = None, dtype: str = "auto"):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = LlavaForConditionalGeneration.from_pretrained(
        pretrained, dtype=resolve_dtype(dtype, device), device_map=str(device)
    ).eval()
    model.requires_grad_(False)
    return model, AutoProcessor.from_pretrained(pretrained)


def recorded_name(pretrained: str) -> str:
    """How a predictor's files name the model it was trained for: a folder inside the
    working directory relative to it (a shipped predictor holds no path of the machine
    that wrote it), anything else as given (a hub id, a folder elsewhere)."""
    path = Path(pretrained)
    if path.is_absolute() and path.resolve().is_relative_to(Path.cwd().resolve()):
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    return str(pretrained)


def train_predictor(pretrained: str, data: str, out_dir: str | Path, config: PredictorTrainConfig,
                    resume: bool = False, device: str | None = None, dtype: str = "auto",
                    columns: dict[str, str] | None = None) -> RatePredictor:
    """Train a predictor for ``pretrained`` on ``data`` and save it to ``out_dir``
    (with ``train_log.jsonl``, a line per step); ``resume`` continues from the folder's
    checkpoint, which is written every ``config.checkpoint_every`` steps."""
    if not 0.0 < config.temperature_final <= config.temperature:
        raise PruningConfigError(
            f"--temperature-final {config.temperature_final} is not allowed: it must be in (0, --temperature {config.temperature}]"
        )
    if not 0.0 < config.target_flops <= 1.0:
        raise PruningConfigError(f"--target-flops {config.target_flops} is not allowed: it must be a share in (0, 1]")
    if config.flops_constraint not in FLOPS_CONSTRAINTS:
        raise PruningConfigError(
            f"--flops-constraint {config.flops_constraint!r} is not allowed: it must be {' or '.join(FLOPS_CONSTRAINTS)}"
        )
    if config.mode not in MODES:
        raise PruningConfigError(f"--mode {config.mode!r} is not allowed: mode must be {' or '.join(MODES)}")
    if torch.device(device or "cpu").type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)  # every core unless the user says otherwise
    model, processor = load_frozen_model(pretrained, device, dtype)
    arch = model_arch(model)
    examples = training_data(data, columns)
    predictor = RatePredictor.for_model(arch, config.K, tuple(config.rates)).to(model.device)
    predictor.model_name = recorded_name(pretrained)
    optimizer = torch.optim.Adam(predictor.parameters(), lr=config.lr)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path, log_path = out_dir / CHECKPOINT_FILE, out_dir / LOG_FILE
    first_step, seconds_before = 0, 0.0
    if resume:
        if not checkpoint_path.is_file():
            raise PruningConfigError(f"--resume: no {CHECKPOINT_FILE} in {out_dir}")
        checkpoint = torch.load(checkpoint_path, map_location=model.device)
        if checkpoint["config"] != dataclasses.asdict(config) or checkpoint["data"] != data:
            raise PruningConfigError(f"--resume: {checkpoint_path} was written with other settings; start a new folder")
        predictor.load_state_dict(checkpoint["predictor"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        first_step, seconds_before = checkpoint["step"], checkpoint["seconds"]

    else:
        log_path.write_text("")
        # the feature statistics, from the steps of a first batch drawn apart from training's
        with torch.no_grad():
            first = encode(processor, examples.batch(random.Random(f"{config.seed}:statistics"), 4 * config.batch_size),
                           config.max_answer_tokens, model.device, model.dtype)
            observed = TeacherForcedPass(model, first.input_ids, first.pixel_values, first.prompt_lengths, first.answer_lengths, config.K)
            predictor.standardize(observed.group_attention[observed.step_valid])
    started = time.time()
    progress = tqdm(range(first_step, config.steps), initial=first_step, total=config.steps, desc="train-predictor", mininterval=10)
    history = []
    for step in progress:
        # every step's examples and Gumbel noise follow from the seed and the step: a
        # resumed run continues exactly where it stopped
        rng = random.Random(f"{config.seed}:{step}")
        torch.manual_seed(config.seed * 1_000_003 + step)
        batch = encode(processor, examples.batch(rng, config.batch_size), config.max_answer_tokens, model.device, model.dtype)
        loss, metrics = predictor_loss(model, predictor, arch, batch, config, temperature_at(config, step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(metrics)
        with log_path.open("a") as log:
            log.write(json.dumps({"step": step, **{k: round(v, 5) for k, v in metrics.items()}}) + "\n")
        progress.set_postfix(loss=f"{metrics['loss']:.3f}", ce=f"{metrics['cross_entropy']:.3f}",
                             flops=f"{metrics['flops_share_sampled']:.3f}")
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            torch.save({"config": dataclasses.asdict(config), "data": data, "step": step + 1,
                        "seconds": seconds_before + time.time() - started, "predictor": predictor.state_dict(),
                        "optimizer": optimizer.state_dict()}, checkpoint_path)

    window = history[-max(1, len(history) // 10):]
    predictor.training_log = {
        "pretrained": recorded_name(pretrained),
        "data": data,
        "config": dataclasses.asdict(config),
        "seconds": round(seconds_before + time.time() - started, 1),
        "final": {key: round(sum(m[key] for m in window) / len(window), 4) for key in window[0]} if window else {},
    }
    predictor.save(out_dir)
    checkpoint_path.unlink(missing_ok=True)
    return predictor
